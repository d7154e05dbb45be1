"""A slow, obviously-correct reference for fourbit's number formats (SPEC.md section 2).

Nothing here calls a format's values(), decode(), encode() or quantize(): every grid is
enumerated from first principles in float64 and rounding is "nearest of the grid", done
with np.searchsorted and an exact comparison against the two neighbours. Only the format's
parameters (bits, radix, exponent_bits, ...) are read from the dataclass.

The contract being checked (fourbit.formats.base):

    quantize(x, scale) == scale * q(float32(x) / scale)

with the division and the final multiplication in float32 (numpy float32 arithmetic is
IEEE, correctly rounded), and q rounding in exact arithmetic (float64 holds every
intermediate here exactly).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from fourbit.formats import BlockFormat, FloatFormat, IntFormat, LogFormat

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0..7, straight from the OCP table
NVFP4_TENSOR_RANGE = 6.0 * 448.0


# -- grids --------------------------------------------------------------------------------


def int_grid(bits: int, signed: bool, symmetric: bool) -> np.ndarray:
    """The integers qmin..qmax."""
    if signed:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax if symmetric else -(2 ** (bits - 1))
    else:
        qmin, qmax = 0, 2**bits - 1
    return np.arange(qmin, qmax + 1, dtype=np.float64)


def log_magnitudes(radix: int, exponent_bits: int, phase: int) -> np.ndarray:
    """0 and 2**phase * radix**-k for k = 0 .. 2**exponent_bits - 2, ascending."""
    kmax = 2**exponent_bits - 2
    mags = [0.0] + [2.0**phase * float(radix) ** (-k) for k in range(kmax, -1, -1)]
    return np.array(mags, dtype=np.float64)


@functools.cache
def float_table(E: int, M: int, bias: int, subnormals: bool, specials: str) -> tuple[tuple[float, int], ...]:
    """(magnitude, code) of every non-negative code, walked field by field; None for inf/NaN.

    The value is what the bit pattern means, ignoring `max_value_override`:
    normal (1 + m/2**M) * 2**(f - bias), subnormal (m/2**M) * 2**(1 - bias).
    """
    rows = []
    top = 2**E - 1
    for fld in range(2**E):
        for mant in range(2**M):
            code = (fld << M) | mant
            if specials == "ieee" and fld == top:
                value = None  # inf (mant 0) or NaN
            elif specials == "fn" and fld == top and mant == 2**M - 1:
                value = None  # the only NaN
            elif fld == 0:
                value = mant / 2**M * 2.0 ** (1 - bias)
            else:
                value = (1 + mant / 2**M) * 2.0 ** (fld - bias)
            rows.append((value, code))
    return tuple(rows)


def float_pattern_value(E: int, M: int, bias: int, code: int) -> float:
    """The value the bit pattern `code` would have if it were an ordinary number."""
    fld, mant = code >> M, code & (2**M - 1)
    if fld == 0:
        return mant / 2**M * 2.0 ** (1 - bias)
    return (1 + mant / 2**M) * 2.0 ** (fld - bias)


@functools.cache
def float_magnitudes(fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
    """Finite non-negative grid magnitudes (ascending, zero once) and their codes."""
    rows = float_table(fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, fmt.subnormals, fmt.specials)
    keep = []
    for value, code in rows:
        if value is None:
            continue
        fld, mant = code >> fmt.mantissa_bits, code & (2**fmt.mantissa_bits - 1)
        if not fmt.subnormals and fld == 0 and mant != 0:
            continue
        if fmt.max_value_override is not None and value > fmt.max_value_override:
            continue
        keep.append((value, code))
    keep.sort()
    return np.array([v for v, _ in keep]), np.array([c for _, c in keep])


def grid(fmt, phase: int = 0) -> np.ndarray:
    """Every finite value of `fmt` on unit scale, sorted, float64, zero once."""
    if isinstance(fmt, IntFormat):
        return int_grid(fmt.bits, fmt.signed, fmt.symmetric)
    if isinstance(fmt, LogFormat):
        mags = log_magnitudes(fmt.radix, fmt.exponent_bits, phase)
    elif isinstance(fmt, BlockFormat):
        mags = np.array(E2M1_MAGNITUDES)
    elif isinstance(fmt, FloatFormat):
        mags = float_magnitudes(fmt)[0]
    else:
        raise TypeError(fmt)
    return np.concatenate([-mags[:0:-1], mags])


# -- rounding -----------------------------------------------------------------------------


def _neighbours(a: np.ndarray, mags: np.ndarray):
    """For a >= 0 (no NaN): index of the last grid point <= a, the point, the next one, and
    whether a is at or beyond the top (then lo == hi == top)."""
    idx = np.searchsorted(mags, a, side="right") - 1  # mags[idx] <= a < mags[idx + 1]
    idx = np.clip(idx, 0, len(mags) - 1)
    top = idx == len(mags) - 1
    hi_idx = np.minimum(idx + 1, len(mags) - 1)
    return idx, mags[idx], mags[hi_idx], hi_idx, top


def nearest_magnitude(
    a: np.ndarray, mags: np.ndarray, tie: str, codes: np.ndarray | None = None
) -> np.ndarray:
    """Nearest of `mags` (ascending, mags[0] == 0) to a >= 0; beyond the top: the top.

    tie: 'even' (the neighbour with the even code), 'up' (the larger magnitude).
    2a vs lo + hi is exact in float64 for every grid here.
    """
    _, lo, hi, hi_idx, top = _neighbours(a, mags)
    twice, mid2 = 2 * a, lo + hi
    up = twice > mid2
    if tie == "up":
        up |= twice == mid2
    else:
        up |= (twice == mid2) & (codes[hi_idx] % 2 == 0)
    return np.where(top, mags[-1], np.where(up, hi, lo))


def _signed(fn, y: np.ndarray) -> np.ndarray:
    """Apply a magnitude rounding to |y|, restore the sign, keep NaN."""
    y = np.asarray(y, dtype=np.float64)
    nan = np.isnan(y)
    a = np.where(nan, 0.0, np.abs(y))
    return np.where(nan, np.nan, np.copysign(fn(a), y))


def round_int(y: np.ndarray, fmt: IntFormat) -> np.ndarray:
    """Nearest integer of qmin..qmax, ties to the even integer; saturating; NaN stays."""
    g = int_grid(fmt.bits, fmt.signed, fmt.symmetric)
    y = np.asarray(y, dtype=np.float64)
    nan = np.isnan(y)
    yc = np.where(nan, 0.0, y)
    idx = np.clip(np.searchsorted(g, yc, side="right") - 1, 0, len(g) - 1)
    lo, hi = g[idx], g[np.minimum(idx + 1, len(g) - 1)]
    twice, mid2 = 2 * yc, lo + hi
    up = (twice > mid2) | ((twice == mid2) & (hi % 2 == 0))
    r = np.where(up, hi, lo)
    r = np.where(yc <= g[0], g[0], np.where(yc >= g[-1], g[-1], r))
    return np.where(nan, np.nan, r)


def round_log(y: np.ndarray, fmt: LogFormat, phase: int, rounding: str) -> np.ndarray:
    mags = log_magnitudes(fmt.radix, fmt.exponent_bits, phase)

    def fn(a):
        if rounding == "nearest":
            return nearest_magnitude(a, mags, "up")
        # 'log': hi when a >= sqrt(radix) * lo, i.e. (a / lo)**2 >= radix (exact: lo is a
        # power of two and a has 24 bits); below the smallest magnitude the underflow rule
        _, lo, hi, _, top = _neighbours(a, mags)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = a / np.where(lo > 0, lo, 1.0)
        up = np.where(lo > 0, ratio * ratio >= fmt.radix, 2 * a >= hi)
        return np.where(top, mags[-1], np.where(up, hi, lo))

    return _signed(fn, y)


def round_float(y: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Round to nearest, ties to the even code; `overflow` as in the docstring."""
    mags, codes = float_magnitudes(fmt)
    n = 2.0 ** (1 - fmt.bias)  # smallest normal

    if fmt.overflow == "inf":
        # IEEE cast: round on the grid extended by the next bit pattern above the top; what
        # lands there (or beyond) is not finite: inf ('ieee') or NaN ('fn')
        nxt = int(codes[-1]) + 1
        mags = np.append(mags, float_pattern_value(fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, nxt))
        codes = np.append(codes, nxt)
    overflow_value = np.inf if fmt.specials == "ieee" else np.nan

    def fn(a):
        r = nearest_magnitude(a, mags, "even", codes)
        if not fmt.subnormals:
            r = np.where(a < n, np.where(2 * a >= n, n, 0.0), r)
        if fmt.overflow == "inf":
            r = np.where(r == mags[-1], overflow_value, r)
        return r

    return _signed(fn, y)


