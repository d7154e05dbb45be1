"""Drop-in quantized layers: QLinear, QConv1d, QConv2d, QMatmul.

Each keeps the original module's parameters and state_dict keys and adds `quant.*`: its
GradScale, PACT clip(s) and random-generator state. Under the fp32 LayerSpec a layer
calls the plain torch op, so it is bit-identical to the module it replaced.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fourbit.nn.gemm import GemmOps, QuantizedB, QuantizedGemm, conv_ops, linear_ops, matmul_ops, quantize_b
from fourbit.nn.spec import FP32_LAYER, LayerSpec, OperandSpec
from fourbit.scaling import PACT, GradScale, InputSign


class QuantState(nn.Module):
    """A layer's quantization state: its LayerSpec, GradScale, PACT clips (or the activation
    grids' signs) and RNG state."""

    def __init__(self, spec: LayerSpec = FP32_LAYER, seed: int = 0, two_activations: bool = False):
        super().__init__()
        if not isinstance(spec, LayerSpec):
            raise TypeError(f"spec must be a LayerSpec; got {type(spec).__name__}")
        self.spec = spec
        self.gradscale = GradScale(spec.gradscale, max_value=spec.gradscale_top, init=spec.gradscale_init)
        act = spec.activation
        pact = act.scaler == "pact"
        self.pact_a = PACT(act.fmt.bits, act.pact_init) if pact else None
        self.pact_b = PACT(act.fmt.bits, act.pact_init) if pact and two_activations else None
        # SAWB on an unsigned grid: the first input fixes the grid's sign, as PACT's does
        sign = act.sign_from_input and not pact
        self.sign_a = InputSign() if sign else None
        self.sign_b = InputSign() if sign and two_activations else None
        self.register_buffer("rng_state", torch.Generator().manual_seed(seed).get_state())
        # observer(point, x, q, gradscale): called with each GEMM operand x ("A", "W" or "B",
        # "G_dx", "G_dw"; gradients times the GradScale value) and its quantized values q
        self.observer = None

    def unquantize_gradients(self) -> None:
        """From here on the same forward with float32 gradients (LayerSpec.float32_gradients);
        GradScale keeps its state (the buffers a state_dict carries) but no longer adapts."""
        self.spec = self.spec.float32_gradients()
        self.gradscale.rule = "none"

    def take_generator(self) -> torch.Generator | None:
        """A generator at this layer's RNG state (None when nothing is random)."""
        if not self.spec.stochastic:
            return None
        gen = torch.Generator()
        gen.set_state(self.rng_state.cpu())  # a CPU generator, wherever the model lives
        return gen

    def return_generator(self, gen: torch.Generator | None) -> None:
        if gen is not None:
            self.rng_state.copy_(gen.get_state())

    def input_sign(self, operand: str) -> InputSign | None:
        """What fixes activation `a`'s (or `b`'s) grid sign: its PACT or its InputSign."""
        pact, sign = (self.pact_a, self.sign_a) if operand == "a" else (self.pact_b, self.sign_b)
        return pact if pact is not None else sign

    def signed(self, operand: str) -> bool:
        sign = self.input_sign(operand)
        return sign is not None and sign.is_signed

    def activation(self, operand: str) -> OperandSpec:
        """The activation spec as activation `a` (or `b`) takes it: on the signed grid where
        SAWB on an unsigned one has seen a negative input."""
        act = self.spec.activation
        return act.for_signed_input if self.signed(operand) else act

    def gemm(self, a: Tensor, b: Tensor, ops: GemmOps, held_b: QuantizedB | None = None) -> Tensor:
        """Run the quantized GEMM family `ops` on (a, b); `held_b` is b from `hold_weight`."""
        alphas = []
        for operand, pact, x in (("a", self.pact_a, a), ("b", self.pact_b, b)):
            sign = self.input_sign(operand)
            if sign is not None:
                sign.observe(x)
            alphas.append(pact.clip_level() if pact is not None else None)
        inputs = (a, b, *alphas)
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
        return QuantizedGemm.apply(a, b, *alphas, self, ops, keep, held_b)

    def hold_weight(self, w: Tensor, ops: GemmOps) -> QuantizedB:
        """The weight w quantized once, for several `gemm(..., held_b=)` calls that would
        each quantize the same w the same way (an LSTM's recurrent weight, every step).
        Kept for backward whenever autograd records: the dA GEMM reads it even where w
        itself is frozen."""
        keep = torch.is_grad_enabled()
        gen = self.take_generator()
        with torch.no_grad():
            held = quantize_b(self, w, None, ops, gen, keep)
        self.return_generator(gen)
        return held

    def extra_repr(self) -> str:
        w, a, g = self.spec.describe()
        return f"W={w}, A={a}, G={g}"


