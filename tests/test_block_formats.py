"""MXFP4 and NVFP4 (BlockFormat) against a per-block reference (tests/reference.py, written
from the BlockFormat docstring) and against blocks worked out by hand.

Reminders for the hand computations:
- e2m1 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 (codes 0..7); ties to the even code; > 6 -> 6.
- MXFP4: X = 2**(floor(log2 amax) - 2); element e2m1(x / X); value e * X.
- NVFP4: d = amax_tensor / 2688 (or `scale`); s = e4m3(amax_block(x / d) / 6);
  value e2m1((x / d) / s) * s * d.  e4m3 has 3 mantissa bits: in [1, 2) a step of 1/8.
"""

import math

import numpy as np
import pytest
import torch

import reference as R
from fourbit import formats
from fourbit.formats import BlockFormat

MX = formats.get("mxfp4")
NV = formats.get("nvfp4")
NV2D = BlockFormat((16, 16), "e4m3")
BLOCK = [n for n in formats.names() if isinstance(formats.get(n), BlockFormat)]
VARIANTS = {n: formats.get(n) for n in BLOCK} | {
    "nvfp4_16x16": NV2D,
    "mxfp4_16x16": BlockFormat((16, 16), "e8m0"),
    "mxfp4_b8": BlockFormat((8,), "e8m0"),
}


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def padded(values, n):
    return t(list(values) + [0.0] * (n - len(values)))


def log_uniform(shape, lo_exp, hi_exp, seed):
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    mag = np.exp2(rng.uniform(lo_exp, hi_exp, n))
    return (rng.choice([-1.0, 1.0], n) * mag).astype(np.float32).reshape(shape)


def e4m3_code(value):
    """Bit pattern of a normal e4m3 value by hand: sign 0, exponent field e + 7, 3 mantissa bits."""
    m, e = math.frexp(value)  # value = m * 2**e, m in [0.5, 1)
    fld, mant = e - 1 + 7, (2 * m - 1) * 8
    assert mant == int(mant) and 1 <= fld <= 15
    return (fld << 3) | int(mant)


# -- hand-worked blocks -------------------------------------------------------------------


def test_all_zero_blocks():
    for fmt, n in ((MX, 32), (NV, 16), (MX, 70), (NV, 33)):
        x = torch.zeros(2, n)
        assert torch.equal(fmt.quantize(x), x)
        enc = fmt.encode(x)
        assert torch.equal(enc.codes, torch.zeros(2, n, dtype=torch.uint8))
        # MXFP4: E8M0 code 0 (2**-127); NVFP4: e4m3 code 0 (scale 0), tensor scale 1
        assert (enc.scale_codes == 0).all() and enc.scale_codes.shape == (
            2,
            math.ceil(n / fmt.block_shape[0]),
        )
        assert enc.tensor_scale == 1.0
    z = torch.zeros(16, 16)
    assert torch.equal(NV2D.quantize(z), z)


OUTLIER = [100.0, 9.0, -13.0, 20.0, 28.0, 40.0, 56.0, 72.0, 88.0, 4.0, 4.5, 1.0, -0.3]
# with a block scale of 16: x / 16 = 6.25 -> 6 (saturate), .5625 -> .5, -.8125 -> -1, 1.25 -> 1 (tie,
# even code 2), 1.75 -> 2 (tie, code 4), 2.5 -> 2 (tie), 3.5 -> 4 (tie, code 6), 4.5 -> 4, 5.5 -> 6,
# .25 -> 0 (tie, code 0), .28125 -> .5, .0625 -> 0, -.01875 -> 0
OUTLIER_Q16 = [96.0, 8.0, -16.0, 16.0, 32.0, 32.0, 64.0, 64.0, 96.0, 0.0, 8.0, 0.0, 0.0]


