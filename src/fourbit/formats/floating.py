"""Minifloats: fp16, bf16, the fp8 formats, HFP8 and the fp4 e2m1 element of MXFP4/NVFP4."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fourbit.formats import kernels
from fourbit.formats.base import Format, ScaleLike, exp2i, floor_log2, random_uniform, round_half_even

SPECIALS = ("ieee", "fn", "finite")
# (exponent bits, mantissa bits, bias, specials) -> the torch dtype with that grid
_TORCH_DTYPES = {
    (5, 10, 15, "ieee"): torch.float16,
    (8, 7, 127, "ieee"): torch.bfloat16,
    (4, 3, 7, "fn"): torch.float8_e4m3fn,
    (5, 2, 15, "ieee"): torch.float8_e5m2,
}


@dataclass(frozen=True, repr=False)
class FloatFormat(Format):
    """Sign, `exponent_bits` exponent bits (bias `bias`), `mantissa_bits` stored mantissa bits.

    Grid: normals ±(1 + m/2**M)·2**(f - bias) for exponent fields f >= 1; subnormals
    ±(m/2**M)·2**(1 - bias) for f = 0 (with `subnormals=False` the only such value is 0,
    and magnitudes below the smallest normal n go to n when >= n/2, else to 0).
    `specials` says which codes are not numbers:
    - `ieee`: the all-ones exponent holds ±inf (mantissa 0) and NaN (fp16, bf16, e5m2);
    - `fn`: only all-ones exponent and mantissa is NaN, no inf (OCP fp8 e4m3, max 448);
    - `finite`: every code is a number (fp4 e2m1, max 6).
    `max_value` (default: the largest finite code) may lower the top of the grid.

    Rounding: `nearest` is round-to-nearest-even on the mantissa, exactly like IEEE casts;
    `stochastic` rounds up with probability equal to the discarded fraction of an ulp.
    Overflow: `saturate` (default) clamps to ±max_value, ±inf included; `inf` behaves like
    an IEEE cast: what rounds above max_value becomes ±inf (NaN where the format has no
    inf). NaN stays NaN. Codes are the bit patterns: uint8 up to 8 bits, int16 above.
    """

    exponent_bits: int
    mantissa_bits: int
    bias: int | None = None
    subnormals: bool = True
    specials: str = "ieee"
    max_value_override: float | None = None
    overflow: str = "saturate"
    name: str = field(default="", compare=False)

    def __post_init__(self):
        E, M = self.exponent_bits, self.mantissa_bits
        if not isinstance(E, int) or not 1 <= E <= 8:
            raise ValueError(f"exponent_bits must be an integer in 1..8; got {E!r}")
        if not isinstance(M, int) or not 0 <= M <= 23:
            raise ValueError(f"mantissa_bits must be an integer in 0..23; got {M!r}")
        if 1 + E + M > 16:
            raise ValueError(f"a FloatFormat has at most 16 bits; got 1 + {E} + {M}")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (E - 1) - 1)
        if self.specials not in SPECIALS:
            raise ValueError(f"specials must be one of {SPECIALS}; got {self.specials!r}")
        if self.specials == "fn" and M == 0:
            raise ValueError("specials='fn' needs mantissa_bits >= 1")
        if self.overflow not in ("saturate", "inf"):
            raise ValueError(f"overflow must be 'saturate' or 'inf'; got {self.overflow!r}")
        if self.overflow == "inf" and self.specials == "finite":
            raise ValueError("overflow='inf' needs a format with inf or NaN codes (specials 'ieee' or 'fn')")
        if self.emin - M < -149 or self._top_field - self.bias > 127:
            raise ValueError("this format's range does not fit in float32; adjust bias or exponent_bits")
        if self.max_value_override is not None:
            mv = self.max_value_override
            grid = super().values()
            if not (mv > 0 and bool((grid == mv).any())):
                raise ValueError(f"max_value_override must be a positive value on the grid; got {mv!r}")
        if not self.name:
            object.__setattr__(self, "name", f"fp{self.bits}_e{E}m{M}")

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def emin(self) -> int:
        return 1 - self.bias

    @property
    def has_nan_code(self) -> bool:
        return self.specials != "finite"

    @property
    def _top_field(self) -> int:
        """Largest exponent field holding finite numbers."""
        return 2**self.exponent_bits - (2 if self.specials == "ieee" else 1)

    @property
    def _natural_max(self) -> float:
        M = self.mantissa_bits
        top_mantissa = 2**M - (2 if self.specials == "fn" else 1)
        return (1 + top_mantissa / 2**M) * 2.0 ** (self._top_field - self.bias)

    @property
    def _max(self) -> float:
        return self._natural_max if self.max_value_override is None else self.max_value_override

    def _round(self, y: Tensor, phase: int, rounding: str, generator) -> Tensor:
        M = self.mantissa_bits
        a = y.abs()
        quantum = exp2i(floor_log2(a).clamp(min=self.emin) - M)  # one ulp at a's binade
        t = a / quantum  # exact: a power-of-two division
        if rounding == "stochastic":
            r = torch.floor(t)
            r = r + (random_uniform(t, generator) < (t - r)).to(t.dtype)
        else:
            r = round_half_even(t)
        q = r * quantum
        if not self.subnormals:
            n = 2.0**self.emin
            q = torch.where(a < n, torch.where(a >= n / 2, n, 0.0), q)
        q = torch.where((q > self._max) | torch.isinf(a), torch.full_like(q, self._overflow_value), q)
        return torch.where(torch.isnan(y), y, torch.copysign(q, y))

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype holding exactly this grid, when there is one (then, clamped to
        ±max_value, its cast is `nearest` rounding with saturation: see `cast`)."""
        if not self.subnormals or self.max_value_override is not None:
            return None
        key = (self.exponent_bits, self.mantissa_bits, self.bias, self.specials)
        return _TORCH_DTYPES.get(key)

    @property
    def storage_dtype(self) -> torch.dtype | None:
        """The narrowest torch dtype holding every value of this grid exactly: `torch_dtype`,
        else float16 or bfloat16 when the grid's precision and range fit in it."""
        if self.torch_dtype is not None:
            return self.torch_dtype
        for dtype in (torch.float16, torch.bfloat16):
            info = torch.finfo(dtype)
            mantissa, smallest = round(-math.log2(info.eps)), info.tiny * info.eps
            if (
                self.mantissa_bits <= mantissa
                and self._max <= info.max
                and 2.0 ** (self.emin - self.mantissa_bits) >= smallest
            ):
                return dtype
        return None

    def cast(self, y: Tensor) -> Tensor:
        """y (float32, unit scale) rounded onto this grid, as a `torch_dtype` tensor; saturating."""
        return y.clamp(-self._max, self._max).to(self.torch_dtype)

    @property
    def _overflow_value(self) -> float:
        """What a magnitude above max_value becomes."""
        if self.overflow == "saturate":
            return self._max
        return float("inf") if self.specials == "ieee" else float("nan")

    def _quantize_fast(self, x: Tensor, scale: float, phase: int, rounding: str, generator) -> Tensor | None:
        if not self.subnormals or self.emin < -126:
            return None
        u = random_uniform(x, generator) if rounding == "stochastic" else None
        M, top = self.mantissa_bits, self._overflow_value
        return kernels.float_quantize(x, scale, M, self.emin, self._max, top, u)

    def _to_codes(self, q: Tensor, phase: int) -> Tensor:
        E, M = self.exponent_bits, self.mantissa_bits
        a = q.abs()
        e = floor_log2(a).clamp(min=self.emin)
        subnormal = a < 2.0**self.emin
        fld = torch.where(subnormal, 0, e + self.bias)
        mant = torch.where(subnormal, a / 2.0 ** (self.emin - M), a / exp2i(e - M) - 2**M)
        mant = torch.nan_to_num(mant, nan=0.0, posinf=0.0).to(torch.int32)
        all_ones = 2**E - 1
        if self.specials == "ieee":
            fld = torch.where(torch.isfinite(a), fld, all_ones)
            mant = torch.where(torch.isnan(a), 1 << max(M - 1, 0), mant)
        elif self.specials == "fn":
            nan = torch.isnan(a)
            fld = torch.where(nan, all_ones, fld)
            mant = torch.where(nan, 2**M - 1, mant)
        sign = torch.signbit(q).to(torch.int32)
        code = (sign << (E + M)) | (fld << M) | mant
        return code.to(torch.uint8) if self.bits <= 8 else code.to(torch.int16)

    def _from_codes(self, codes: Tensor, phase: int) -> Tensor:
        E, M = self.exponent_bits, self.mantissa_bits
        c = codes.to(torch.int32) & (2**self.bits - 1)
        fld = (c >> M) & (2**E - 1)
        mant = (c & (2**M - 1)).to(torch.float32)
        normal = (mant + 2**M) * exp2i(fld - self.bias - M)
        v = torch.where(fld == 0, mant * 2.0 ** (self.emin - M), normal)
        all_ones = fld == 2**E - 1
        if self.specials == "ieee":
            v = torch.where(all_ones, torch.where(mant == 0, float("inf"), float("nan")), v)
        elif self.specials == "fn":
            v = torch.where(all_ones & (mant == 2**M - 1), float("nan"), v)
        return torch.where((c >> (E + M)) == 1, -v, v)

    def _all_codes(self) -> Tensor:
        codes = torch.arange(2**self.bits)
        if not self.subnormals:
            fld = (codes >> self.mantissa_bits) & (2**self.exponent_bits - 1)
            codes = codes[(fld != 0) | (codes & (2**self.mantissa_bits - 1) == 0)]
        return codes

    def values(self, scale: ScaleLike = 1.0, phase: int = 0) -> Tensor:
        v = super().values(scale, phase)
        if self.max_value_override is not None:
            v = v[v.abs() <= self.max_value_override * scale]
        return v