def adopt(cls: type[nn.Module], module: nn.Module, spec: LayerSpec, seed: int, **state_kwargs) -> nn.Module:
    """A `cls` instance sharing `module`'s parameters, buffers and settings, plus quant state."""
    q = cls.__new__(cls)
    q.__dict__ = {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    q.quant = QuantState(spec, seed, **state_kwargs)
    return q


class QLinear(nn.Linear):
    """nn.Linear whose three GEMMs are quantized as `spec` says."""

    def __init__(
        self, in_features, out_features, bias=True, spec=FP32_LAYER, seed=0, device=None, dtype=None
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.quant = QuantState(spec, seed)

    @classmethod
    def from_float(cls, module: nn.Linear, spec: LayerSpec, seed: int = 0) -> QLinear:
        return adopt(cls, module, spec, seed)

    def forward(self, x: Tensor) -> Tensor:
        if self.quant.spec.is_fp32:
            return F.linear(x, self.weight, self.bias)
        # explicit sizes, not -1: with in_features 0 (which nn.Linear takes) -1 is ambiguous
        y = self.quant.gemm(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), self.weight, linear_ops())
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _no_row_scales(spec: LayerSpec) -> None:
    if spec.row_scaled:
        raise ValueError(
            "granularity 'row' needs a GEMM that reduces along one axis (Linear, LSTM, matmul); "
            "a convolution reduces over channels and the kernel window, where a row scale does not "
            "factor out: give convolutions a spec with granularity 'tensor' (a recipe role)"
        )


class _QConvNd:
    """What QConv1d / QConv2d share (mixed in before the torch conv class)."""

    def __init__(self, *args, spec: LayerSpec = FP32_LAYER, seed: int = 0, **kwargs):
        _no_row_scales(spec)
        super().__init__(*args, **kwargs)  # the torch conv class
        self.quant = QuantState(spec, seed)

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec, seed: int = 0):
        _no_row_scales(spec)
        return adopt(cls, module, spec, seed)

    def _explicit_padding(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """Turn padding modes and 'same'/'valid' into an explicit pad, so the conv's three
        GEMMs (which take integer padding) see exactly what nn.ConvNd would."""
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0,) * self._dims
        if self.padding == "valid":
            return x, (0,) * self._dims
        if self.padding == "same":
            pads = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size), strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return F.pad(x, pads), (0,) * self._dims
        return x, tuple(self.padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.quant.spec.is_fp32:
            return self._conv_forward(x, self.weight, self.bias)
        x, padding = self._explicit_padding(x)
        ops = conv_ops(
            self._dims, self.stride, padding, self.dilation, self.groups, math.prod(self.kernel_size)
        )
        y = self.quant.gemm(x, self.weight, ops)
        if self.bias is None:
            return y
        return y + self.bias.to(y.dtype).reshape(1, -1, *([1] * self._dims))


class QConv1d(_QConvNd, nn.Conv1d):
    """nn.Conv1d whose three GEMMs are quantized as `spec` says."""

    _dims = 1


class QConv2d(_QConvNd, nn.Conv2d):
    """nn.Conv2d (stride, padding, dilation, groups, depthwise) with quantized GEMMs."""

    _dims = 2


class QMatmul(nn.Module):
    """`a @ b` where both operands are activations (attention scores, attention × values).

    Models put a QMatmul where they multiply two activations; `convert` gives it a spec.
    `probabilities=True` marks `a` as attention probabilities (softmax × values), which
    convert gives the recipe's `attention_probs` role: their spread of magnitudes suits
    another grid than the queries' and keys'.
    """

    def __init__(self, spec: LayerSpec = FP32_LAYER, seed: int = 0, probabilities: bool = False):
        super().__init__()
        self.probabilities = probabilities
        self.quant = QuantState(spec, seed, two_activations=True)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.quant.spec.is_fp32:
            return torch.matmul(a, b)
        return self.quant.gemm(a, b, matmul_ops())

    def extra_repr(self) -> str:
        return "probabilities=True" if self.probabilities else ""