def test_mxfp4_one_outlier():
    # amax 100: floor(log2 100) = 6, X = 2**(6 - 2) = 16 (E8M0 code 4 + 127 = 131)
    x = padded(OUTLIER, 32)
    enc = MX.encode(x)
    assert enc.scale_codes.tolist() == [131]
    assert MX.quantize(x).tolist() == OUTLIER_Q16 + [0.0] * 19
    # e2m1 codes of 6, .5, -1, 1, 2, 2, 4, 4, 6: 7, 1, 8|2, 2, 4, 4, 6, 6, 7
    assert enc.codes[:9].tolist() == [7, 1, 10, 2, 4, 4, 6, 6, 7]


def test_nvfp4_one_outlier():
    # scale=1: d = 1; amax 100, 100 / 6 = 16.67 -> e4m3 16 (step 2 in [16, 32): 16.67 is nearer 16);
    # so s = 16 as for MXFP4 and the same numbers; the outlier itself clips to 96
    x = padded(OUTLIER, 16)
    enc = NV.encode(x, scale=1.0)
    assert enc.scale_codes.tolist() == [e4m3_code(16.0)] == [0x58]
    assert NV.quantize(x, scale=1.0).tolist() == OUTLIER_Q16 + [0.0] * 3


def test_nvfp4_default_tensor_scale_by_hand():
    # amax_tensor = 2688 = 6 * 448, so d = 1 exactly
    # block 0: amax 2688 -> s = 448 (e4m3 max, code 0x7E); 1000 / 448 = 2.23 -> 2 -> 896; .7 -> 0
    # block 1: amax 3 -> s = 0.5 (code 0x30); 3 -> 6 -> 3; 1 -> 2 -> 1; .5 -> 1 -> .5; .25 -> .5 -> .25;
    #   -2.2 -> -4.4 -> -4 -> -2; .1 -> .2 -> 0; .125 -> .25 (tie) -> 0; .13 -> .26 -> .5 -> .25
    x = t([2688.0, 1000.0, 0.7] + [0.0] * 13 + [3.0, 1.0, 0.5, 0.25, -2.2, 0.1, 0.125, 0.13])
    enc = NV.encode(x)
    assert enc.tensor_scale == 1.0
    assert enc.scale_codes.tolist() == [0x7E, 0x30]
    expected = [2688.0, 896.0, 0.0] + [0.0] * 13 + [3.0, 1.0, 0.5, 0.25, -2.0, 0.0, 0.0, 0.25]
    assert NV.quantize(x).tolist() == expected
    # the same tensor times 2**-10: d = 2**-10 exactly, everything scales
    assert NV.quantize(x * 2.0**-10).tolist() == [v * 2.0**-10 for v in expected]


def test_amax_on_a_power_of_two():
    # MXFP4, amax 8: floor(log2 8) = 3, X = 2**(3 - 2) = 2 (code 1 + 127 = 128):
    # 8 -> 4 -> 8; 7 -> 3.5 -> 4 (tie) -> 8; 6.5 -> 3.25 -> 3 -> 6; .5 -> .25 -> 0 (tie);
    # -3 -> -1.5 -> -3; 1.1 -> .55 -> .5 -> 1
    x = padded([8.0, 7.0, 6.5, 0.5, -3.0, 1.1], 32)
    assert MX.encode(x).scale_codes.tolist() == [128]
    assert MX.quantize(x)[:6].tolist() == [8.0, 8.0, 6.0, 0.0, -3.0, 1.0]
    # just below the power of two, amax 7.99: X = 1, and the top values clip to 6 (the MX rule
    # loses the top of the range): 7.99 -> 6, 7 -> 6, 6.5 -> 6, .5, -3, 1.1 -> 1
    x = padded([7.99, 7.0, 6.5, 0.5, -3.0, 1.1], 32)
    assert MX.encode(x).scale_codes.tolist() == [127]
    assert MX.quantize(x)[:6].tolist() == [6.0, 6.0, 6.0, 0.5, -3.0, 1.0]
    # NVFP4 (scale 1), amax 8: 8 / 6 = 1.333 -> e4m3 1.375 (between 1.25 and 1.375, nearer 1.375);
    # 8 / 1.375 = 5.82 -> 6 -> 8.25; 7 -> 5.09 -> 6 -> 8.25; 6.5 -> 4.73 -> 4 -> 5.5;
    # .5 -> .364 -> .5 -> .6875; -3 -> -2.18 -> -2 -> -2.75; 1.1 -> .8 -> 1 -> 1.375
    x = padded([8.0, 7.0, 6.5, 0.5, -3.0, 1.1], 16)
    assert NV.encode(x, scale=1.0).scale_codes.tolist() == [e4m3_code(1.375)]
    assert NV.quantize(x, scale=1.0)[:6].tolist() == [8.25, 8.25, 5.5, 0.6875, -2.75, 1.375]
    # NVFP4, amax 12: 12 / 6 = 2, a power of two: 12 -> 6 -> 12; 3 -> 1.5 -> 3; 5 -> 2.5 -> 2 -> 4;
    # .5 -> .25 -> 0 (tie)
    x = padded([12.0, 3.0, 5.0, 0.5], 16)
    assert NV.encode(x, scale=1.0).scale_codes.tolist() == [e4m3_code(2.0)] == [0x40]
    assert NV.quantize(x, scale=1.0)[:4].tolist() == [12.0, 3.0, 4.0, 0.0]


