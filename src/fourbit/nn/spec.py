"""What a quantized layer does to each of its operands: frozen, validated specs.

A `LayerSpec` says, for one layer, how the weight, the activation and the output gradient
(once for the dX GEMM, once for the dW GEMM) are quantized, and how the gradient is
scaled. Recipes (`fourbit.recipes`) are named collections of LayerSpecs.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from fourbit import formats
from fourbit.formats import BlockFormat, Format, IntFormat, LogFormat
from fourbit.scaling import GRADSCALE_RULES

SCALERS = ("none", "sawb", "mse", "pact", "max", "fixed")
CLIP_FITS = ("sawb", "mse")  # scalers that fit a clip to each tensor from its statistics
GRANULARITIES = ("tensor", "row")
ACCUMULATE = ("fp32", "fp16")


@dataclass(frozen=True)
class OperandSpec:
    """How one GEMM operand is quantized.

    format:    a `fourbit.formats` name, or None for float32 (no quantization);
    scaler:    `sawb` (weights), `mse` (the clip that minimizes the estimated quantization
               MSE, `scaling.mse_scale`), `pact` (activations, learnable clip), `max` (this
               tensor's amax), `fixed` (`scale`), or `none` (scale 1: float formats, block
               formats that carry their own scales, gradients scaled by GradScale). An
               activation with `pact`, or with `sawb` or `mse` on an unsigned format (`uint4`), takes the
               unsigned grid where its first input is nonnegative and the signed grid of
               the same width where not (`scaling.InputSign`);
    rounding:  one of the format's roundings, None for its default;
    underflow: LogFormat only: `nearest` or `stochastic` (LUQ);
    scale:     the `fixed` scaler's scale;
    pact_init: PACT's initial clip alpha (None: the first batch's max |x|);
    granularity: `tensor` (one scale per tensor, the paper's) or `row` (`sawb` and `max`
               only): one scale per row along the GEMM's reduction axis, e.g. per token for
               a Linear layer's input. A row scale factors out of the integer GEMM as an
               output rescale; the backward GEMM that reduces over another axis gets the
               operand quantized again with its rows along that axis (as block formats do).
    """

    format: str | None = None
    scaler: str = "none"
    rounding: str | None = None
    underflow: str | None = None
    scale: float = 1.0
    pact_init: float | None = None
    granularity: str = "tensor"

    def __post_init__(self):
        if self.scaler not in SCALERS:
            raise ValueError(f"scaler must be one of {SCALERS}; got {self.scaler!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}; got {self.granularity!r}")
        if self.granularity == "row" and self.scaler not in ("sawb", "max"):
            raise ValueError(
                f"granularity 'row' fits a scale to each row: it needs scaler 'sawb' or 'max'; "
                f"got {self.scaler!r}"
            )
        if self.format is None:
            if self.scaler != "none" or self.rounding or self.underflow:
                raise ValueError("a float32 operand (format=None) takes no scaler, rounding or underflow")
            return
        fmt = formats.get(self.format)  # ValueError listing the names
        if self.scaler in (*CLIP_FITS, "pact") and not isinstance(fmt, IntFormat):
            raise ValueError(f"scaler {self.scaler!r} needs an integer format; got {self.format!r}")
        if self.rounding is not None and self.rounding not in fmt.roundings:
            raise ValueError(
                f"rounding must be one of {fmt.roundings} for {self.format}; got {self.rounding!r}"
            )
        if self.underflow is not None and not isinstance(fmt, LogFormat):
            raise ValueError(f"underflow is a LogFormat option; {self.format!r} is not one")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0; got {self.scale!r}")
        if self.pact_init is not None and not self.pact_init > 0:
            raise ValueError(f"pact_init must be > 0; got {self.pact_init!r}")

    @functools.cached_property  # read on every GEMM call: build the Format once
    def fmt(self) -> Format | None:
        if self.format is None:
            return None
        fmt = formats.get(self.format)
        return dataclasses.replace(fmt, underflow=self.underflow) if self.underflow else fmt

    @property
    def stochastic(self) -> bool:
        return self.rounding == "stochastic" or self.underflow == "stochastic"

    @property
    def sign_from_input(self) -> bool:
        """Whether the first input fixes the grid's sign (PACT, or SAWB / MSE on an unsigned grid)."""
        unsigned_fit = self.scaler in CLIP_FITS and isinstance(self.fmt, IntFormat) and not self.fmt.signed
        return self.scaler == "pact" or unsigned_fit

    @functools.cached_property
    def for_signed_input(self) -> OperandSpec:
        """This spec for an input with negative values: SAWB or MSE on an unsigned grid takes
        the signed grid of the same width (the unsigned one would send every negative value
        to 0); any other spec is itself (PACT picks its grid in its own module)."""
        if self.scaler in CLIP_FITS and self.sign_from_input:
            return dataclasses.replace(self, format=IntFormat(self.fmt.bits).name)
        return self

    @property
    def is_block(self) -> bool:
        return isinstance(self.fmt, BlockFormat)

    @property
    def follows_axis(self) -> bool:
        """Whether the scales run along the GEMM's reduction axis (1-D blocks, row scales), so
        that each GEMM gets the operand quantized along its own reduction axis."""
        if self.is_block:
            return len(self.fmt.block_shape) == 1
        return self.granularity == "row"

    def describe(self) -> str:
        if self.format is None:
            return "fp32"
        if self.scaler == "pact":  # the grid (unsigned or signed) is fixed by the first input
            return f"int{self.fmt.bits} (pact)"
        scaler = "" if self.scaler == "none" else self.scaler
        if self.sign_from_input:
            scaler += f"; int{self.fmt.bits} if signed"
        if self.granularity == "row":
            scaler += " per row"
        extra = [s for s in (scaler, self.rounding or "") if s]
        return self.format + (f" ({', '.join(extra)})" if extra else "")