def round_unit(fmt, y: np.ndarray, phase: int = 0, rounding: str = "nearest") -> np.ndarray:
    """q(y) on unit scale, float64 in, float64 out."""
    if isinstance(fmt, IntFormat):
        return round_int(y, fmt)
    if isinstance(fmt, LogFormat):
        return round_log(y, fmt, phase, rounding)
    if isinstance(fmt, FloatFormat):
        return round_float(y, fmt)
    raise TypeError(fmt)


def to_numpy32(x) -> np.ndarray:
    """float32 numpy copy of a tensor / array / list (float16 and bfloat16 upcast exactly)."""
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def quantize(fmt, x, scale: float = 1.0, phase: int = 0, rounding: str = "nearest") -> np.ndarray:
    """scale * q(float32(x) / scale), float32 (element-wise formats)."""
    x32 = to_numpy32(x)
    s32 = np.float32(scale)
    with np.errstate(all="ignore"):
        y = x32 / s32  # float32 division
    q = round_unit(fmt, y.astype(np.float64), phase, rounding)
    with np.errstate(all="ignore"):
        return (q * np.float64(s32)).astype(np.float32)  # exact product, one rounding


def unit_neighbours(fmt, y: np.ndarray, phase: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The grid points lo <= y <= hi around y (unit scale, float64, inside the range)."""
    g = grid(fmt, phase)
    y = np.asarray(y, dtype=np.float64)
    i = np.searchsorted(g, y, side="right") - 1
    lo = g[np.clip(i, 0, len(g) - 1)]
    hi = np.where(lo == y, y, g[np.clip(i + 1, 0, len(g) - 1)])
    return lo, hi


# -- block formats (BlockFormat docstring) --------------------------------------------------


@functools.cache
def _e2m1():
    return np.array(E2M1_MAGNITUDES), np.arange(8)


def round_e2m1(y: np.ndarray) -> np.ndarray:
    mags, codes = _e2m1()
    return _signed(lambda a: nearest_magnitude(a, mags, "even", codes), y)


E4M3 = FloatFormat(4, 3, specials="fn")  # parameters only: rounded by round_float above


def round_e4m3(y: np.ndarray) -> np.ndarray:
    """OCP fp8 e4m3 (bias 7, max 448, saturating), nearest-even, from the first-principles table."""
    return round_float(y, E4M3)


def block_tensor_scale(fmt: BlockFormat, x32: np.ndarray, scale) -> np.float32:
    """d: the `scale` argument, else 1 (MXFP4) or amax(finite x) / (6 * 448) in float32 (NVFP4)."""
    if scale is not None:
        return np.float32(scale)
    if fmt.scale_format == "e8m0" or x32.size == 0:
        return np.float32(1.0)
    finite = x32[np.isfinite(x32)]
    amax = np.float32(np.abs(finite).max()) if finite.size else np.float32(0)
    if amax == 0:
        return np.float32(1.0)
    return max(np.float32(amax / np.float32(NVFP4_TENSOR_RANGE)), np.float32(2.0**-149))  # floored


def _f32(v: np.ndarray) -> np.ndarray:
    """Round float64 to float32 and back. A float32 operation on float32 operands is the
    float64 operation rounded once more: double rounding is innocuous for +, -, *, / when
    53 >= 2 * 24 + 2 bits. Overflow gives inf, like float32 arithmetic would."""
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=np.float64).astype(np.float32).astype(np.float64)


def _quantize_blocks(fmt: BlockFormat, xb: np.ndarray, d: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """xb: float32 [n, k] of x, one block per row (a partial block needs no padding: zeros
    do not change amax) -> (float32 values e * s * d [n, k], float64 s * d [n]).

    y = x / d is float32 division; where that overflows although x is finite, y is clamped
    to float32's largest finite value (a finite input is not a NaN/inf block)."""
    x64 = xb.astype(np.float64)
    finite = np.isfinite(x64)
    bad = ~finite.all(axis=1)  # a block holding NaN or +-inf is all NaN
    y = _f32(x64 / np.float64(d))
    y = np.where(finite & np.isinf(y), np.sign(x64) * float(np.finfo(np.float32).max), y)
    y = np.where(finite, y, 0.0)
    amax = np.abs(y).max(axis=1)
    if fmt.scale_format == "e8m0":
        # X = 2**(floor(log2(amax)) - 2), exponent clamped to -127..127; amax 0: all zero
        exps = np.array([math.frexp(a)[1] - 1 - 2 if a > 0 else -127 for a in amax], dtype=np.int64)
        s = np.ldexp(1.0, np.clip(exps, -127, 127))
        el = round_e2m1(y / s[:, None])  # a power of two: exact
    else:
        # s = e4m3(amax / 6) with the division in float32; elements e2m1(y / s), float32 division
        s = round_e4m3(_f32(amax / 6))
        safe = np.where(s > 0, s, 1.0)[:, None]
        el = np.where((s > 0)[:, None], round_e2m1(_f32(y / safe)), 0.0)
    v = el * s[:, None] * np.float64(d)  # e * s exact; one rounding to float32 below
    v = np.where(bad[:, None], np.nan, v)
    with np.errstate(over="ignore"):
        return v.astype(np.float32), np.where(bad, np.nan, s * np.float64(d))


def block_quantize(fmt: BlockFormat, x, scale=None, axis: int = -1) -> np.ndarray:
    """Reference of BlockFormat.quantize (nearest rounding), float32 numpy, x's shape."""
    return _block_apply(fmt, x, scale, axis)[0]


def block_element_scales(fmt: BlockFormat, x, scale=None, axis: int = -1) -> np.ndarray:
    """s * d of each element's block (float64, x's shape): the block's outputs lie on
    e2m1 * (s * d). NaN for a NaN/inf block."""
    return _block_apply(fmt, x, scale, axis)[1]


def _block_apply(fmt: BlockFormat, x, scale, axis):
    x32 = to_numpy32(x)
    shape = x32.shape
    d = block_tensor_scale(fmt, x32, scale)
    if len(fmt.block_shape) == 1:
        (B,) = fmt.block_shape
        y = x32.reshape(1) if x32.ndim == 0 else np.moveaxis(x32, axis, -1)
        moved_shape = y.shape
        rows = y.reshape(-1, moved_shape[-1])
        out, sc = np.empty_like(rows), np.empty(rows.shape)
        for start in range(0, rows.shape[1], B):  # the last block may be partial
            out[:, start : start + B], s = _quantize_blocks(fmt, rows[:, start : start + B], d)
            sc[:, start : start + B] = s[:, None]
        if len(shape) == 0:
            return out.reshape(shape), sc.reshape(shape)
        return tuple(np.moveaxis(a.reshape(moved_shape), -1, axis) for a in (out, sc))
    R, C = fmt.block_shape
    y2 = x32.reshape((1,) * (2 - x32.ndim) + shape) if x32.ndim < 2 else x32
    r, c = y2.shape[-2:]
    tiles = y2.reshape(-1, r, c)
    out, sc = np.empty_like(tiles), np.empty(tiles.shape)
    for i in range(0, r, R):  # 2-D tiles; those on the bottom/right edge may be partial
        for j in range(0, c, C):
            t = tiles[:, i : i + R, j : j + C]
            q, s = _quantize_blocks(fmt, t.reshape(t.shape[0], -1), d)
            out[:, i : i + R, j : j + C] = q.reshape(t.shape)
            sc[:, i : i + R, j : j + C] = s[:, None, None]
    return out.reshape(shape), sc.reshape(shape)


# -- comparison helper --------------------------------------------------------------------


def assert_same(got, expected, inputs=None, what: str = "") -> None:
    """Equal values (NaN == NaN; -0 == 0), with the first mismatches in the message."""
    got = to_numpy32(got) if hasattr(got, "detach") else np.asarray(got)
    expected = np.asarray(expected)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    ok = (got == expected) | (np.isnan(got) & np.isnan(expected))
    if not ok.all():
        bad = np.flatnonzero(~ok.reshape(-1))
        lines = []
        for i in bad[:8]:
            x = "" if inputs is None else f"x={to_numpy32(inputs).reshape(-1)[i]!r:>16} "
            lines.append(f"  {x}got={got.reshape(-1)[i]!r} expected={expected.reshape(-1)[i]!r}")
        raise AssertionError(f"{what}: {len(bad)} of {ok.size} differ\n" + "\n".join(lines))