def test_a_block_with_nan_or_inf_is_all_nan():
    # MXFP4, two blocks; block 0 holds a NaN, block 1 = [1, 2, 3]: amax 3, X = 2**(1 - 2) = .5
    # (code 126): 1 -> 2 -> 1, 2 -> 4 -> 2, 3 -> 6 -> 3
    x = torch.zeros(64)
    x[:5] = t([1.0, 2.0, 3.0, math.nan, 4.0])
    x[32:35] = t([1.0, 2.0, 3.0])
    q = MX.quantize(x)
    assert torch.isnan(q[:32]).all()
    assert q[32:35].tolist() == [1.0, 2.0, 3.0] and (q[35:] == 0).all()
    assert MX.encode(x).scale_codes.tolist() == [255, 126]  # 255: E8M0 NaN
    x[3] = -math.inf
    assert torch.isnan(MX.quantize(x)[:32]).all() and MX.quantize(x)[32:35].tolist() == [1.0, 2.0, 3.0]
    # NVFP4, default tensor scale: it ignores the NaN/inf; amax 2688 -> d = 1;
    # block 1: [2688, 1] -> s = 448: 2688 -> 6 -> 2688; 1 / 448 -> 0
    x = torch.zeros(32)
    x[2] = math.nan
    x[7] = math.inf
    x[16], x[17] = 2688.0, 1.0
    enc = NV.encode(x)
    assert enc.tensor_scale == 1.0 and enc.scale_codes.tolist() == [0x7F, 0x7E]  # 0x7F: e4m3 NaN
    q = NV.quantize(x)
    assert torch.isnan(q[:16]).all() and q[16:].tolist() == [2688.0] + [0.0] * 15
    # 2-D tiles: a NaN poisons its 16x16 tile only
    x = torch.ones(32, 16)
    x[20, 3] = math.nan
    q = NV2D.quantize(x, scale=1.0)
    assert torch.isnan(q[16:]).all() and not torch.isnan(q[:16]).any()


