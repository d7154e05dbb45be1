"""Linear integer grids (INT4 weights and activations) and the 4-bit pixel mapping."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fourbit.formats import kernels
from fourbit.formats.base import Format, random_uniform, round_half_even


@dataclass(frozen=True, repr=False)
class IntFormat(Format):
    """Integer grid `{qmin, ..., qmax} * scale`.

    - signed:            qmin = -2**(bits-1), qmax = 2**(bits-1) - 1   (INT4: -8 ... 7)
    - signed, symmetric: qmin = -qmax                                   (INT4: -7 ... 7)
    - unsigned:          qmin = 0, qmax = 2**bits - 1                   (UINT4: 0 ... 15)

    Rounding: `nearest` is `clamp(round_half_even(x / scale), qmin, qmax)`; ties go to the
    even integer. `stochastic` rounds up with probability `frac(x / scale)`, so it is
    unbiased inside [qmin, qmax]. Outside, both saturate (±inf too); NaN stays NaN.
    Codes are the integers themselves: int8 when signed, uint8 when not.
    """

    bits: int
    signed: bool = True
    symmetric: bool = False
    name: str = field(default="", compare=False)

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8 (codes are one byte); got {self.bits!r}")
        if self.symmetric and (not self.signed or self.bits < 2):
            raise ValueError("symmetric=True needs signed=True and bits >= 2")
        if not self.name:
            kind = ("sym" if self.symmetric else "") + ("int" if self.signed else "uint")
            object.__setattr__(self, "name", f"{kind}{self.bits}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -self.qmax if self.symmetric else -(2 ** (self.bits - 1))

    def _round(self, y: Tensor, phase: int, rounding: str, generator) -> Tensor:
        if rounding == "stochastic":
            lo = torch.floor(y)
            r = lo + (random_uniform(y, generator) < (y - lo)).to(y.dtype)
        else:
            r = round_half_even(y)
        # + 0.0 turns -0.0 into 0.0: an integer has no sign of zero (and its code keeps none)
        return torch.clamp(r, self.qmin, self.qmax) + 0.0

    def _quantize_fast(self, x: Tensor, scale: float, phase: int, rounding: str, generator) -> Tensor | None:
        if rounding != "nearest":
            return None
        return kernels.int_quantize(x, scale, self.qmin, self.qmax)[0]

    def _to_codes(self, q: Tensor, phase: int) -> Tensor:
        return q.to(torch.int8 if self.signed else torch.uint8)

    def _from_codes(self, codes: Tensor, phase: int) -> Tensor:
        return codes.to(torch.float32)

    def _all_codes(self) -> Tensor:
        return torch.arange(self.qmin, self.qmax + 1)


PIXEL_FORMAT = IntFormat(4)


def pixels_to_int4(x: Tensor) -> Tensor:
    """The article's input mapping: a pixel p in [0, 1] -> `round_half_even(15 p - 8)`.

    Returns int8 codes in -8 ... 7 (0 -> -8, 1 -> 7, 0.3 -> -3.5 -> -4). The codes are the
    INT4 input grid with scale 1: the first layer sees exactly these 16 numbers.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError("pixels must be a floating-point tensor in [0, 1] (divide uint8 images by 255)")
    p = x.float()
    if p.numel() and (bool(torch.isnan(p).any()) or p.min() < 0 or p.max() > 1):
        raise ValueError(
            "pixels must lie in [0, 1] with no NaN; got values in "
            f"[{p.min().item()}, {p.max().item()}] (divide uint8 images by 255)"
        )
    return PIXEL_FORMAT.encode(15 * p - 8)
