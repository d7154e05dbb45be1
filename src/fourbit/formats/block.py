"""Block-scaled fp4: MXFP4 (OCP MX v1.0) and NVFP4 (NVIDIA 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fourbit.formats import kernels
from fourbit.formats.base import (
    Format,
    ScaleLike,
    check_input,
    check_scale,
    exp2i,
    floor_log2,
    random_uniform,
)
from fourbit.formats.floating import FloatFormat

FP4_E2M1 = FloatFormat(2, 1, bias=1, specials="finite", name="fp4_e2m1")
FP8_E4M3 = FloatFormat(4, 3, specials="fn", name="fp8_e4m3")
E8M0_BIAS, E8M0_NAN = 127, 255
NVFP4_TENSOR_RANGE = 6.0 * 448.0  # e2m1 max times e4m3 max


def _float32(x: Tensor) -> Tensor:
    """check_input(x), except that a finite float64 beyond float32's range becomes float32's
    largest value (it saturates, as the class docstring says) rather than ±inf (a NaN block)."""
    y = check_input(x)
    if x.dtype == torch.float64:
        big = torch.finfo(torch.float32).max
        y = torch.where(torch.isfinite(x), x.clamp(-big, big), x).float()
    return y


class BlockCodes(NamedTuple):
    """An encoded block-scaled tensor: everything `decode` needs."""

    codes: Tensor  # uint8 e2m1 codes, the input's shape
    scale_codes: Tensor  # uint8 block scales: E8M0 (MXFP4) or fp8 e4m3 (NVFP4) bit patterns
    tensor_scale: Tensor  # float32 scalar: per-tensor decode scale (1 for MXFP4)
    axis: int  # the axis the 1-D blocks run along


@dataclass(frozen=True, repr=False)
class BlockFormat(Format):
    """fp4 e2m1 elements sharing one scale per block; blocks run along `axis` (default the
    last, i.e. the GEMM reduction axis) or tile the last two dims (`block_shape=(16, 16)`).

    Element grid (unit block scale): 0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6; round to nearest
    even (or `stochastic`), saturating at ±6. A block is zero-padded to full size.
    - `scale_format="e8m0"` (MXFP4, blocks of 32): block scale
      X = 2**(floor(log2(amax_block)) - 2), clamped to 2**-127 ... 2**127; elements x / X.
    - `scale_format="e4m3"` (NVFP4, blocks of 16): tensor decode scale
      d = amax_tensor / (6 · 448) (at least 2**-149; or the `scale` argument); block scale
      s = e4m3(amax_block(x / d) / 6); elements e2m1((x / d) / s); value e · s · d.
    A block whose scale is 0 is all zero. A block holding NaN or ±inf decodes to NaN in
    every element (OCP MX §6.3: its scale is NaN; its element codes are 0); the tensor scale
    ignores them. A finite
    x / d beyond float32's range is clamped to float32's largest value (and saturates).
    """

    block_shape: tuple[int, ...] = (32,)
    scale_format: str = "e8m0"
    name: str = field(default="", compare=False)

    element = FP4_E2M1
    bits = 4

    def __post_init__(self):
        shape = self.block_shape
        if not (
            isinstance(shape, tuple)
            and len(shape) in (1, 2)
            and all(isinstance(b, int) and b > 0 for b in shape)
        ):
            raise ValueError(f"block_shape must be a tuple of 1 or 2 positive ints; got {shape!r}")
        if self.scale_format not in ("e8m0", "e4m3"):
            raise ValueError(f"scale_format must be 'e8m0' or 'e4m3'; got {self.scale_format!r}")
        if not self.name:
            kind = "mxfp4" if self.scale_format == "e8m0" else "nvfp4"
            object.__setattr__(self, "name", f"{kind}_{'x'.join(map(str, shape))}")

    @property
    def block_size(self) -> int:
        return int(torch.tensor(self.block_shape).prod())

    # -- the element grid (unit block scale) ------------------------------------------------
    def _round(self, y, phase, rounding, generator):
        return self.element._round(y, phase, rounding, generator)

    def _to_codes(self, q, phase):
        return self.element._to_codes(q, phase)

    def _from_codes(self, codes, phase):
        return self.element._from_codes(codes, phase)

    def _all_codes(self):
        return self.element._all_codes()

    # -- blocking ----------------------------------------------------------------------------
    def _to_blocks(self, y: Tensor) -> Tensor:
        """[..., n] -> [..., n/B, B] or [..., r, c] -> [..., r/R, c/C, R·C], zero-padded."""
        if len(self.block_shape) == 1:
            (B,) = self.block_shape
            y = F.pad(y, (0, -y.shape[-1] % B))
            return y.reshape(*y.shape[:-1], y.shape[-1] // B, B)
        R, C = self.block_shape
        y = F.pad(y, (0, -y.shape[-1] % C, 0, -y.shape[-2] % R))
        r, c = y.shape[-2:]
        y = y.reshape(*y.shape[:-2], r // R, R, c // C, C).transpose(-3, -2)
        return y.reshape(*y.shape[:-2], R * C)

    def _from_blocks(self, b: Tensor, shape: torch.Size) -> Tensor:
        if len(self.block_shape) == 1:
            return b.reshape(*b.shape[:-2], b.shape[-2] * b.shape[-1])[..., : shape[-1]]
        R, C = self.block_shape
        nr, nc = b.shape[-3], b.shape[-2]
        b = b.reshape(*b.shape[:-3], nr, nc, R, C).transpose(-3, -2)
        return b.reshape(*b.shape[:-4], nr * R, nc * C)[..., : shape[-2], : shape[-1]]

    def _arrange(self, t: Tensor, axis: int) -> Tensor:
        """1-D blocks: `axis` moved last; 2-D blocks: at least two dims."""
        if len(self.block_shape) == 1:
            return t.reshape(1) if t.ndim == 0 else t.movedim(axis, -1)
        return t.reshape((1,) * (2 - t.ndim) + tuple(t.shape)) if t.ndim < 2 else t

    def _unarrange(self, v: Tensor, like: Tensor, axis: int) -> Tensor:
        # (contiguous: a conv given a transposed view answers in channels-last layout, which
        # makes the BatchNorm after it several times slower on the CPU)
        if len(self.block_shape) == 1 and like.ndim > 0:
            return v.movedim(-1, axis).contiguous()
        return v.reshape(like.shape)

    # -- the public API ------------------------------------------------------------------------
    def encode(
        self,
        x: Tensor,
        scale: ScaleLike | None = None,
        phase: int = 0,
        rounding: str | None = None,
        generator: torch.Generator | None = None,
        axis: int = -1,
    ) -> BlockCodes:
        """Element codes, block-scale codes and the tensor scale of `x` (`scale`: one number)."""
        rounding = self._check(phase, rounding)
        x32 = _float32(x)
        y = self._arrange(x32, axis)
        if scale is None:
            scale = self._default_tensor_scale(x32)  # (any layout: x32 has no copy to make)
        scale = check_scale(scale)
        if isinstance(scale, Tensor) and scale.numel() != 1:
            raise ValueError(f"a block format's tensor scale is one number; got shape {tuple(scale.shape)}")
        d = torch.as_tensor(scale, dtype=torch.float32, device=y.device)
        fast = self._kernel(x32, axis, scale, rounding, generator, codes=True)
        if fast is not None:
            return BlockCodes(fast[1], fast[2], d.reshape(()), axis)

        finite = torch.isfinite(self._to_blocks(y))
        bad = ~finite.all(-1)
        # a finite x whose x / d overflows float32 saturates like any other large value
        big = torch.finfo(torch.float32).max
        blocks = torch.where(finite, self._to_blocks(y / d).clamp(-big, big), 0.0)
        amax = blocks.abs().amax(-1)

        if self.scale_format == "e8m0":
            exp = (floor_log2(amax) - 2).clamp(-E8M0_BIAS, E8M0_BIAS)
            exp = torch.where(amax == 0, -E8M0_BIAS, exp)
            scale_codes = torch.where(bad, E8M0_NAN, exp + E8M0_BIAS).to(torch.uint8)
            s = exp2i(exp)
        else:
            scale_codes = FP8_E4M3.encode(amax / 6)
            scale_codes = torch.where(bad, FP8_E4M3.encode(torch.tensor(float("nan"))), scale_codes)
            s = FP8_E4M3.decode(scale_codes)

        safe_s = torch.where(s > 0, s, 1.0).unsqueeze(-1)
        el = self.element._round(blocks / safe_s, phase, rounding, generator)
        el = torch.where(((s > 0) & ~bad).unsqueeze(-1), el, 0.0)
        codes = self._unarrange(self._from_blocks(self.element._to_codes(el, phase), y.shape), x, axis)
        return BlockCodes(codes, scale_codes, d.reshape(()), axis)

    def decode(self, enc: BlockCodes, scale: ScaleLike | None = None, phase: int = 0) -> Tensor:
        """float32 values of an encoded tensor (`scale`, if given, replaces its tensor scale)."""
        self._check(phase, None)
        d = enc.tensor_scale if scale is None else torch.as_tensor(scale, dtype=torch.float32)
        codes = self._arrange(enc.codes, enc.axis)
        if codes.numel() and codes.device.type == "cpu" and kernels.available():
            e4m3 = self.scale_format == "e4m3"
            if len(self.block_shape) == 1:
                axis = enc.axis % max(enc.codes.ndim, 1)
                return kernels.block_decode_axis(
                    enc.codes, enc.scale_codes, axis, self.block_shape[0], float(d), e4m3
                )
            v = kernels.block_decode(codes, enc.scale_codes, self.block_shape, float(d), e4m3)
            return v.reshape(enc.codes.shape)
        if self.scale_format == "e8m0":
            c = enc.scale_codes.to(torch.int32)
            s = torch.where(c == E8M0_NAN, float("nan"), exp2i(c - E8M0_BIAS))
        else:
            s = FP8_E4M3.decode(enc.scale_codes)
        v = self.element._from_codes(self._to_blocks(codes), phase) * s.unsqueeze(-1) * d
        return self._unarrange(self._from_blocks(v, codes.shape), enc.codes, enc.axis)

    def quantize(
        self,
        x: Tensor,
        scale: ScaleLike | None = None,
        phase: int = 0,
        rounding: str | None = None,
        generator: torch.Generator | None = None,
        axis: int = -1,
    ) -> Tensor:
        """Dequantized values of `x`, in its dtype (see the class docstring for the scales)."""
        x32 = _float32(x)
        rounding = self._check(phase, rounding)
        if x32.numel() and kernels.applies(x32):
            scale = check_scale(self._default_tensor_scale(x32) if scale is None else scale)
            fast = self._kernel(x32, axis, scale, rounding, generator, codes=False)
            if fast is not None:
                return fast[0].to(x.dtype)
        return self.decode(self.encode(x, scale, phase, rounding, generator, axis)).to(x.dtype)

    def _kernel(self, x: Tensor, axis: int, scale: ScaleLike, rounding: str, generator, codes: bool):
        """(values, element codes, scale codes) of float32 x from formats/kernels.c, shaped as
        the definition's; None where the kernels do not apply. 1-D blocks are quantized where
        they lie (no transposition of x); their codes are numbered as if `axis` were last."""
        d = kernels.scalar(scale)
        if d is None or not x.numel() or not kernels.applies(x):
            return None
        e4m3 = self.scale_format == "e4m3"
        stochastic = rounding == "stochastic"  # the definition's draws, in its padded block layout
        if len(self.block_shape) == 1:
            (B,) = self.block_shape
            axis = axis % max(x.ndim, 1)
            lead = x.shape[:axis] + x.shape[axis + 1 :]
            grid = (*lead, -(-(x.shape[axis] if x.ndim else 1) // B))
            u = random_uniform(x, generator, (*grid, B)) if stochastic else None
            v, element_codes, scale_codes = kernels.block_quantize_axis(x, axis, B, d, e4m3, codes, u)
            return v, element_codes, (scale_codes.reshape(grid) if codes else None)
        y = self._arrange(x, axis)
        (R, C), r, c = self.block_shape, y.shape[-2], y.shape[-1]
        grid = (*y.shape[:-2], -(-r // R), -(-c // C))
        u = random_uniform(y, generator, (*grid, R * C)) if stochastic else None
        v, element_codes, scale_codes = kernels.block_quantize(y, (R, C), d, e4m3, codes, u)
        if not codes:
            return v.reshape(x.shape), None, None
        return v.reshape(x.shape), element_codes.reshape(x.shape), scale_codes.reshape(grid)

    def values(self, scale: ScaleLike = 1.0, phase: int = 0) -> Tensor:
        """The element grid of one block whose total decode scale is `scale`."""
        return self.element.values(scale, phase)

    def _default_tensor_scale(self, y: Tensor) -> float | Tensor:
        if self.scale_format == "e8m0" or y.numel() == 0:
            return 1.0
        if kernels.applies(y):
            amax = kernels.abs_max(y, finite_only=True)
        else:
            amax = torch.where(torch.isfinite(y), y.abs(), 0.0).amax()
        if amax == 0:
            return 1.0
        # floored at float32's smallest subnormal, so a tensor of subnormals still has a scale
        return (amax / NVFP4_TENSOR_RANGE).clamp(min=2.0**-149)