def test_partial_last_block():
    # MXFP4, 40 = 32 + 8. Block 0: 1 and 31 x .75: X = 2**(0 - 2) = .25, .75 -> 3 -> .75, 1 -> 4 -> 1.
    # Block 1 (8 elements) has its own scale 16 (the outlier numbers above)
    x = t([1.0] + [0.75] * 31 + OUTLIER[:8])
    enc = MX.encode(x)
    assert enc.codes.shape == (40,) and enc.scale_codes.tolist() == [125, 131]
    assert MX.quantize(x).tolist() == [1.0] + [0.75] * 31 + OUTLIER_Q16[:8]
    # NVFP4 (scale 1), 20 = 16 + 4. Block 0: sixteen 1s: 1 / 6 = .1667 -> e4m3 .171875
    # (step 1/64 in [1/8, 1/4): 10.67 steps -> 11); 1 / .171875 = 5.82 -> 6 -> 1.03125.
    # Block 1 (4 elements): [12, 3, 5, .5] -> s = 2 -> [12, 3, 4, 0] (see above)
    x = t([1.0] * 16 + [12.0, 3.0, 5.0, 0.5])
    assert NV.encode(x, scale=1.0).scale_codes.tolist() == [e4m3_code(0.171875), 0x40]
    assert NV.quantize(x, scale=1.0).tolist() == [1.03125] * 16 + [12.0, 3.0, 4.0, 0.0]
    # a last block of one element, along a middle axis: 33 = 32 + 1.
    # Block 0: thirty-two 5s: X = 2**(2 - 2) = 1, 5 is the tie between 4 and 6 -> 4 (even code 6).
    # Block 1: .3 alone: X = 2**(-2 - 2) = 1/16, .3 * 16 = 4.8 -> 4 -> .25
    x = torch.full((2, 33, 3), 5.0)
    x[:, 32, :] = 0.3
    q = MX.quantize(x, axis=1)
    assert (q[:, 32, :] == 0.25).all() and (q[:, :32, :] == 4.0).all()
    assert torch.equal(MX.quantize(x.transpose(1, 2)).transpose(1, 2), q)
    assert MX.encode(x, axis=1).scale_codes.shape == (2, 3, 2)


def test_2d_16x16_tiles():
    # BlockFormat((16, 16), 'e4m3'), 20 x 20 -> tiles 16x16, 16x4, 4x16, 4x4; scale 1
    x = torch.empty(20, 20)
    x[:16, :16] = 1.0
    x[2, 3] = 12.0  # tile (0,0): amax 12 -> s = 2; 1 -> .5 -> 1; 12 -> 6 -> 12
    x[:16, 16:] = 0.3  # tile (0,1): .3 / 6 = .05 -> e4m3 .05078125 (1.625 * 2**-5); .3 / s = 5.91 -> 6
    x[16:, :16] = -7.0  # tile (1,0): 7 / 6 = 1.167 -> e4m3 1.125; -7 / 1.125 = -6.2 -> -6 -> -6.75
    x[16:, 16:] = 0.0  # tile (1,1): zero
    expected = torch.empty(20, 20)
    expected[:16, :16] = 1.0
    expected[2, 3] = 12.0
    expected[:16, 16:] = 6 * 0.05078125
    expected[16:, :16] = -6.75
    expected[16:, 16:] = 0.0
    assert torch.equal(NV2D.quantize(x, scale=1.0), expected)
    enc = NV2D.encode(x, scale=1.0)
    assert enc.scale_codes.tolist() == [[0x40, e4m3_code(0.05078125)], [e4m3_code(1.125), 0]]
    # tiles over the last two dims of a batch; one tile is not the same as 16 1-D blocks
    xb = torch.stack([x, 2 * x])
    assert torch.equal(NV2D.quantize(xb, scale=1.0), torch.stack([expected, 2 * expected]))
    assert not torch.equal(NV.quantize(x, scale=1.0), expected)


def test_nvfp4_small_block_scale_by_hand():
    """e4m3 subnormal block scales (step 2**-9). amax = .017578125 = 9 * 2**-9:
    9 * 2**-9 / 6 = 1.5 * 2**-9, a tie between codes 1 and 2 -> 2 * 2**-9 = 2**-8;
    .017578125 / 2**-8 = 4.5 -> 4 (tie, even code) -> 2**-6 = .015625.
    (So NVFP4 is not idempotent here: .015625 / 6 -> s = 2**-9, 2**-6 / 2**-9 = 8 -> 6 -> .01171875.)"""
    x = padded([0.017578125, 0.001], 16)
    q = NV.quantize(x, scale=1.0)
    assert NV.encode(x, scale=1.0).scale_codes.tolist() == [2]
    assert q[:2].tolist() == [0.015625, 2.0**-9]  # .001 / 2**-8 = .256: past the tie .25 -> .5
    assert NV.quantize(q, scale=1.0)[0].item() == 0.01171875


# -- against the per-block reference ------------------------------------------------------------


