"""The three GEMMs of a quantized layer, with every quantization point named.

    forward    Y  = Q_A(A) ⊛ Q_B(B)                       B: the weight (or 2nd activation)
    dA GEMM    dA = Q_G(s·dY, phase_dx) ⊛ᵀ Q_B(B) / s
    dB GEMM    dB = Q_A(A)ᵀ ⊛ Q_G(s·dY, phase_dw) / s      s: the layer's GradScale

A GEMM family (linear, conv, matmul) is a `GemmOps`: its three GEMMs and, for each
operand, the reduction axis it has in each GEMM (block formats put their blocks there;
fp16 accumulation chunks it). `gemm_forward` and `gemm_backward` quantize and multiply for
them all; `QuantizedGemm` is the autograd.Function that calls them (QLSTM's recurrence calls
them once per time step inside its own).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from fourbit.formats import IntFormat, LogFormat, kernels
from fourbit.nn.quant import (
    Packed,
    abs_max,
    operand_scale,
    quantize_int_operand,
    quantize_operand,
    unpack_bits,
)
from fourbit.nn.spec import LayerSpec, OperandSpec

FP16_CHUNK = 64  # reduction elements per fp16 partial sum (SPEC §4)
HADAMARD_SIZE = 16


@dataclass(frozen=True)
class GemmOps:
    """One GEMM family. Axes are the reduction axes of each operand in each GEMM."""

    forward: Callable[[Tensor, Tensor], Tensor]  # (a, b) -> y
    grad_a: Callable[[Tensor, Tensor, torch.Size], Tensor]  # (g, b, a.shape) -> dA
    grad_b: Callable[[Tensor, Tensor, torch.Size], Tensor]  # (a, g, b.shape) -> dB
    a_fwd: int
    b_fwd: int
    g_da: int
    b_da: int
    a_db: int
    g_db: int
    b_is_activation: bool = False  # matmul: B is quantized like an activation
    fwd_slice: int = 1  # reduction elements per index of the fwd / dA reduction axis
    groups: int = 1  # grouped conv: A's fwd axis and both dA axes hold `groups` groups
    db_slice: Callable[[Tensor], int] = lambda g: 1  # same, for the dB reduction axis


def linear_ops() -> GemmOps:
    """a [N, in], w [out, in] -> y [N, out]."""
    return GemmOps(
        forward=lambda a, w: F.linear(a, w),
        grad_a=lambda g, w, shape: g @ w,
        grad_b=lambda a, g, shape: g.t() @ a,
        a_fwd=-1, b_fwd=-1, g_da=-1, b_da=0, a_db=0, g_db=0,
    )  # fmt: skip


def conv_ops(dims: int, stride, padding, dilation, groups: int, kernel_numel: int) -> GemmOps:
    """a [N, C, *spatial], w [O, C/groups, *kernel] -> y [N, O, *spatial_out] (padding: ints)."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    args = (stride, padding, dilation, groups)
    geometry = (list(stride), list(padding), list(dilation), False, [0] * dims, groups)

    def backward(g: Tensor, a: Tensor, w: Tensor, which: int) -> Tensor:
        # torch.nn.grad.convNd_input/_weight pass an expanded 1-element tensor for the operand
        # they do not need, which the CPU convolution copies out in full (~50 % slower): an
        # uninitialized tensor of that shape stands in for it here (only its shape is read)
        mask = (which == 0, which == 1, False)
        return torch.ops.aten.convolution_backward(g, a, w, None, *geometry, mask)[which]

    return GemmOps(
        forward=lambda a, w: conv(a, w, None, *args),
        grad_a=lambda g, w, shape: backward(g, g.new_empty(shape), w, 0),
        grad_b=lambda a, g, shape: backward(g, a, g.new_empty(shape), 1),
        a_fwd=1, b_fwd=1, g_da=1, b_da=0, a_db=0, g_db=0,
        fwd_slice=kernel_numel,
        groups=groups,
        db_slice=lambda g: math.prod(g.shape[2:]),
    )  # fmt: skip