FP32 = OperandSpec()


@dataclass(frozen=True)
class LayerSpec:
    """The three GEMMs of one layer (SPEC §4).

    forward   Y  = Q_A(X) ⊛ Q_W(W)
    dX GEMM   dX = Q_Gx(s·dY) ⊛ᵀ Q_W(W) / s
    dW GEMM   dW = Q_A(X)ᵀ ⊛ Q_Gw(s·dY) / s
    s is the layer's GradScale (`gradscale` rule, starting at `gradscale_init`, putting the
    max |s·dY| near `gradscale_max`, by default the gradient format's top value). With
    `tpr` (two-phase rounding) the gradient is quantized twice, on phase `dx_phase` for dX
    and `dw_phase` for dW; without it, one quantization (phase 0) feeds both GEMMs.
    `accumulate="fp16"` emulates chunked fp16 accumulation (chunks of 64 along the
    reduction axis). `hadamard_dw` applies a random 16×16 Hadamard transform along the
    reduction axis of the dW GEMM (NVFP4).
    """

    weight: OperandSpec = FP32
    activation: OperandSpec = FP32
    grad_dx: OperandSpec = FP32
    grad_dw: OperandSpec = FP32
    tpr: bool = False
    dx_phase: int = 1
    dw_phase: int = 0
    gradscale: str = "none"
    gradscale_init: float = 1.0
    gradscale_max: float | None = None
    accumulate: str = "fp32"
    hadamard_dw: bool = False

    def __post_init__(self):
        if self.gradscale not in GRADSCALE_RULES:
            raise ValueError(f"gradscale must be one of {GRADSCALE_RULES}; got {self.gradscale!r}")
        if self.accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {ACCUMULATE}; got {self.accumulate!r}")
        if self.weight.scaler == "pact":
            raise ValueError(
                "weights cannot use the PACT scaler (it clips activations); use sawb, mse or max"
            )
        for role in ("grad_dx", "grad_dw"):
            if getattr(self, role).scaler not in ("none",):
                raise ValueError(f"{role} is scaled by GradScale; its scaler must be 'none'")
        if self.tpr:
            for role in ("grad_dx", "grad_dw"):
                if not isinstance(getattr(self, role).fmt, LogFormat):
                    raise ValueError(f"tpr (two-phase rounding) needs log-format gradients; {role} is not")
            if {self.dx_phase, self.dw_phase} != {0, 1}:
                raise ValueError("with tpr, dx_phase and dw_phase must be 0 and 1 in some order")
        if self.gradscale != "none" and self.grad_dx.format is None:
            raise ValueError("gradscale needs a quantized gradient format")
        if self.hadamard_dw and self.activation.sign_from_input:
            raise ValueError(
                "hadamard_dw turns the raw activation, which makes it signed: it cannot follow a "
                "PACT clip or an unsigned grid; give the activation a signed or block format"
            )
        if self.gradscale_max is not None and not self.gradscale_max > 0:
            raise ValueError(f"gradscale_max must be > 0; got {self.gradscale_max!r}")
        if not self.gradscale_init > 0:
            raise ValueError(f"gradscale_init must be > 0; got {self.gradscale_init!r}")

    @property
    def gradscale_top(self) -> float:
        """The value GradScale aims the largest scaled gradient at."""
        if self.gradscale_max is not None:
            return self.gradscale_max
        fmt = self.grad_dx.fmt
        return 1.0 if fmt is None else fmt.max_value()

    @property
    def row_scaled(self) -> bool:
        """Whether the weight or the activation has one scale per row (granularity `row`)."""
        return "row" in (self.weight.granularity, self.activation.granularity)

    @property
    def is_fp32(self) -> bool:
        return self == FP32_LAYER

    @property
    def stochastic(self) -> bool:
        ops = (self.weight, self.activation, self.grad_dx, self.grad_dw)
        return self.hadamard_dw or any(op.stochastic for op in ops)

    def float32_gradients(self) -> LayerSpec:
        """This layer's forward with its gradients left unquantized: one float32 gradient into
        both backward GEMMs, no Hadamard turn, a GradScale that no longer adapts (what it
        multiplies, it divides back: exact in float32 for a power of two). The reference that
        isolates what the gradient quantizer does from what the quantized forward does."""
        return dataclasses.replace(self, grad_dx=FP32, grad_dw=FP32, tpr=False, gradscale="none",
                                   hadamard_dw=False)  # fmt: skip

    def phases(self) -> tuple[int, int]:
        """(phase for the dX gradient, phase for the dW gradient)."""
        return (self.dx_phase, self.dw_phase) if self.tpr else (0, 0)

    def describe(self) -> tuple[str, str, str]:
        g = self.grad_dx.describe()
        if self.grad_dw != self.grad_dx:
            g += " / " + self.grad_dw.describe()
        if self.tpr:
            g += ", TPR"
        if self.gradscale != "none":
            g += f", GradScale {self.gradscale}"
        return self.weight.describe(), self.activation.describe(), g


FP32_LAYER = LayerSpec()