def check(fmt, x, scale=None, axis=-1, what=""):
    x = torch.as_tensor(x)
    got = fmt.quantize(x, scale, axis=axis) if len(fmt.block_shape) == 1 else fmt.quantize(x, scale)
    assert got.shape == x.shape and got.dtype == x.dtype
    R.assert_same(got, R.block_quantize(fmt, x, scale, axis), x, what or f"{fmt.name} scale={scale}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_random_blocks_agree_with_reference(name):
    fmt = VARIANTS[name]
    wide = log_uniform((500, 200), -40, 40, seed=1)  # 200: partial last blocks for 8, 16 and 32
    # per row a random magnitude, then a narrow spread: every element of a block matters
    rows = np.exp2(np.random.default_rng(2).integers(-30, 30, (500, 1))).astype(np.float32)
    narrow = log_uniform((500, 200), -4, 3, seed=3) * rows
    for x in (wide, narrow):
        for scale in (None, 1.0, 0.37, 2.0**-5):
            check(fmt, torch.from_numpy(x), scale, what=f"{name} scale={scale}")
    check(fmt, torch.from_numpy(narrow).reshape(5, 100, 200), None, what=f"{name} 3-D")
    if len(fmt.block_shape) == 1:
        check(fmt, torch.from_numpy(narrow), None, axis=0, what=f"{name} axis 0")
        assert torch.equal(
            fmt.quantize(torch.from_numpy(narrow), axis=0), fmt.quantize(torch.from_numpy(narrow.T)).T
        )


def tie_blocks(fmt):
    """Rows = blocks whose scale is a power of two; the other elements sit on every e2m1 tie
    (and its float32 neighbours) and grid point, both signs."""
    units = np.array(R.E2M1_MAGNITUDES)
    ties = (units[1:] + units[:-1]) / 2
    body = np.concatenate([ties, units])  # <= 6: the lead element keeps the scale
    body = np.concatenate([body, np.nextafter(body.astype(np.float32), np.float32(np.inf)), -body])
    B = 32 if fmt.scale_format == "e8m0" else 16
    lead = 4.0 if fmt.scale_format == "e8m0" else 6.0  # MX: X = 1; NV (scale 1): s = 1
    rows = []
    for k in range(0, len(body), B - 1):
        chunk = body[k : k + B - 1]
        rows.append(np.concatenate([[lead], chunk, np.zeros(B - 1 - len(chunk))]))
    blocks = np.array(rows, dtype=np.float32)
    return np.concatenate([blocks * np.float32(2.0**e) for e in (-20, 0, 7)])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_edge_blocks_agree_with_reference(name):
    fmt = VARIANTS[name]
    if len(fmt.block_shape) == 1:
        ties = tie_blocks(fmt)
        for scale in (1.0, 2.0**-3):  # the ties stay ties with a power-of-two tensor scale
            x = ties * np.float32(scale)
            check(fmt, torch.from_numpy(x), scale, what=f"{name} ties scale={scale}")
    f32 = np.finfo(np.float32)
    special_rows = [
        [0.0, -0.0, 2.0**-149, -3 * 2.0**-149, 2.0**-130, 2.0**-126],  # zeros, float32 subnormals
        [2.0**-149] * 5,
        [f32.max, -f32.max, 1.0, 2.0**-126],  # largest float32
        [float(np.nextafter(np.float32(6 * 448), np.float32(np.inf))), 1.0],
        [math.inf, 1.0],
        [-math.inf, 1.0, 2.0],
        [math.nan, 0.0],
        [6.0, 5.0, 4.5, 3.5, 2.5, 1.75, 1.25, 0.75, 0.25],
        [-6.0 * 2**-6, 2**-10, 2**-9, 3 * 2**-11],  # e4m3 subnormal block scales
    ]
    width = 40
    x = np.zeros((len(special_rows), width), dtype=np.float32)
    for i, r in enumerate(special_rows):
        x[i, : len(r)] = r
    xt = torch.from_numpy(x)
    check(fmt, xt, None, what=f"{name} special rows")
    check(fmt, xt, 1.0, what=f"{name} special rows scale=1")
    for i in range(len(special_rows)):  # each row alone: its own tensor scale
        if np.abs(x[i][np.isfinite(x[i])]).max() > 2.0**-120:  # (tiny-only tensors: see below)
            check(fmt, xt[i : i + 1], None, what=f"{name} row {i} alone")


@pytest.mark.parametrize("name", BLOCK)
def test_finite_input_with_small_tensor_scale_is_not_nan(name):
    """x / scale overflows float32 for x near float32's max: the block holds only finite
    numbers, so (docstring) the quotient is clamped to float32's max M = (2 - 2**-23) 2**127
    and saturates; it must not turn into NaN. MXFP4: X = 2**(127 - 2), M / X ~ 8 -> 6, value
    6 * 2**125 * 2**-5 = 6 * 2**120; NVFP4: s = 448 (saturated), element 6, value
    6 * 448 * 2**-5 = 84."""
    fmt = VARIANTS[name]
    x = torch.zeros(16, 16)
    x[0, 0] = 3e38
    q = fmt.quantize(x, 2.0**-5)
    n_nan = int(torch.isnan(q).sum())
    assert n_nan == 0, f"finite input became NaN: {q[0, :4].tolist()}"
    assert q[0, 0].item() == (6 * 2.0**120 if fmt.scale_format == "e8m0" else 84.0)
    check(fmt, x, 2.0**-5)


def test_nvfp4_tensor_of_float32_subnormals():
    """amax_tensor / (6 * 448) underflows to 0 in float32 when amax < ~1e-42; quantize must
    still accept the tensor (every finite tensor is valid input) and give finite numbers
    no larger than the input's magnitude (amax is exactly representable: e = 6, s = 448)."""
    for fmt in (NV, NV2D):
        x = t([1e-42, -5e-43, 0.0, 2.0**-149]).reshape(2, 2)
        q = fmt.quantize(x)
        assert torch.isfinite(q).all()
        assert ((q == 0) | (torch.sign(q) == torch.sign(x))).all()
        assert (q.abs() <= 2 * x.abs()).all()


# -- stochastic rounding of the elements ---------------------------------------------------------

N_DRAWS = 100_000


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_block_stochastic_rounding_is_unbiased(name):
    fmt = VARIANTS[name]
    B = fmt.block_shape[0]
    # amax 12: NVFP4 (scale 1) s = e4m3(2) = 2; MXFP4 X = 2**(3 - 2) = 2. Elements / 2:
    # 1.3 -> .65 in (.5, 1), p(up) = .3; -.7 -> -.35 in (-.5, 0), p = .7; 2.6 -> 1.3 in (1, 1.5), p = .6;
    # 5 -> 2.5 in (2, 3), p = .5; 12 -> 6 exactly
    row = [12.0, 1.3, -0.7, 2.6, 5.0] + [0.0] * (B - 5)
    x = torch.tensor([row] * N_DRAWS)
    lo = np.array([12.0, 1.0, 0.0, 2.0, 4.0])
    hi = np.array([12.0, 2.0, -1.0, 3.0, 6.0])
    y = np.array([12.0, float(np.float32(1.3)), float(np.float32(-0.7)), float(np.float32(2.6)), 5.0])

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return fmt.quantize(x, 1.0, rounding="stochastic", generator=g)

    q = run(5)
    assert (
        fmt.encode(x[:3], 1.0, rounding="stochastic").scale_codes == (0x40 if name == "nvfp4" else 128)
    ).all()
    qn = q[:, :5].double().numpy()
    assert ((qn == lo) | (qn == hi)).all()
    assert (q[:, 5:] == 0).all()
    for j in range(1, 5):
        p = (y[j] - lo[j]) / (hi[j] - lo[j])
        se = abs(hi[j] - lo[j]) * math.sqrt(p * (1 - p) / N_DRAWS)
        assert abs(qn[:, j].mean() - y[j]) <= 4 * se, (j, qn[:, j].mean(), y[j])
    assert torch.equal(q, run(5))
    assert not torch.equal(q, run(6))
