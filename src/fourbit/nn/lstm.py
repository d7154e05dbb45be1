"""QLSTM: nn.LSTM with its input and recurrent gate GEMMs quantized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fourbit.nn.gemm import linear_ops
from fourbit.nn.layers import QuantState, adopt
from fourbit.nn.spec import FP32_LAYER, LayerSpec


class _CellPointwise(torch.autograd.Function):
    """The cell's float32 elementwise part as one autograd node (not eleven):
    gates [B, 4H] (i, f, g, o), c [B, H] -> h = σ(o)·tanh(c'), c' = σ(f)·c + σ(i)·tanh(g)."""

    @staticmethod
    def forward(ctx, gates, c):
        i, f, g, o = gates.chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        tanh_c = torch.tanh(c_new)
        ctx.save_for_backward(i, f, g, o, c, tanh_c)
        return o * tanh_c, c_new

    @staticmethod
    def backward(ctx, dh, dc_new):
        i, f, g, o, c, tanh_c = ctx.saved_tensors
        dc = dh * o * (1 - tanh_c * tanh_c) + dc_new  # autograd passes zeros for an unused output
        d_i, d_f, d_g, d_o = dc * g, dc * c, dc * i, dh * tanh_c
        dgates = torch.cat([d_i * i * (1 - i), d_f * f * (1 - f), d_g * (1 - g * g), d_o * o * (1 - o)], -1)
        return dgates, dc * f


class QLSTM(nn.LSTM):
    """Same constructor, parameters, state_dict keys and call as nn.LSTM (no proj_size, no
    PackedSequence). Per layer and direction, two quantized GEMM layers: the input GEMM
    x·W_ihᵀ (all time steps at once: the same quantized weight and clip every step) and the
    recurrent GEMM h·W_hhᵀ, quantized anew every time step. Gates, cell state and
    nonlinearities stay float32. Under the fp32 spec it runs torch's own LSTM."""

    def __init__(self, *args, spec: LayerSpec = FP32_LAYER, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_quant(spec, seed)

    @classmethod
    def from_float(cls, module: nn.LSTM, spec: LayerSpec, seed: int = 0) -> QLSTM:
        if module.proj_size:
            raise ValueError("QLSTM does not support proj_size > 0")
        q = adopt(cls, module, spec, seed)
        del q.quant
        q._add_quant(spec, seed)
        return q

    def _add_quant(self, spec: LayerSpec, seed: int) -> None:
        if self.proj_size:
            raise ValueError("QLSTM does not support proj_size > 0")
        self.spec = spec
        self.quant = nn.ModuleDict(
            {
                f"{name}_{kind}": QuantState(spec, seed + 7919 * i + j)
                for i, name in enumerate(self._cell_names())
                for j, kind in enumerate(("ih", "hh"))
            }
        )
        for name in self._cell_names():
            # hidden states lie in (-1, 1): a signed clip at 1, not one fitted to h0 = 0
            pact = self.quant[f"{name}_hh"].pact_a
            if pact is not None:
                pact.preset(signed=True, alpha=1.0)

    def _cell_names(self) -> list[str]:
        suffixes = ["", "_reverse"][: 2 if self.bidirectional else 1]
        return [f"l{layer}{s}" for layer in range(self.num_layers) for s in suffixes]

    def forward(self, x, hx=None):
        if isinstance(x, PackedSequence):
            raise ValueError("QLSTM does not take a PackedSequence; pad the batch and pass a tensor")
        if self.spec.is_fp32:
            return super().forward(x, hx)
        batched = x.dim() == 3
        if not batched:  # one sequence: make it a batch of one, on the batch axis
            x = x.unsqueeze(0 if self.batch_first else 1)
            hx = None if hx is None else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        if self.batch_first:
            x = x.transpose(0, 1)
        T, B, _ = x.shape
        dirs = 2 if self.bidirectional else 1
        if hx is None:
            zeros = x.new_zeros(self.num_layers * dirs, B, self.hidden_size)
            hx = (zeros, zeros)
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for d in range(dirs):
                name = f"l{layer}{'_reverse' if d else ''}"
                k = layer * dirs + d
                out, h, c = self._run_direction(layer_input, name, hx[0][k], hx[1][k], reverse=bool(d))
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = torch.cat(outputs, dim=-1) if dirs == 2 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        output = layer_input.transpose(0, 1) if self.batch_first else layer_input
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if not batched:
            output, h_n, c_n = output.squeeze(0 if self.batch_first else 1), h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _run_direction(self, x: Tensor, name: str, h: Tensor, c: Tensor, reverse: bool):
        w_ih, w_hh = getattr(self, f"weight_ih_{name}"), getattr(self, f"weight_hh_{name}")
        T, B, _ = x.shape
        # explicit sizes, not -1: a batch of 0 (which nn.LSTM takes) leaves -1 ambiguous
        flat = x.reshape(T * B, x.shape[-1])
        gates_x = self.quant[f"{name}_ih"].gemm(flat, w_ih, linear_ops()).reshape(T, B, w_ih.shape[0])
        if self.bias:
            gates_x = gates_x + getattr(self, f"bias_ih_{name}") + getattr(self, f"bias_hh_{name}")
        # unbind, not gates_x[t]: one backward node stacking the T step gradients, where
        # T indexings would each scatter into a zeroed copy of the whole tensor
        gates_x_steps = gates_x.unbind(0)
        recurrent, ops = self.quant[f"{name}_hh"], linear_ops()
        w_hh_q = recurrent.hold_weight(w_hh, ops)  # W_hh is the same at every step: quantized once
        outputs = [None] * T
        for t in reversed(range(T)) if reverse else range(T):
            h, c = _CellPointwise.apply(gates_x_steps[t] + recurrent.gemm(h, w_hh, ops, held_b=w_hh_q), c)
            outputs[t] = h
        return torch.stack(outputs), h, c
