"""QLSTM: nn.LSTM with its input and recurrent gate GEMMs quantized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fourbit.nn.gemm import gemm_backward, gemm_forward, linear_ops
from fourbit.nn.layers import QuantState, adopt
from fourbit.nn.spec import FP32_LAYER, LayerSpec


def cell_forward(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """The cell's float32 elementwise part: gates [B, 4H] (i, f, g, o), c [B, H] ->
    (h = σ(o)·tanh(c'), c' = σ(f)·c + σ(i)·tanh(g), what `cell_backward` needs)."""
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    tanh_c = torch.tanh(c_new)
    return o * tanh_c, c_new, (i, f, g, o, c, tanh_c)


def cell_backward(saved: tuple[Tensor, ...], dh: Tensor, dc_new: Tensor) -> tuple[Tensor, Tensor]:
    """(d gates, dc) of `cell_forward` from dh and dc'."""
    i, f, g, o, c, tanh_c = saved
    dc = dh * o * (1 - tanh_c * tanh_c) + dc_new
    d_i, d_f, d_g, d_o = dc * g, dc * c, dc * i, dh * tanh_c
    dgates = torch.cat([d_i * i * (1 - i), d_f * f * (1 - f), d_g * (1 - g * g), d_o * o * (1 - o)], -1)
    return dgates, dc * f


class QuantizedRecurrence(torch.autograd.Function):
    """apply(gates_x, h0, c0, w_hh, alpha, state, held_w, reverse, keep) -> (h [T, B, H], h_T, c_T):
    one direction of one QLSTM layer over all its time steps, as one autograd node.

        forward, t = 0 … T-1 (T-1 … 0 if reverse):
            gates = gates_x[t] + Q_A(h)·Q_W(W_hh)ᵀ      gemm_forward; Q_W(W_hh) is `held_w`
            h, c  = cell(gates, c)
        backward, the other way round:
            d gates       = cell'(dh, dc)                dh: from the output and from step t+1
            dh, dW_hh, dα = gemm_backward(d gates)      GradScale, Q_G at both phases, PACT

    The same calls in the same order as T QuantizedGemm nodes (bit for bit the same values,
    GradScale updates and random draws), without the autograd engine's bookkeeping per
    step (a fifth of a speech-bilstm training step under ibm4, measured at one thread)."""

    @staticmethod
    def forward(ctx, gates_x, h, c, w_hh, alpha, state, held_w, reverse: bool, keep: bool):
        ops = linear_ops()
        steps = range(gates_x.shape[0] - 1, -1, -1) if reverse else range(gates_x.shape[0])
        outputs = gates_x.new_empty(gates_x.shape[0], *h.shape)
        # the first step's GEMM has a gradient to compute only if h0, W_hh or α wants one
        keep_first = keep and any(ctx.needs_input_grad[i] for i in (1, 3, 4))
        gemms, cells = [], []
        for t in steps:
            y, gemm = gemm_forward(
                state, ops, h, w_hh, alpha, None, keep_first if not gemms else keep, held_w
            )
            h, c, cell = cell_forward(gates_x[t] + y, c)
            outputs[t] = h
            gemms.append(gemm)
            cells.append(cell)
        if keep:
            ctx.steps, ctx.gemms, ctx.gates_shape = list(steps), gemms, gates_x.shape
            # the held W_hh is in every step's GemmSaved: saved once, found again by identity
            groups = [g.tensors() if g is not None else [] for g in gemms] + cells
            tensors, ctx.where = _unique_tensors(groups)
            ctx.save_for_backward(*tensors)
        return outputs, h, c

    @staticmethod
    def backward(ctx, d_out, dh, dc):
        saved = ctx.saved_tensors
        lists = [[saved[i] for i in where] for where in ctx.where]
        n = len(ctx.gemms)
        gemms = [g and g.restore(iter(ts)) for g, ts in zip(ctx.gemms, lists[:n], strict=True)]
        cells = lists[n:]
        need_h0, need_w, need_alpha = (ctx.needs_input_grad[i] for i in (1, 3, 4))
        any_grad = any(ctx.needs_input_grad[:5])
        d_gates_x = d_out.new_empty(ctx.gates_shape)
        w_unpacked = next((g.b_for_da.unpack() for g in gemms if g is not None), None)
        dw = dalpha = None
        for k in range(n - 1, -1, -1):
            t = ctx.steps[k]
            d_gates, dc = cell_backward(cells[k], d_out[t] + dh, dc)
            d_gates_x[t] = d_gates
            if gemms[k] is None:  # (the first step, with nothing to differentiate)
                dh = None
                continue
            needs = (need_h0 if k == 0 else any_grad, need_w, need_alpha, False)
            dh, dw_t, dalpha_t, _ = gemm_backward(gemms[k], d_gates, needs, w_unpacked)
            dw = dw_t if dw is None else dw + dw_t
            dalpha = dalpha_t if dalpha is None else dalpha + dalpha_t
        return d_gates_x, dh, dc, dw, dalpha, None, None, None, None


def _unique_tensors(groups: list[list[Tensor]]) -> tuple[list[Tensor], list[list[int]]]:
    """Each distinct tensor once, and for each group the indices of its tensors in that list."""
    tensors, index, where = [], {}, []
    for group in groups:
        for t in group:
            if id(t) not in index:
                index[id(t)] = len(tensors)
                tensors.append(t)
        where.append([index[id(t)] for t in group])
    return tensors, where


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
            recurrent = self.quant[f"{name}_hh"]
            if recurrent.pact_a is not None:
                recurrent.pact_a.preset(signed=True, alpha=1.0)
            elif recurrent.sign_a is not None:  # SAWB on an unsigned grid: signed, not fixed by h0 = 0
                recurrent.sign_a.fix(True)

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
        recurrent = self.quant[f"{name}_hh"]
        pact = recurrent.pact_a
        alpha = None
        if pact is not None:
            pact.observe(h)
            alpha = pact.clip_level()
        keep = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (gates_x, h, c, w_hh, alpha)
        )
        w_hh_q = recurrent.hold_weight(w_hh, linear_ops())  # the same at every step: quantized once
        return QuantizedRecurrence.apply(gates_x, h, c, w_hh, alpha, recurrent, w_hh_q, reverse, keep)
