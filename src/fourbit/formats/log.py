"""Logarithmic 4-bit floats for gradients: sign + exponent, no mantissa (radix-4 FP4)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fourbit.formats import kernels
from fourbit.formats.base import Format, exp2i, floor_log2, random_uniform

_SIGN_BIT = -(2**31)
_TABLES: dict[tuple, Tensor] = {}  # rounding tables of _round_table, by format, phase and device
# mantissa field of the smallest float32 >= sqrt(2)·2**e: the geometric midpoint of a binade
_SQRT2_MANTISSA = math.ceil((math.sqrt(2) - 1) * 2**23)


def _float32_at_or_above(v: float) -> float:
    """The smallest float32 >= v, so `a >= it` equals `a >= v` for every float32 a."""
    f = np.float32(v)
    return float(f if float(f) >= v else np.nextafter(f, np.float32(np.inf)))


@dataclass(frozen=True, repr=False)
class LogFormat(Format):
    """Sign bit + `exponent_bits` exponent bits; the values are a power of `radix` apart.

    Grid (scale s, phase p in {0, 1}, K = 2**exponent_bits - 2):
        0  and  ±s · 2**p · radix**(-k)   for k = 0 ... K
    Radix-4 FP4 = LogFormat(4, 3): seven magnitudes s·2**p ... s·2**p·4**-6, and zero
    (choice: exponent code 0 encodes zero). Phase 1 is the phase-0 grid times two, so the
    two phases of radix 4 together hold every power of two (two-phase rounding).

    Rounding between neighbours lo < hi (both on the grid):
    - `nearest` (choice, default): linear midpoint; hi when |x| >= (lo + hi) / 2, so ties
      go to the larger magnitude (radix 4: threshold 2.5·lo);
    - `log`: geometric midpoint; hi when |x| >= sqrt(radix)·lo (radix 4: 2·lo);
    - `stochastic`: hi with probability (|x| - lo) / (hi - lo), unbiased.
    Below the smallest magnitude m, `underflow` decides: `nearest` gives m when
    |x| >= m/2 else 0; `stochastic` (LUQ) gives m with probability |x|/m.
    Above the largest magnitude (±inf too) the value saturates; NaN stays NaN.

    Codes: uint8 `sign << exponent_bits | e`, e = 0 for zero, e = K + 1 - k for 2**p·radix**-k
    (larger code, larger magnitude).
    """

    radix: int = 4
    exponent_bits: int = 3
    underflow: str = "nearest"
    name: str = field(default="", compare=False)

    roundings = ("nearest", "log", "stochastic")
    phases = (0, 1)

    def __post_init__(self):
        if not isinstance(self.radix, int) or self.radix < 2 or self.radix & (self.radix - 1):
            raise ValueError(f"radix must be a power of two >= 2 (2, 4, 8, ...); got {self.radix!r}")
        if not isinstance(self.exponent_bits, int) or not 1 <= self.exponent_bits <= 7:
            raise ValueError(f"exponent_bits must be an integer in 1..7; got {self.exponent_bits!r}")
        if self.underflow not in ("nearest", "stochastic"):
            raise ValueError(f"underflow must be 'nearest' or 'stochastic'; got {self.underflow!r}")
        if self.radix ** (2**self.exponent_bits - 2) > 2.0**125:
            raise ValueError(
                "radix ** (2**exponent_bits - 2) exceeds float32's range; use fewer exponent bits"
            )
        if not self.name:
            object.__setattr__(self, "name", f"fp{self.bits}_radix{self.radix}")

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits

    @property
    def levels(self) -> int:
        """Number of nonzero magnitudes (K + 1)."""
        return 2**self.exponent_bits - 1

    @property
    def _shift(self) -> int:
        return self.radix.bit_length() - 1  # log2(radix)

    def _round(self, y: Tensor, phase: int, rounding: str, generator) -> Tensor:
        if self.table_lookup(rounding):
            return self._round_table(y, phase, rounding)
        if rounding == "stochastic" or self.underflow == "stochastic":
            return self._round_reference(y, phase, rounding, generator)
        return self._round_bits(y, phase, rounding)

    def table_lookup(self, rounding: str) -> bool:
        """Whether `rounding` is a table look-up (see _round_table)."""
        even_log = rounding == "log" and self._shift % 2 == 0
        return self.underflow == "nearest" and (rounding == "nearest" or even_log)

    def table(self, phase: int, rounding: str, device) -> tuple[Tensor, int, int]:
        """(table, shift, mask): the rounded magnitude of y is table[(bits(y) >> shift) & mask]."""
        j = self._shift
        key = (self.radix, self.exponent_bits, phase, rounding, device)
        table = _TABLES.get(key)
        if table is None:
            index = torch.arange(2 ** (8 + j), dtype=torch.int32, device=device)
            table = _TABLES[key] = self._round_bits((index << (23 - j)).view(torch.float32), phase, rounding)
        return table, 23 - j, 2 ** (8 + j) - 1

    def _round_table(self, y: Tensor, phase: int, rounding: str) -> Tensor:
        """Nearest rounding as one table look-up: its result depends only on the exponent
        field and the top log2(radix) mantissa bits (so does `log` rounding for even powers
        of two), so a 2**(8 + j)-entry table of `_round_bits` results is exact."""
        table, shift, mask = self.table(phase, rounding, y.device)
        index = (y.contiguous().view(torch.int32) >> shift) & mask
        q = torch.copysign(table[index], y)
        return torch.where(y != y, y, q)  # NaN stays NaN, whatever its payload

    def _quantize_fast(self, x: Tensor, scale: float, phase: int, rounding: str, generator) -> Tensor | None:
        if rounding == "stochastic":  # the draws of _round_reference, in its order
            u_round = random_uniform(x, generator)
            u_under = random_uniform(x, generator) if self.underflow == "stochastic" else None
            return kernels.log_stochastic(x, scale, phase, self._shift, self.levels - 1, u_round, u_under)
        if not self.table_lookup(rounding):
            return None
        table, shift, mask = self.table(phase, rounding, x.device)
        return kernels.table_quantize(x, [table], shift, mask, scale)[0]

    def _round_bits(self, y: Tensor, phase: int, rounding: str) -> Tensor:
        """Nearest / log rounding read off the float32 bit pattern (integer ops only).

        With e = floor(log2|y|) and d = (e - p) mod j (radix 2**j), the grid point below |y|
        is 2**(e - d). The linear midpoint to the next one, (1 + 2**j)/2 · 2**(e - d), lies in
        the binade d = j - 1 at mantissa 1 + 2**-j; the geometric one at 2**(e - d + j/2)."""
        j = self._shift
        bottom = phase - j * (self.levels - 1)
        bits = y.contiguous().view(torch.int32)
        mag = bits & 0x7FFFFFFF
        e = (mag >> 23) - 127  # -127 for zero and subnormals (all below the grid), 128 for inf/NaN
        mant = mag & 0x7FFFFF
        d = torch.remainder(e - phase, j)
        if rounding == "log":
            half = j // 2
            up = d >= half if j % 2 == 0 else (d > half) | ((d == half) & (mant >= _SQRT2_MANTISSA))
        else:
            up = (d == j - 1) & (mant >= 1 << (23 - j))
        out = (e - d + j * up.to(torch.int32)).clamp(max=phase)  # saturate at the top, inf included
        below = torch.where(e == bottom - 1, bottom, -127).to(torch.int32)  # m if |y| >= m/2, else 0
        out = torch.where(e < bottom, below, out)
        q = (bits & _SIGN_BIT) | ((out + 127) << 23)
        return torch.where(mag > 0x7F800000, bits, q).view(torch.float32)

    def _round_reference(self, y: Tensor, phase: int, rounding: str, generator) -> Tensor:
        """The plain definition: neighbours lo < hi on the grid, then the rounding rule."""
        a = y.abs()
        j, kmax = self._shift, self.levels - 1
        # k: index of the largest grid magnitude 2**(p - j·k) that is <= a (k = ceil((p - e)/j))
        k = -torch.div(floor_log2(a) - phase, j, rounding_mode="floor")
        kc = k.clamp(1, kmax + 1)
        hi = exp2i(phase - j * (kc - 1))
        lo = torch.where(k > kmax, torch.zeros_like(hi), hi / self.radix)
        underflow = lo == 0

        if rounding == "stochastic":
            up = random_uniform(a, generator) * (hi - lo) < (a - lo)
        elif rounding == "log":
            up = a >= lo * _float32_at_or_above(math.sqrt(self.radix))
        else:
            up = a >= (lo + hi) / 2
        if self.underflow == "stochastic":
            up_underflow = random_uniform(a, generator) * hi < a
        else:
            up_underflow = a >= hi / 2
        up = torch.where(underflow, up_underflow, up)

        q = torch.where(up, hi, lo)
        q = torch.where((k <= 0) | torch.isinf(a), torch.full_like(q, 2.0**phase), q)  # saturate
        q = torch.where(a == 0, torch.zeros_like(q), q)
        return torch.where(torch.isnan(y), y, torch.copysign(q, y))

    def _to_codes(self, q: Tensor, phase: int) -> Tensor:
        a = q.abs()
        k = torch.div(phase - floor_log2(a), self._shift, rounding_mode="floor")
        e = torch.where(a == 0, torch.zeros_like(k), self.levels - k)
        sign = torch.signbit(q).to(torch.int32) << self.exponent_bits
        return (sign | e).to(torch.uint8)

    def _from_codes(self, codes: Tensor, phase: int) -> Tensor:
        c = codes.to(torch.int32)
        e = c & (2**self.exponent_bits - 1)
        mag = exp2i(phase - self._shift * (self.levels - e))
        mag = torch.where(e == 0, torch.zeros_like(mag), mag)
        return torch.where(c >> self.exponent_bits == 1, -mag, mag)

    def _all_codes(self) -> Tensor:
        return torch.arange(2**self.bits)
