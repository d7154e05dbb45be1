"""What every number format shares: argument checks and the scale/encode/decode plumbing.

A format is a pure function of its input (no state, no nn). It maps a float tensor onto
its grid and returns the dequantized values ("fake quantization"), or the integer codes.
The contract, for every format:

    quantize(x, scale) == decode(encode(x, scale), scale)
    quantize(x, scale) == scale * q(float32(x) / scale)      q: the format's unit grid

Everything is computed in float32; `quantize` returns `x`'s own dtype. NaN stays NaN.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from fourbit.formats import kernels

ScaleLike = float | Tensor


def check_scale(scale: ScaleLike) -> ScaleLike:
    """`scale` (a tensor as float32: everything is computed in float32); ValueError unless
    every scale is a finite positive number."""
    if isinstance(scale, Tensor) and scale.numel() != 1:
        bad = scale.numel() > 0 and bool(((scale <= 0) | ~torch.isfinite(scale)).any())
    elif isinstance(scale, Tensor):  # one number, checked as one: five tensor ops cost 15x more
        bad = not (math.isfinite(value := float(scale)) and value > 0)
    else:
        bad = not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0)
    if bad:
        raise ValueError(f"scale must be a finite number > 0; got {scale!r}")
    return scale.float() if isinstance(scale, Tensor) else scale


def check_input(x: Tensor) -> Tensor:
    """The float32 working copy of `x`; ValueError for anything but a float tensor."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor; got {x.dtype} (convert with x.float())")
    return x.float()


PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Philox4x32's multipliers and key increments
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
WORD = 0xFFFFFFFF


def _mulhilo(m: int, c: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of m · c (c: int64 tensor of 32-bit words), in int64 without
    overflow: m split into 16-bit halves, each partial product below 2**48."""
    a, b = (m >> 16) * c, (m & 0xFFFF) * c
    return (a + (b >> 16)) >> 16, (((a & 0xFFFF) << 16) + b) & WORD


def philox4x32_10(counter: list[Tensor], key: tuple[int, int]) -> list[Tensor]:
    """Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
    of four int64 tensors of 32-bit counter words under a key of two 32-bit words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W[0]) & WORD, (k1 + PHILOX_W[1]) & WORD
    return [c0, c1, c2, c3]


