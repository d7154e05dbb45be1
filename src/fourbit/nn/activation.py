"""ReLU and ReLU6 that keep one bit per element for backward, not their float32 output.

An exact swap (the same outputs and gradients, bit for bit): the gradient of a clip is the
incoming gradient where the input lay strictly inside the clip range, zero elsewhere, so
one bit per element is all backward needs. `convert` puts these in place of nn.ReLU and
nn.ReLU6 under a quantized recipe; the activations around a 4-bit GEMM then cost 1/32 of
their float32 size for backward (the next GEMM keeps its own 4-bit codes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fourbit.formats import kernels
from fourbit.nn.quant import pack_bits, unpack_bits


class _ClipWithMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, upper: float | None):
        if kernels.applies(x):
            y, bits = kernels.clip_with_mask(x, 0.0, upper)
            y = y.view(x.shape)
        else:
            y = x.clamp(0.0, upper)
            blocked = (x <= 0) | (x >= upper) if upper is not None else x <= 0
            bits = pack_bits(~blocked)  # (so NaN passes the gradient, as in torch)
        ctx.save_for_backward(bits)
        ctx.shape = x.shape
        return y

    @staticmethod
    def backward(ctx, g):
        (bits,) = ctx.saved_tensors
        if kernels.applies(g):
            return kernels.masked(g, bits).view(ctx.shape), None
        return torch.where(unpack_bits(bits, ctx.shape), g, 0.0), None


class MaskedReLU(nn.Module):
    """max(x, 0), or min(max(x, 0), upper) (ReLU6: upper = 6), saving a 1-bit mask."""

    def __init__(self, upper: float | None = None):
        super().__init__()
        self.upper = upper

    @classmethod
    def from_float(cls, module: nn.Module) -> MaskedReLU:
        return cls(6.0 if isinstance(module, nn.ReLU6) else None)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return x.clamp(0.0, self.upper)
        return _ClipWithMask.apply(x, self.upper)

    def extra_repr(self) -> str:
        return "" if self.upper is None else f"upper={self.upper}"
