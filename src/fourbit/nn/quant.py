"""Quantizing one GEMM operand, and keeping it compactly for backward.

`quantize_operand` returns the dequantized float32 values (what the emulated GEMM uses)
and a `Packed` form (what autograd saves): 4-bit codes two per byte plus the scale, the
values in their own torch dtype (fp16, bf16, fp8), or the format's own codes; never a
float32 copy, except for float32 operands and a tensor holding NaN under an integer grid
(no integer code holds NaN, and the NaN must reach the loss).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from fourbit.formats import BlockCodes, BlockFormat, FloatFormat, Format, IntFormat, kernels
from fourbit.formats.base import check_scale
from fourbit.nn.spec import OperandSpec
from fourbit.scaling import max_scale, mse_scale, sawb_scale


def pack_nibbles(codes: Tensor) -> Tensor:
    """4-bit codes (int8 or uint8, any shape) -> uint8, two per byte (flattened)."""
    flat = codes.reshape(-1).to(torch.uint8) & 0x0F
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(packed: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """Inverse of pack_nibbles; int8 codes are sign-extended from 4 bits."""
    both = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(-1)[: shape.numel()]
    if dtype == torch.int8:
        return ((both.to(torch.int8) ^ 8) - 8).reshape(shape)
    return both.reshape(shape)


def pack_bits(mask: Tensor) -> Tensor:
    """bool tensor -> uint8, eight per byte (flattened)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (flat.reshape(-1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(-1)[: shape.numel()].reshape(shape).bool()


@dataclass
class Packed:
    """A quantized operand as saved for backward; `unpack()` gives the float32 values."""

    fmt: Format | None
    shape: torch.Size
    codes: Tensor | BlockCodes | None = None
    codes_dtype: torch.dtype | None = None
    scale: Tensor | float = 1.0
    values: Tensor | None = None  # float32 operands and NaN-holding tensors only

    def tensors(self) -> list[Tensor]:
        """The tensors to hand to ctx.save_for_backward (so saved-tensor hooks see them)."""
        out = []
        for value in (self.codes, self.scale, self.values):
            if isinstance(value, BlockCodes):
                out += [value.codes, value.scale_codes, value.tensor_scale]
            elif isinstance(value, Tensor):
                out.append(value)
        return out

    def restore(self, saved: Iterator[Tensor]) -> Packed:
        """This Packed with its tensors taken, in order, from `saved` (ctx.saved_tensors)."""
        fields = {}
        for name in ("codes", "scale", "values"):
            value = getattr(self, name)
            if isinstance(value, BlockCodes):
                value = BlockCodes(next(saved), next(saved), next(saved), value.axis)
            elif isinstance(value, Tensor):
                value = next(saved)
            fields[name] = value
        return dataclasses.replace(self, **fields)

    def unpack(self) -> Tensor:
        if self.values is not None:
            return self.values
        fmt = self.fmt
        if isinstance(fmt, BlockFormat):
            return fmt.decode(self.codes).reshape(self.shape)
        codes = self.codes
        if codes.is_floating_point():  # a FloatFormat's values in its own torch dtype
            return codes.float() * self.scale
        if self.codes_dtype is not None:
            scale = kernels.scalar(self.scale)
            fast = isinstance(fmt, IntFormat) and codes.device.type == "cpu" and kernels.available()
            if fast and scale is not None:
                return kernels.int_decode(codes, self.shape, scale, fmt.signed)
            codes = unpack_nibbles(codes, self.shape, self.codes_dtype)
        return fmt.decode(codes, self.scale)


def abs_max(x: Tensor) -> Tensor:
    """max |x| as a float32 scalar: NaN if x holds one, 0 for an empty x."""
    if x.numel() == 0:
        return torch.zeros((), device=x.device)
    return kernels.abs_max(x) if kernels.applies(x) else x.abs().amax()


def _castable(fmt: Format, rounding: str | None) -> bool:
    """Whether fmt's nearest rounding is a saturating torch cast (FloatFormat.cast)."""
    saturating = isinstance(fmt, FloatFormat) and fmt.overflow == "saturate"
    return saturating and fmt.torch_dtype is not None and rounding in (None, "nearest")


def operand_scale(spec: OperandSpec, x: Tensor, axis: int = -1) -> Tensor | float | None:
    """The scale of a non-PACT operand (None: a block format's own tensor scale); with
    granularity `row`, one per row along `axis`, the GEMM's reduction axis."""
    fmt = spec.fmt
    dim = axis if spec.granularity == "row" else None
    if spec.scaler == "sawb":
        return sawb_scale(x, fmt, dim=dim)
    if spec.scaler == "mse":
        return mse_scale(x, fmt)
    if spec.scaler == "max":
        return max_scale(x, fmt, dim=dim)
    if spec.scaler == "fixed":
        return spec.scale
    return None if isinstance(fmt, BlockFormat) else 1.0


def quantize_operand(
    fmt: Format | None,
    x: Tensor,
    scale: Tensor | float | None,
    phase: int = 0,
    rounding: str | None = None,
    generator: torch.Generator | None = None,
    axis: int = -1,
    keep: bool = True,
) -> tuple[Tensor, Packed | None]:
    """(float32 values of x on the grid of `fmt` (None: float32), its Packed form if `keep`).

    scale None: a block format's own tensor scale, 1 for the others."""
    x = x.float()
    if fmt is None:
        return x, (Packed(None, x.shape, values=x) if keep else None)
    if isinstance(fmt, BlockFormat):
        if len(fmt.block_shape) == 2 and x.ndim > 2:  # conv weights: tile [out, in·kernel]
            values, packed = quantize_operand(
                fmt, x.reshape(x.shape[0], math.prod(x.shape[1:])), scale, phase, rounding, generator
            )
            return values.reshape(x.shape), (dataclasses.replace(packed, shape=x.shape) if keep else None)
        if not keep:  # values only: one pass of the kernel, no codes to write and read back
            return fmt.quantize(x, scale, phase, rounding, generator, axis=axis), None
        enc = fmt.encode(x, scale, phase, rounding, generator, axis=axis)
        return fmt.decode(enc), Packed(fmt, x.shape, codes=enc)
    scale = 1.0 if scale is None else scale
    if isinstance(fmt, IntFormat) and fmt.bits <= 4:
        return quantize_int_operand(fmt, x, scale, rounding, generator, keep)[:2]
    if keep and _castable(fmt, rounding) and kernels.available():  # fp16, bf16, fp8: a torch cast
        codes = fmt.cast(x / scale)
        return codes.float() * scale, Packed(fmt, x.shape, codes, None, scale)
    storage = fmt.storage_dtype if isinstance(fmt, FloatFormat) else None
    if keep and storage is not None and kernels.applies(x):  # HFP8: kept in fp16 / bf16
        codes = fmt.quantize(x / scale, 1.0, phase, rounding, generator).to(storage)
        return codes.float() * scale, Packed(fmt, x.shape, codes, None, scale)
    if not keep or bool(torch.isnan(x).any()):
        values = fmt.quantize(x, scale, phase, rounding, generator)
        return values, (Packed(fmt, x.shape, values=values) if keep else None)
    codes = fmt.encode(x, scale, phase, rounding, generator)
    values = fmt.decode(codes, scale, phase)
    if fmt.bits <= 4:
        return values, Packed(fmt, x.shape, pack_nibbles(codes), codes.dtype, scale)
    return values, Packed(fmt, x.shape, codes, None, scale)


def quantize_int_operand(
    grid: IntFormat,
    x: Tensor,
    scale: Tensor | float,
    rounding: str | None = None,
    generator: torch.Generator | None = None,
    keep: bool = True,
    clip: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Packed | None, Tensor | None]:
    """(values, Packed if `keep`, clip bits if `keep` and `clip`) of x on a 4-bit INT grid.

    With clip = (lo, hi) (PACT), x is first clipped to [lo, hi]; a clip bit marks x >= hi,
    or x <= lo for a signed grid (x < lo for unsigned): the elements PACT's backward masks.
    One kernel pass does it all on CPU float32 (nearest rounding); the same in torch ops
    otherwise."""
    x = x.float()
    signed = grid.signed
    nearest = (grid.roundings[0] if rounding is None else rounding) == "nearest"
    one_scale = kernels.scalar(scale)  # None for row scales, which take the torch ops
    if nearest and one_scale is not None and kernels.applies(x):
        check_scale(scale)  # (a PACT clip trained to <= 0 is an error here as in grid.encode)
        lo, hi = (float(clip[0]), float(clip[1])) if clip is not None else (-math.inf, math.inf)
        values, nibbles, clip_bits, nans = kernels.int_quantize(
            x,
            one_scale,
            grid.qmin,
            grid.qmax,
            lo,
            hi,
            signed,
            codes=keep,
            clip_bits=keep and clip is not None,
        )
        if not keep:
            return values, None, None
        packed = Packed(grid, x.shape, nibbles, torch.int8 if signed else torch.uint8, scale)
        return values, (Packed(grid, x.shape, values=values) if nans else packed), clip_bits

    y = x if clip is None else torch.minimum(torch.maximum(x, clip[0]), clip[1])
    if not keep or bool(torch.isnan(y).any()):
        values = grid.quantize(y, scale, 0, rounding, generator)
        packed = Packed(grid, x.shape, values=values) if keep else None
    else:
        codes = grid.encode(y, scale, 0, rounding, generator)
        values = grid.decode(codes, scale)
        packed = Packed(grid, x.shape, pack_nibbles(codes), codes.dtype, scale)
    clip_bits = None
    if keep and clip is not None:
        lo, hi = clip
        clip_bits = pack_bits((x >= hi) | ((x <= lo) if signed else (x < lo)))
    return values, packed, clip_bits