def philox_uniform(key: tuple[int, int], n: int, device=None) -> Tensor:
    """n float32 draws in [0, 1): draw i is word i % 4 of Philox4x32-10 at counter
    (i // 4, 0, 0, 0), its top 24 bits times 2**-24 (torch.rand's float32 resolution). The
    CPU kernel computes the same draws; this is its oracle and the path on other devices."""
    if n > 4 * 2**32:
        raise ValueError(f"at most 2**34 draws per call (a 32-bit block counter); asked for {n}")
    if torch.device(device or "cpu").type == "cpu" and kernels.available():
        return kernels.philox_uniform(key, n)
    block = torch.arange(-(-n // 4), dtype=torch.int64, device=device)
    zero = torch.zeros_like(block)
    words = torch.stack(philox4x32_10([block, zero, zero, zero], key), 1).reshape(-1)[:n]
    return (words >> 8).float() * 2.0**-24


def random_uniform(like: Tensor, generator: torch.Generator | None, shape: tuple | None = None) -> Tensor:
    """float32 U[0, 1) draws shaped like `like` (or `shape`), on its device: Philox4x32-10
    keyed by two 32-bit words drawn from `generator` (torch's global one when None). The
    generator's state decides the draws, on any device and with or without the kernels."""
    shape = like.shape if shape is None else tuple(shape)
    device = like.device if generator is None else generator.device
    key = torch.randint(0, 2**32, (2,), generator=generator, device=device, dtype=torch.int64).tolist()
    return philox_uniform((key[0], key[1]), math.prod(shape), like.device).reshape(shape)


def round_half_even(y: Tensor) -> Tensor:
    """torch.round rounds ties to even; named so the rule is visible where it is used."""
    return torch.round(y)


def floor_log2(a: Tensor) -> Tensor:
    """floor(log2(a)) for finite a > 0, exact (read from the float's exponent, no log)."""
    return torch.frexp(a).exponent - 1


def exp2i(e: Tensor) -> Tensor:
    """2**e for an integer tensor, exact in float32 down to 2**-149."""
    return torch.exp2(e.to(torch.float32))


class Format(ABC):
    """A number format. Subclasses define the grid on unit scale; this class adds the scale.

    `roundings` lists the rounding rules a format offers; the first is its default.
    """

    name: str
    bits: int
    roundings: ClassVar[tuple[str, ...]] = ("nearest", "stochastic")
    phases: ClassVar[tuple[int, ...]] = (0,)

    # -- the unit grid: subclasses implement these three ---------------------------------
    @abstractmethod
    def _round(self, y: Tensor, phase: int, rounding: str, generator) -> Tensor:
        """float32 y (already divided by scale) -> nearest grid values; NaN stays NaN."""

    @abstractmethod
    def _to_codes(self, q: Tensor, phase: int) -> Tensor:
        """Grid values (output of _round, no NaN unless the format has a NaN code) -> codes."""

    @abstractmethod
    def _from_codes(self, codes: Tensor, phase: int) -> Tensor:
        """Codes -> float32 grid values on unit scale."""

    @abstractmethod
    def _all_codes(self) -> Tensor:
        """Every code of the format (used by values())."""

    has_nan_code: ClassVar[bool] = False

    # -- the public API ------------------------------------------------------------------
    def _check(self, phase: int, rounding: str | None) -> str:
        if phase not in self.phases:
            raise ValueError(f"phase must be one of {self.phases} for {self.name}; got {phase!r}")
        rounding = self.roundings[0] if rounding is None else rounding
        if rounding not in self.roundings:
            raise ValueError(f"rounding must be one of {self.roundings} for {self.name}; got {rounding!r}")
        return rounding

    def _prepare(self, x: Tensor, scale: ScaleLike, phase: int, rounding: str | None) -> tuple[Tensor, str]:
        """Check the arguments; return float32 x / scale and the rounding rule to use."""
        rounding = self._check(phase, rounding)
        scale = check_scale(scale)
        return check_input(x) / scale, rounding

    def quantize(
        self,
        x: Tensor,
        scale: ScaleLike = 1.0,
        phase: int = 0,
        rounding: str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Dequantized values of `x` on this grid times `scale`, in `x`'s dtype."""
        rounding = self._check(phase, rounding)
        scale = check_scale(scale)
        x32 = check_input(x)
        s = kernels.scalar(scale)
        fast = s is not None and kernels.applies(x32)
        q = self._quantize_fast(x32, s, phase, rounding, generator) if fast else None
        if q is None:
            q = self._round(x32 / scale, phase, rounding, generator) * scale
        return q.to(x.dtype)

    def _quantize_fast(self, x: Tensor, scale: float, phase: int, rounding: str, generator) -> Tensor | None:
        """quantize() of a CPU float32 `x` by a one-pass kernel (formats/kernels.c), bit-equal
        to the definition (stochastic rounding: from the same draws of `generator`); None
        where no kernel covers this case."""
        return None

    def encode(
        self,
        x: Tensor,
        scale: ScaleLike = 1.0,
        phase: int = 0,
        rounding: str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Integer codes of `x / scale` on this grid (uint8/int8, int16 for 16-bit formats)."""
        y, rounding = self._prepare(x, scale, phase, rounding)
        if not self.has_nan_code and bool(torch.isnan(y).any()):
            raise ValueError(
                f"{self.name} has no code for NaN; found NaN in x "
                "(use quantize(), which keeps NaN, or remove the NaN first)"
            )
        return self._to_codes(self._round(y, phase, rounding, generator), phase)

    def decode(self, codes: Tensor, scale: ScaleLike = 1.0, phase: int = 0) -> Tensor:
        """float32 values of `codes` times `scale`."""
        self._check(phase, None)
        scale = check_scale(scale)
        return self._from_codes(codes, phase) * scale

    def values(self, scale: ScaleLike = 1.0, phase: int = 0) -> Tensor:
        """Every finite representable value times `scale`, sorted, float32, zero once."""
        self._check(phase, None)
        scale = check_scale(scale)
        v = self._from_codes(self._all_codes(), phase)
        v = v[torch.isfinite(v)]
        return torch.unique(torch.where(v == 0, torch.zeros_like(v), v)) * scale

    def max_value(self, phase: int = 0) -> float:
        return float(self.values(phase=phase)[-1])

    def min_positive(self, phase: int = 0) -> float:
        v = self.values(phase=phase)
        return float(v[v > 0][0])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