def matmul_ops() -> GemmOps:
    """a [..., m, k] @ b [..., k, n] -> y [..., m, n]; both operands are activations."""
    return GemmOps(
        forward=torch.matmul,
        grad_a=lambda g, b, shape: (g @ b.mT).sum_to_size(shape),
        grad_b=lambda a, g, shape: (a.mT @ g).sum_to_size(shape),
        a_fwd=-1, b_fwd=-2, g_da=-1, b_da=-1, a_db=-2, g_db=-2,
        b_is_activation=True,
    )  # fmt: skip


def chunked_fp16(
    op: Callable, x: Tensor, y: Tensor, x_axis: int, y_axis: int, per_index: int, groups=(1, 1)
) -> Tensor:
    """op(x, y) with fp16 accumulation: partial sums over chunks of ~64 reduction elements,
    each rounded to fp16, added in fp16 (products of 4-bit values are exact in fp32).

    `groups`: how many groups (of a grouped convolution) each operand's reduction axis
    holds; a chunk takes the same slice of every group, so each output sums its own group."""
    n = x.shape[x_axis] // groups[0]
    step = max(1, FP16_CHUNK // max(per_index, 1))
    total = None
    for start in range(0, n, step):
        length = min(step, n - start)
        part = op(_narrow(x, x_axis, start, length, groups[0]), _narrow(y, y_axis, start, length, groups[1]))
        total = part.half() if total is None else total + part.half()
    return op(x, y).float() if total is None else total.float()  # (an empty reduction: zeros)


def _narrow(t: Tensor, axis: int, start: int, length: int, groups: int) -> Tensor:
    """t.narrow(axis, start, length) within each of `groups` equal groups along axis."""
    if groups == 1:
        return t.narrow(axis, start, length)
    axis %= t.dim()
    return t.unflatten(axis, (groups, -1)).narrow(axis + 1, start, length).flatten(axis, axis + 1)


def _sylvester_hadamard(n: int) -> Tensor:
    """The n x n Hadamard matrix of ±1 (n a power of two) by Sylvester's doubling."""
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# built once: an LSTM calls random_hadamard twice per time step, where building it cost a
# quarter of the call
_HADAMARD = _sylvester_hadamard(HADAMARD_SIZE)


def random_hadamard(x: Tensor, axis: int, signs: Tensor) -> Tensor:
    """(H·diag(signs)) applied to blocks of 16 along `axis` (zero-padded); H orthonormal.

    Applied to both inputs of a GEMM along its reduction axis it leaves the product as
    it was, while spreading outliers across each block before quantization (NVFP4)."""
    t = (_HADAMARD.to(x.device) * signs.to(x.device)) / math.sqrt(HADAMARD_SIZE)
    axis %= x.dim()
    pad = -x.shape[axis] % HADAMARD_SIZE
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 1 - axis) + (0, pad))
    outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1 :])
    if inner == 1:  # blocks lie contiguous: one 2-D matmul (a batched one is ~5x slower)
        return (x.reshape(x.numel() // HADAMARD_SIZE, HADAMARD_SIZE) @ t.t()).reshape(x.shape)
    # along a strided axis: t times each block of 16 rows where it lies (no transposition)
    blocks = x.reshape(outer * (x.shape[axis] // HADAMARD_SIZE), HADAMARD_SIZE, inner)
    return (t @ blocks).reshape(x.shape)


@dataclass
class _Operand:
    """A forward operand: quantized values, what to save, and PACT's clip information."""

    values: Tensor
    packed: Packed | None
    clipped: Tensor | None = None  # packed bits: outside PACT's clip range
    signed: bool = False


def _quantize_forward_operand(
    spec: OperandSpec, x: Tensor, alpha: Tensor | None, pact_signed: bool, axis: int, generator, keep: bool
) -> _Operand:
    """Q_A / Q_W: PACT clips to [0, α] (or [-α, α]) on the INT grid; other scalers just scale."""
    if spec.scaler != "pact":
        return _Operand(*_quantize_along(spec, x, axis, generator, keep))
    grid = IntFormat(spec.fmt.bits, signed=pact_signed, symmetric=pact_signed)
    clip = (-alpha if pact_signed else torch.zeros_like(alpha), alpha)
    scale = alpha / grid.qmax
    values, packed, clipped = quantize_int_operand(grid, x, scale, spec.rounding, generator, keep, clip)
    return _Operand(values, packed, clipped, pact_signed)


def _quantize_along(spec: OperandSpec, x: Tensor, axis: int, generator, keep: bool = True):
    """(values, Packed if `keep`) of a non-PACT operand for a GEMM that reduces along `axis`,
    where 1-D blocks and row scales run."""
    scale = operand_scale(spec, x, axis)
    if isinstance(scale, Tensor) and not bool(torch.isfinite(scale).all()):
        # x holds inf/NaN or overflows its statistics: NaN, so the loss shows it (the
        # training loop then skips the step and names the layer), not a ValueError here
        nan = torch.full(x.shape, float("nan"), device=x.device)
        return nan, Packed(None, x.shape, values=nan) if keep else None
    return quantize_operand(spec.fmt, x, scale, 0, spec.rounding, generator, axis, keep)


def _pact_backward(d: Tensor, clip_bits: Tensor, operand: Packed, signed: bool):
    """STE: pass d inside the clip; dα sums d where clipped at the top (minus the bottom),
    in float64. `operand` is the clipped operand as saved (its sign tells top from bottom)."""
    if operand.codes_dtype is not None and kernels.applies(d):
        d, top, bottom = kernels.pact_backward(d.contiguous(), clip_bits, operand.codes, signed)
        return d, torch.tensor(top - bottom if signed else top, dtype=torch.float32)
    clipped = unpack_bits(clip_bits, operand.shape)
    values = operand.unpack()
    dalpha = torch.where(clipped & (values > 0), d, 0).sum(dtype=torch.float64)
    if signed:
        dalpha = dalpha - torch.where(clipped & (values < 0), d, 0).sum(dtype=torch.float64)
    return torch.where(clipped, torch.zeros_like(d), d), dalpha.float()


def _quantize_gradients(spec: LayerSpec, dy: Tensor, s: Tensor, need: tuple[bool, bool], ops, signs, gen):
    """Q_G of s·dY, twice: on grad_dx at phase_dx for the dX GEMM, on grad_dw at phase_dw for
    the dW GEMM (two-phase rounding; NVFP4 first turns the dW one with the random Hadamard).
    Returns (g_dx, g_dw), None where that GEMM is not needed. Log grids with table rounding
    read dY once for both (formats/kernels.c); the same values as the torch path below."""
    phase_dx, phase_dw = spec.phases()
    quants = [(spec.grad_dx, phase_dx, ops.g_da), (spec.grad_dw, phase_dw, ops.g_db)]
    tables = [_log_table(op, phase) for (op, phase, _), n in zip(quants, need, strict=True) if n]
    same_grid = len({(t[1], t[2]) for t in tables if t is not None}) == 1
    if not spec.hadamard_dw and same_grid and None not in tables and kernels.applies(dy):
        outs = iter(kernels.table_quantize(dy, [t[0] for t in tables], *tables[0][1:], premul=float(s)))
        return tuple(next(outs) if n else None for n in need)
    g = dy * s
    same_axis = ops.g_da == ops.g_db or not spec.grad_dx.is_block  # only blocks follow the axis
    twins = quants[0][:2] == quants[1][:2] and same_axis and not spec.grad_dx.stochastic
    if all(need) and twins and not spec.hadamard_dw:
        g_q = quantize_operand(spec.grad_dx.fmt, g, None, phase_dx, spec.grad_dx.rounding, keep=False)[0]
        return g_q, g_q  # the same grid, phase and blocks (no TPR): the same values, computed once
    g_for_dw = random_hadamard(g, ops.g_db, signs) if spec.hadamard_dw and need[1] else g
    return tuple(
        quantize_operand(op.fmt, x, None, phase, op.rounding, gen, axis, keep=False)[0] if n else None
        for (op, phase, axis), x, n in zip(quants, (g, g_for_dw), need, strict=True)
    )


def _log_table(op: OperandSpec, phase: int):
    """(table, shift, mask) when op's grid rounds by table look-up (LogFormat), else None."""
    fmt, rounding = op.fmt, op.rounding or "nearest"
    if isinstance(fmt, LogFormat) and fmt.table_lookup(rounding):
        return fmt.table(phase, rounding, "cpu")
    return None


@dataclass
class QuantizedB:
    """Operand B quantized for the forward GEMM, and as the dA GEMM reads it."""

    forward: _Operand
    for_da: Packed | None


def quantize_b(state, b: Tensor, alpha_b: Tensor | None, ops: GemmOps, gen, keep: bool) -> QuantizedB:
    """Q_W (or Q_A of a second activation) of B. Block formats block (and row scales scale)
    along the reduction axis, which differs per GEMM: B for the dA GEMM is quantized again
    along its own."""
    spec_b = state.activation("b") if ops.b_is_activation else state.spec.weight
    qb = _quantize_forward_operand(spec_b, b, alpha_b, state.signed("b"), ops.b_fwd, gen, keep)
    b_for_da = qb.packed
    if keep and spec_b.follows_axis:
        b_for_da = _quantize_along(spec_b, b, ops.b_da, gen)[1]
    return QuantizedB(qb, b_for_da)


@dataclass
class GemmSaved:
    """What the forward GEMM keeps for the two backward GEMMs (`tensors()` lists its tensors
    for ctx.save_for_backward, `restore()` takes them back)."""

    state: object  # the layer's QuantState
    ops: GemmOps
    signs: Tensor  # NVFP4's random Hadamard signs (empty otherwise)
    b_for_da: Packed
    a_for_db: Packed
    a_clipped: Tensor | None  # PACT clip bits of A and of B, where PACT clips them
    b_clipped: Tensor | None
    a_signed: bool
    b_signed: bool
    shapes_dtypes: tuple

    def tensors(self) -> list[Tensor]:
        clips = [t for t in (self.a_clipped, self.b_clipped) if t is not None]
        return [self.signs, *self.b_for_da.tensors(), *self.a_for_db.tensors(), *clips]

    def restore(self, saved: Iterator[Tensor]) -> GemmSaved:
        signs = next(saved)
        b_for_da, a_for_db = self.b_for_da.restore(saved), self.a_for_db.restore(saved)
        a_clipped = next(saved) if self.a_clipped is not None else None
        b_clipped = next(saved) if self.b_clipped is not None else None
        return replace(
            self, signs=signs, b_for_da=b_for_da, a_for_db=a_for_db, a_clipped=a_clipped, b_clipped=b_clipped
        )


def gemm_forward(state, ops: GemmOps, a, b, alpha_a, alpha_b, keep: bool, held_b: QuantizedB | None):
    """(Y = Q_A(A) ⊛ Q_B(B) in A's dtype, what backward needs if `keep`, else None)."""
    spec, act = state.spec, state.activation("a")
    gen = state.take_generator()

    # quantization points of the forward GEMM
    qa = _quantize_forward_operand(act, a, alpha_a, state.signed("a"), ops.a_fwd, gen, keep)
    quantized_b = held_b if held_b is not None else quantize_b(state, b, alpha_b, ops, gen, keep)
    qb = quantized_b.forward
    y = _gemm(
        ops.forward, qa.values, qb.values, ops.a_fwd, ops.b_fwd, ops.fwd_slice, spec.accumulate,
        groups=(ops.groups, 1),
    )  # fmt: skip
    if state.observer is not None:  # telemetry (fourbit inspect): each operand before and after
        state.observer("A", a.float(), qa.values, None)
        state.observer("B" if ops.b_is_activation else "W", b.float(), qb.values, None)

    saved = None
    if keep:
        # A for the dB GEMM: block formats block it (row scales scale it) along that GEMM's
        # reduction axis
        a_for_db = qa.packed
        signs = torch.zeros(0)
        if spec.hadamard_dw:
            signs = torch.randint(0, 2, (HADAMARD_SIZE,), generator=gen).float() * 2 - 1
            a_t = random_hadamard(a.float(), ops.a_db, signs)
            a_for_db = quantize_operand(act.fmt, a_t, None, 0, None, gen, ops.a_db)[1]
        elif act.follows_axis:
            a_for_db = _quantize_along(act, a, ops.a_db, gen)[1]
        saved = GemmSaved(
            state, ops, signs, quantized_b.for_da, a_for_db, qa.clipped, qb.clipped, qa.signed, qb.signed,
            (a.shape, b.shape, a.dtype, b.dtype),
        )  # fmt: skip
    state.return_generator(gen)
    return y.to(a.dtype), saved


def gemm_backward(saved: GemmSaved, dy: Tensor, needs: tuple[bool, ...], b_unpacked: Tensor | None = None):
    """(dA, dB, dα_A, dα_B) from dY; `needs`: which of (A, B, α_A, α_B) want a gradient.
    `b_unpacked`: B as the dA GEMM reads it, already unpacked (an LSTM's W_hh, the
    same at every step)."""
    state, ops = saved.state, saved.ops
    spec = state.spec
    a_shape, b_shape, a_dtype, b_dtype = saved.shapes_dtypes
    need_da, need_db = needs[0] or needs[2], needs[1] or needs[3]
    gen = state.take_generator()

    # GradScale: the scale s for this gradient (and the layer's scale for the next one)
    dy = dy.float()
    s = state.gradscale(abs_max(dy))

    # Q_G: s·dY for the dX GEMM (phase_dx) and for the dW GEMM (phase_dw)
    g_dx, g_dw = _quantize_gradients(spec, dy, s, (need_da, need_db), ops, saved.signs, gen)
    if state.observer is not None:
        g = dy * s
        g_turned = random_hadamard(g, ops.g_db, saved.signs) if spec.hadamard_dw else g  # (NVFP4's dW)
        for point, x, g_q in (("G_dx", g, g_dx), ("G_dw", g_turned, g_dw)):
            if g_q is not None:
                state.observer(point, x, g_q, float(s))

    # (the GEMM outputs are fresh tensors: unscaled in place, with no new allocation)
    da = db = None
    if need_da:
        b_q = saved.b_for_da.unpack() if b_unpacked is None else b_unpacked
        da = _gemm(
            ops.grad_a, g_dx, b_q, ops.g_da, ops.b_da, ops.fwd_slice, spec.accumulate, a_shape,
            groups=(ops.groups, ops.groups),
        )  # fmt: skip
        da.div_(s)
    if need_db:
        a_q = saved.a_for_db.unpack()
        db = _gemm(ops.grad_b, a_q, g_dw, ops.a_db, ops.g_db, ops.db_slice(g_dw), spec.accumulate, b_shape)
        db.div_(s)
    state.return_generator(gen)

    # PACT: straight-through inside the clip, and the gradient of the clip level alpha
    dalpha_a = dalpha_b = None
    if saved.a_clipped is not None and da is not None:
        da, dalpha_a = _pact_backward(da, saved.a_clipped, saved.a_for_db, saved.a_signed)
    if saved.b_clipped is not None and db is not None:
        db, dalpha_b = _pact_backward(db, saved.b_clipped, saved.b_for_da, saved.b_signed)
    da = None if da is None or not needs[0] else da.to(a_dtype)
    db = None if db is None or not needs[1] else db.to(b_dtype)
    return da, db, dalpha_a, dalpha_b


class QuantizedGemm(torch.autograd.Function):
    """apply(a, b, alpha_a, alpha_b, state, ops, keep, held_b) -> y: `gemm_forward` and
    `gemm_backward` as one autograd node.

    `state` is the layer's QuantState (spec, GradScale, PACT signedness, generator);
    `keep` is False under no_grad / inference, when nothing is saved for backward;
    `held_b`: B already quantized (a weight reused by every time step of an LSTM), or None."""

    @staticmethod
    def forward(ctx, a, b, alpha_a, alpha_b, state, ops: GemmOps, keep: bool, held_b: QuantizedB | None):
        y, saved = gemm_forward(state, ops, a, b, alpha_a, alpha_b, keep, held_b)
        if saved is not None:
            ctx.gemm = saved
            ctx.save_for_backward(*saved.tensors())
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.gemm.restore(iter(ctx.saved_tensors))
        return *gemm_backward(saved, dy, ctx.needs_input_grad[:4]), None, None, None, None


def _gemm(op, x, y, x_axis, y_axis, per_index, accumulate, shape=None, groups=(1, 1)):
    call = op if shape is None else (lambda u, v: op(u, v, shape))
    if accumulate == "fp16":
        return chunked_fp16(call, x, y, x_axis, y_axis, per_index, groups)
    return call(x, y)
