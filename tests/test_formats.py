"""Element-wise formats (IntFormat, LogFormat, FloatFormat) against the first-principles
reference in tests/reference.py, torch's own casts, and numbers worked out by hand.

Block formats (mxfp4, nvfp4) have their own reference in test_block_formats.py; the tests
here that apply to every format (NaN, empty, half inputs, bad arguments) cover them too.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

import reference as R
from fourbit import formats
from fourbit.formats import BlockFormat, FloatFormat, IntFormat, LogFormat, pixels_to_int4
from fourbit.formats.base import philox4x32_10, random_uniform

ALL = formats.names()
BLOCK = [n for n in ALL if isinstance(formats.get(n), BlockFormat)]
ELEMENT = [n for n in ALL if n not in BLOCK]
NO_NAN_CODE = [
    "int4",
    "uint4",
    "int8",
    "fp4_radix4",
    "fp4_radix2",
    "fp4_radix8",
    "hfp8_fwd",
    "hfp8_bwd",
    "fp4_e2m1",
]
SCALES = [1.0, 0.37, 2.0**-5]


# formats outside the registry that exercise the remaining parameters
EXTRA = {
    "symint4": IntFormat(4, symmetric=True),
    "uint2": IntFormat(2, signed=False),
    "radix4_e2": LogFormat(4, 2),
    "radix4_underflow_sto": dataclasses.replace(formats.get("fp4_radix4"), underflow="stochastic"),
    "e4m3_nosub": FloatFormat(4, 3, specials="fn", subnormals=False),
    "e3m2_bias5": FloatFormat(3, 2, bias=5, specials="finite"),
    "e5m2_max": FloatFormat(5, 2, max_value_override=24576.0),
    "e4m3_ieee": FloatFormat(4, 3),
    "radix2_luq": dataclasses.replace(formats.get("fp4_radix2"), underflow="stochastic"),  # LUQ
}


def fmt_of(name):
    return EXTRA[name] if name in EXTRA else formats.get(name)


def deterministic_roundings(fmt):
    return [r for r in fmt.roundings if r != "stochastic"]


DETERMINISTIC = ELEMENT + [k for k, f in EXTRA.items() if getattr(f, "underflow", "nearest") == "nearest"]


def log_uniform(n, lo_exp, hi_exp, seed):
    """float32, random sign, magnitude log-uniform in [2**lo_exp, 2**hi_exp]."""
    rng = np.random.default_rng(seed)
    mag = np.exp2(rng.uniform(lo_exp, hi_exp, n))
    with np.errstate(over="ignore"):  # beyond float32's range: inf, a fine input too
        return (rng.choice([-1.0, 1.0], n) * mag).astype(np.float32)


def unit_range_exps(fmt, phase=0):
    g = R.grid(fmt, phase)
    pos = g[g > 0]
    return math.log2(pos[0]) - 3, math.log2(pos[-1]) + 3


# -- the reference itself, against the spec's own numbers -------------------------------------


def test_reference_grids_match_the_spec_by_hand():
    assert R.grid(formats.get("int4")).tolist() == list(range(-8, 8))
    assert R.grid(formats.get("uint4")).tolist() == list(range(16))
    assert R.grid(formats.get("int8")).tolist() == list(range(-128, 128))
    assert R.grid(EXTRA["symint4"]).tolist() == list(range(-7, 8))
    r4 = [4.0**-k for k in range(7)]
    assert R.grid(formats.get("fp4_radix4")).tolist() == [-v for v in r4] + [0.0] + r4[::-1]
    assert R.grid(formats.get("fp4_radix4"), 1).tolist() == [-2 * v for v in r4] + [0.0] + [
        2 * v for v in r4[::-1]
    ]
    e2m1 = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert R.grid(formats.get("fp4_e2m1")).tolist() == [-v for v in e2m1[::-1]] + [0.0] + e2m1
    # (count of finite values with +-0 merged, smallest positive, largest)
    table = {
        "fp16": (63487, 2.0**-24, 65504.0),
        "bf16": (65279, 2.0**-133, (2 - 2**-7) * 2.0**127),
        "fp8_e4m3": (253, 2.0**-9, 448.0),
        "fp8_e5m2": (247, 2.0**-16, 57344.0),
        "hfp8_fwd": (255, 2.0**-9, 480.0),
        "hfp8_bwd": (255, 2.0**-16, 114688.0),
    }
    for name, (count, smallest, largest) in table.items():
        g = R.grid(formats.get(name))
        assert (len(g), g[g > 0][0], g[-1]) == (count, smallest, largest), name
    g = R.grid(EXTRA["e4m3_nosub"])
    assert g[g > 0][0] == 2.0**-6 and len(g) == 253 - 14
    # the reference's rounding on a few ties worked by hand
    assert R.round_e2m1(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0])).tolist() == [
        0.0,
        1.0,
        1.0,
        2.0,
        2.0,
        4.0,
        4.0,
        6.0,
    ]
    assert R.round_int(np.array([0.5, 1.5, 2.5, -0.5, -2.5, 7.5, -8.5]), formats.get("int4")).tolist() == [
        0,
        2,
        2,
        0,
        -2,
        7,
        -8,
    ]


@pytest.mark.parametrize("name", ALL + list(EXTRA))
def test_values_are_the_first_principles_grid(name):
    fmt = fmt_of(name)
    for phase in fmt.phases:
        expected = R.grid(fmt, phase)
        v = fmt.values(phase=phase)
        assert v.dtype == torch.float32
        np.testing.assert_array_equal(v.double().numpy(), expected)
        assert fmt.max_value(phase) == expected[-1]
        assert fmt.min_positive(phase) == expected[expected > 0][0]
        for scale in (0.37, 2.0**-5):
            np.testing.assert_array_equal(
                fmt.values(scale, phase).numpy(), (expected * np.float32(scale)).astype(np.float32)
            )


# -- agreement with the reference ---------------------------------------------------------------


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_random_inputs_agree_with_reference(name):
    fmt = fmt_of(name)
    wide = log_uniform(100_000, -40, 40, seed=1)
    for phase in fmt.phases:
        lo, hi = unit_range_exps(fmt, phase)
        for scale in SCALES:
            near = log_uniform(50_000, lo + math.log2(scale), hi + math.log2(scale), seed=2 + phase)
            for x in (wide, near):
                xt = torch.from_numpy(x)
                for rounding in deterministic_roundings(fmt):
                    got = fmt.quantize(xt, scale, phase, rounding)
                    assert got.dtype == torch.float32 and got.shape == xt.shape
                    R.assert_same(
                        got,
                        R.quantize(fmt, x, scale, phase, rounding),
                        x,
                        f"{name} s={scale} p={phase} {rounding}",
                    )


def nextafter32(v, direction):
    return np.nextafter(np.float32(v), np.float32(direction)).astype(np.float32)


F32_SPECIALS = np.array(
    [
        0.0,
        2.0**-149,  # float32 subnormals
        3 * 2.0**-149,
        2.0**-140,
        2.0**-127,
        2.0**-126 - 2.0**-149,
        2.0**-126,  # smallest float32 normal
        np.finfo(np.float32).max,
        np.inf,
    ],
    dtype=np.float32,
)


def edge_inputs(fmt, phase, scale):
    """Grid points, every midpoint between neighbours (ties), geometric midpoints, half the
    smallest magnitude, beyond the largest; each with its float32 neighbours; float32
    subnormals, +-0, +-inf, NaN."""
    g = R.grid(fmt, phase)
    pos = g[g > 0]
    pts = [g, (g[1:] + g[:-1]) / 2, [pos[0] / 2, pos[-1] * 2, pos[-1] * 1.5]]
    if isinstance(fmt, LogFormat):
        pts.append(pos * math.sqrt(fmt.radix))
    u = np.concatenate([np.asarray(p, dtype=np.float64) for p in pts])
    s32 = np.float32(scale)
    with np.errstate(over="ignore"):
        x = (u * np.float64(s32)).astype(np.float32)
    x = np.concatenate([x, nextafter32(x, np.inf), nextafter32(x, -np.inf), F32_SPECIALS])
    return np.concatenate([x, -x, [np.nan, -0.0]]).astype(np.float32)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_edge_cases_agree_with_reference(name):
    fmt = fmt_of(name)
    for phase in fmt.phases:
        for scale in SCALES:
            x = edge_inputs(fmt, phase, scale)
            xt = torch.from_numpy(x)
            for rounding in deterministic_roundings(fmt):
                got = fmt.quantize(xt, scale, phase, rounding)
                R.assert_same(
                    got, R.quantize(fmt, x, scale, phase, rounding), x, f"{name} s={scale} p={phase}"
                )
            # the spec's own words, without the reference
            top = np.float32(R.grid(fmt, phase)[-1] * np.float32(scale))
            bottom = np.float32(R.grid(fmt, phase)[0] * np.float32(scale))
            q = fmt.quantize(
                torch.tensor([np.inf, -np.inf, np.nan, float(nextafter32(top, np.inf))]), scale, phase
            )
            assert q[0] == top and q[1] == bottom and torch.isnan(q[2]) and q[3] == top


def test_exact_ties_by_hand():
    """Tie rules of SPEC 2.1-2.3 on numbers worked out by hand."""

    def q(name, xs, **kw):
        return formats.get(name).quantize(torch.tensor(xs, dtype=torch.float32), **kw).tolist()

    # INT: ties to the even integer, then clamp
    assert q("int4", [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 6.5, 7.5, -8.5, 100.0]) == [
        0,
        2,
        2,
        0,
        -2,
        -2,
        6,
        7,
        -8,
        7,
    ]
    assert q("uint4", [-0.5, -3.0, 0.5, 14.5, 15.5]) == [0, 0, 0, 14, 15]
    assert q("int4", [0.5, 1.5, 2.5], scale=0.25) == [0.5, 1.5, 1.75]  # 2, 6, 10 -> 7 quarter-units
    # radix-4 FP4, linear nearest: threshold 2.5 * 4**-k; ties up; underflow at 4**-6 / 2
    m = 4.0**-6
    assert q("fp4_radix4", [0.625, 0.62499994, 0.15625, 2.5 * m, m / 2, m / 2 * 0.99999994, 5.0]) == [
        1.0,
        0.25,
        0.25,
        4 * m,
        m,
        0.0,
        1.0,
    ]
    # rounding='log': threshold at the geometric midpoint 2 * 4**-k
    assert q("fp4_radix4", [0.5, 0.49999997, 0.125, 0.6], rounding="log") == [1.0, 0.25, 0.25, 1.0]
    # radix 2 'log': threshold sqrt(2) * 2**-k; c, the smallest float32 >= sqrt(2), sits just above
    c = np.float32(math.sqrt(2))
    c = c if float(c) >= math.sqrt(2) else nextafter32(c, np.inf)
    s2 = float(c)
    below = float(nextafter32(s2 / 2, 0))
    assert q("fp4_radix2", [s2 / 2, below, 0.74, 0.76], rounding="log") == [1.0, 0.5, 1.0, 1.0]
    assert q("fp4_radix2", [0.74, 0.76]) == [0.5, 1.0]  # linear midpoint 0.75
    # e2m1: ties to the even code
    assert q("fp4_e2m1", [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, 7.0, 1e30]) == [
        0.0,
        1.0,
        1.0,
        2.0,
        2.0,
        4.0,
        4.0,
        6.0,
        6.0,
        6.0,
    ]
    # fp16: 1 + 2**-11 is halfway between 1 and 1 + 2**-10 (even: 1); 1 + 3 * 2**-11 -> 1 + 2**-9
    assert q("fp16", [1 + 2**-11, 1 + 3 * 2**-11, 65519.0, 65520.0, 2.0**-25, 3 * 2.0**-25]) == [
        1.0,
        1 + 2**-9,
        65504.0,
        65504.0,  # ties to even would overflow; saturating by default
        0.0,
        2.0**-23,
    ]
    # e4m3: 464 = (448 + 480) / 2 -> 448 even; 17 = between 16 and 18 -> 16 (even); 2**-10 -> 0
    assert q("fp8_e4m3", [464.0, 17.0, 19.0, 2.0**-10, 3 * 2.0**-10, 1e9]) == [
        448.0,
        16.0,
        20.0,
        0.0,
        2.0**-8,
        448.0,
    ]
    e4m3_ieee = dataclasses.replace(formats.get("fp8_e4m3"), overflow="inf")
    out = e4m3_ieee.quantize(torch.tensor([464.0, 464.00003, -500.0, np.inf]))
    assert out[0] == 448.0 and torch.isnan(out[1:]).all()
    fp16_ieee = dataclasses.replace(formats.get("fp16"), overflow="inf")
    assert fp16_ieee.quantize(torch.tensor([65519.0, 65520.0, -1e6])).tolist() == [
        65504.0,
        math.inf,
        -math.inf,
    ]


# -- bit-for-bit agreement with torch's casts ----------------------------------------------------------

CASTS = {
    "fp16": (torch.float16, torch.int16),
    "bf16": (torch.bfloat16, torch.int16),
    "fp8_e4m3": (torch.float8_e4m3fn, torch.uint8),
    "fp8_e5m2": (torch.float8_e5m2, torch.uint8),
}


def rounding_class_inputs(fields, seed):
    """float32 bit patterns: both signs, the given exponent fields, all 2**13 top mantissa bits,
    the low 10 bits in {0, 1, 0x3FF, random}: every rounding class of every <=10-bit mantissa."""
    g = torch.Generator().manual_seed(seed)
    low = torch.tensor([0, 1, 0x3FF, int(torch.randint(2, 0x3FF, (1,), generator=g))], dtype=torch.int32)
    mant = ((torch.arange(8192, dtype=torch.int32) << 10)[:, None] | low).reshape(-1)
    fields = torch.tensor(list(fields), dtype=torch.int32)
    parts = [(sign << 31) | (fields[:, None] << 23) | mant for sign in (0, 1)]
    return torch.cat(parts).reshape(-1).view(torch.float32)


@pytest.mark.parametrize("name", list(CASTS))
def test_bit_for_bit_with_torch_casts(name):
    dtype, int_view = CASTS[name]
    fmt = formats.get(name)
    ieee = fmt.specials == "ieee"
    as_cast = dataclasses.replace(fmt, overflow="inf") if ieee else fmt  # torch's e4m3fn cast saturates
    seen = 0
    for start in range(0, 255, 16):  # every finite float32 exponent field, 1M inputs at a time
        x = rounding_class_inputs(range(start, min(start + 16, 255)), seed=start)
        seen += x.numel()
        ref = x.to(dtype)
        ref_f, ref_c = ref.float(), ref.view(int_view)
        R.assert_same(as_cast.quantize(x), ref_f.numpy(), x, f"{name} quantize vs cast")
        assert torch.equal(as_cast.encode(x), ref_c), f"{name} encode vs cast"
        in_range = torch.isfinite(ref_f)
        R.assert_same(fmt.quantize(x)[in_range], ref_f[in_range].numpy(), x[in_range], f"{name} saturating")
        assert torch.equal(fmt.encode(x)[in_range], ref_c[in_range])
        # out of range the default saturates to +-max
        top = R.grid(fmt)[-1]
        assert torch.equal(fmt.quantize(x)[~in_range].abs(), torch.full_like(x[~in_range], top))
    assert seen == 2 * 255 * 8192 * 4
    inf = torch.tensor([math.inf, -math.inf])
    assert torch.equal(as_cast.quantize(inf), inf.to(dtype).float())
    assert torch.equal(as_cast.encode(inf), inf.to(dtype).view(int_view))


# -- the log formats' phases and radices ----------------------------------------------------------


def test_radix4_phase1_is_phase0_times_two():
    fmt = formats.get("fp4_radix4")
    assert torch.equal(fmt.values(phase=1), 2 * fmt.values(phase=0))
    x = torch.from_numpy(log_uniform(100_000, -20, 4, seed=5))
    for rounding in ("nearest", "log"):
        assert torch.equal(
            fmt.quantize(2 * x, phase=1, rounding=rounding), 2 * fmt.quantize(x, rounding=rounding)
        )
    # together the two phases hold every power of two from 2**-12 to 2**1
    both = torch.cat([fmt.values(phase=0), fmt.values(phase=1)])
    assert sorted({v for v in both.tolist() if v > 0}) == [2.0**k for k in range(-12, 2)]


def test_radix2_is_the_luq_grid():
    luq = [2.0**-k for k in range(7)]
    assert formats.get("fp4_radix2").values().tolist() == [-v for v in luq] + [0.0] + luq[::-1]
    r8 = [8.0**-k for k in range(7)]
    assert formats.get("fp4_radix8").values().tolist() == [-v for v in r8] + [0.0] + r8[::-1]


# -- stochastic rounding -------------------------------------------------------------------------------

N_DRAWS = 100_000

STOCHASTIC_CASES = [
    # (format name or EXTRA key, x, scale, phase, rounding)
    ("int4", 2.3, 1.0, 0, "stochastic"),
    ("int4", -5.7, 1.0, 0, "stochastic"),
    ("int4", 0.37 * 2.6, 0.37, 0, "stochastic"),
    ("uint4", 14.1, 1.0, 0, "stochastic"),
    ("int8", -100.9, 1.0, 0, "stochastic"),
    ("fp4_radix4", 0.3, 1.0, 0, "stochastic"),  # between 0.25 and 1
    ("fp4_radix4", -0.3, 1.0, 1, "stochastic"),  # phase 1: between 0.125 and 0.5
    ("fp4_radix4", 3e-3, 2.0**-5, 0, "stochastic"),
    ("fp4_radix2", 0.3, 1.0, 0, "stochastic"),
    ("fp4_radix8", 0.05, 1.0, 1, "stochastic"),
    ("fp16", 1 + 0.3 * 2**-10, 1.0, 0, "stochastic"),
    ("fp16", -0.7 * 2**-24, 1.0, 0, "stochastic"),  # below the smallest subnormal
    ("bf16", 3.14159, 1.0, 0, "stochastic"),
    ("fp8_e4m3", 300.0, 1.0, 0, "stochastic"),
    ("fp8_e4m3", 0.3 * 2**-9, 1.0, 0, "stochastic"),
    ("fp8_e5m2", -0.1, 0.37, 0, "stochastic"),
    ("hfp8_fwd", 3.3, 1.0, 0, "stochastic"),
    ("hfp8_bwd", 1000.5, 1.0, 0, "stochastic"),
    ("fp4_e2m1", 2.6, 1.0, 0, "stochastic"),
    ("fp4_e2m1", -0.1, 1.0, 0, "stochastic"),
    # LUQ-style stochastic underflow below the smallest magnitude m (then 0 or m)
    ("radix4_underflow_sto", 0.3 * 4.0**-6, 1.0, 0, "nearest"),
    ("radix4_underflow_sto", -0.05 * 4.0**-6, 1.0, 0, "stochastic"),
    ("radix4_underflow_sto", 0.7 * 2 * 4.0**-6, 1.0, 1, "log"),
    ("radix2_luq", 0.4 * 2.0**-6, 1.0, 0, "stochastic"),
]


def draws(fmt, x, scale, phase, rounding, seed):
    xt = torch.full((N_DRAWS,), x, dtype=torch.float32)
    return fmt.quantize(xt, scale, phase, rounding, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", STOCHASTIC_CASES, ids=lambda c: f"{c[0]}-{c[1]:.3g}-p{c[3]}-{c[4]}")
def test_stochastic_rounding_is_unbiased_between_neighbours(case):
    name, x, scale, phase, rounding = case
    fmt = fmt_of(name)
    y = float(np.float32(x) / np.float32(scale))  # what the format rounds
    lo, hi = (float(v[0]) for v in R.unit_neighbours(fmt, np.array([y]), phase))
    assert lo < y < hi, "a case must sit strictly between two grid points"
    s = np.float32(scale)
    lo_s, hi_s = np.float32(lo * np.float64(s)), np.float32(hi * np.float64(s))

    q = draws(fmt, x, scale, phase, rounding, seed=7).numpy()
    is_hi = q == hi_s
    assert np.all(is_hi | (q == lo_s)), f"left the neighbours {lo_s}, {hi_s}: {np.unique(q)}"
    p = (y - lo) / (hi - lo)
    mean = lo + is_hi.mean() * (hi - lo)
    se = (hi - lo) * math.sqrt(p * (1 - p) / N_DRAWS)
    assert abs(mean - y) <= 4 * se, f"mean {mean} vs {y} (4 se = {4 * se})"

    again = draws(fmt, x, scale, phase, rounding, seed=7).numpy()
    other = draws(fmt, x, scale, phase, rounding, seed=8).numpy()
    np.testing.assert_array_equal(q, again)
    assert not np.array_equal(q, other)


@pytest.mark.parametrize("name", ELEMENT + ["radix2_luq"])
def test_stochastic_rounding_of_many_values(name):
    """100k different in-range values: each lands on one of its two neighbours, and the
    normalised errors (q - y) / (hi - lo) average to zero within 4 standard errors."""
    fmt = fmt_of(name)
    for phase in fmt.phases:
        g = R.grid(fmt, phase)
        smallest, largest = g[g > 0][0], g[-1]
        if isinstance(fmt, IntFormat):
            x = np.random.default_rng(3).uniform(g[0], g[-1], 100_000).astype(np.float32)
        else:
            # below the smallest magnitude only FloatFormat and LogFormat(underflow='stochastic')
            # round stochastically
            below = 0 if isinstance(fmt, LogFormat) and fmt.underflow == "nearest" else 2
            x = log_uniform(100_000, math.log2(smallest) - below, math.log2(largest), seed=4)
        gen = torch.Generator().manual_seed(11)
        q = (
            fmt.quantize(torch.from_numpy(x), phase=phase, rounding="stochastic", generator=gen)
            .double()
            .numpy()
        )
        lo, hi = R.unit_neighbours(fmt, x.astype(np.float64), phase)
        assert np.all((q == lo) | (q == hi)), name
        between = hi > lo
        p = (x[between] - lo[between]) / (hi[between] - lo[between])
        z = (q[between] - x[between]) / (hi[between] - lo[between])
        se = math.sqrt(np.sum(p * (1 - p))) / between.sum()
        assert abs(z.mean()) <= 4 * se, (name, z.mean(), se)
        assert 0.1 < (q[between] == hi[between]).mean() < 0.9  # both neighbours occur
        gen.manual_seed(11)
        again = fmt.quantize(torch.from_numpy(x), phase=phase, rounding="stochastic", generator=gen)
        np.testing.assert_array_equal(again.double().numpy(), q)


@pytest.mark.parametrize("name", [n for n in formats.names() if isinstance(formats.get(n), FloatFormat)])
def test_storage_dtype_holds_every_grid_value_exactly(name):
    """What a saved HFP8 / fp16 / fp8 operand is kept in: every value of the grid survives."""
    fmt = formats.get(name)
    values = torch.cat([fmt.values(phase=p) for p in fmt.phases])
    assert fmt.storage_dtype is not None
    assert torch.equal(values.to(fmt.storage_dtype).float(), values)
    assert fmt.storage_dtype.itemsize <= 2


# Random123's known-answer vectors for Philox4x32-10 (tests/kat_vectors): counter, key, result
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_matches_random123_known_answers(counter, key, expected):
    words = philox4x32_10([torch.tensor([c]) for c in counter], key)
    assert [int(w) for w in words] == list(expected)


def test_stochastic_rounding_draws_are_uniform_and_follow_the_generator():
    """random_uniform: Philox keyed from the generator. 24-bit uniforms on [0, 1) (chi-square
    over 64 bins, no serial correlation), a function of the generator's state, which advances."""
    like = torch.empty(1_000_003)
    gen = torch.Generator().manual_seed(5)
    u = random_uniform(like, gen)
    assert u.shape == like.shape and u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert torch.equal(u * 2**24, (u * 2**24).floor())  # exactly 24-bit values
    counts = torch.histc(u, bins=64, min=0.0, max=1.0).double()
    expected = u.numel() / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 120, chi2  # 63 degrees of freedom: p < 1e-5 above 120
    centred = u.double() - 0.5
    assert abs(float((centred[1:] * centred[:-1]).mean())) < 4 * (1 / 12) / math.sqrt(u.numel())
    assert not torch.equal(random_uniform(like, gen), u)  # the generator moved on
    assert torch.equal(random_uniform(like, torch.Generator().manual_seed(5)), u)


# -- bad input ------------------------------------------------------------------------------------


def reference_any(fmt, x, scale=1.0):
    if isinstance(fmt, BlockFormat):
        return R.block_quantize(fmt, x, scale)
    return R.quantize(fmt, x, scale)


@pytest.mark.parametrize("name", ALL)
def test_nan_in_nan_out(name):
    fmt = formats.get(name)
    x = torch.from_numpy(log_uniform(96, -4, 4, seed=9)).reshape(2, 48)
    x[0, 5] = math.nan
    x[1, 40] = -math.nan
    got = fmt.quantize(x)
    assert torch.isnan(got[0, 5]) and torch.isnan(got[1, 40])
    R.assert_same(got, reference_any(fmt, x, None if name in BLOCK else 1.0), x, name)
    if not isinstance(fmt, BlockFormat):
        assert int(torch.isnan(got).sum()) == 2  # only there
    if fmt.has_nan_code and not isinstance(fmt, BlockFormat):
        assert torch.isnan(fmt.decode(fmt.encode(x))[0, 5])


@pytest.mark.parametrize("name", NO_NAN_CODE)
def test_encode_nan_without_a_nan_code_raises(name):
    fmt = formats.get(name)
    assert not fmt.has_nan_code
    with pytest.raises(ValueError, match="NaN"):
        fmt.encode(torch.tensor([1.0, math.nan]))
    fmt.encode(torch.tensor([1.0, math.inf]))  # inf saturates: fine


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5), (2, 0, 4)])
@pytest.mark.parametrize("name", ALL)
def test_empty_tensors(name, shape):
    fmt = formats.get(name)
    for dtype in (torch.float32, torch.float16):
        out = fmt.quantize(torch.empty(shape, dtype=dtype))
        assert out.shape == shape and out.dtype == dtype
    codes = fmt.encode(torch.empty(shape))
    codes = codes.codes if isinstance(fmt, BlockFormat) else codes
    assert codes.shape == shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ALL)
def test_half_precision_inputs(name, dtype):
    fmt = formats.get(name)
    x = torch.from_numpy(log_uniform(4096, -14, 14, seed=10)).reshape(64, 64).to(dtype)
    x[3, 3] = math.nan
    x[4, 4] = math.inf
    for scale in (None, 0.37) if name in BLOCK else (1.0, 0.37):
        got = fmt.quantize(x, scale)
        assert got.dtype == dtype and got.shape == x.shape
        expected = torch.from_numpy(reference_any(fmt, x.float(), scale)).to(dtype)
        R.assert_same(got.float(), expected.float().numpy(), x, f"{name} {dtype}")


@pytest.mark.parametrize("name", ALL)
def test_non_contiguous_inputs(name):
    fmt = formats.get(name)
    base = torch.from_numpy(log_uniform(64 * 96, -10, 10, seed=12)).reshape(64, 96)
    for view in (base.t(), base[:, ::3], base.t()[::2]):
        assert not view.is_contiguous()
        got = fmt.quantize(view)
        assert torch.equal(got, fmt.quantize(view.contiguous()))
        R.assert_same(got, reference_any(fmt, view.contiguous(), None if name in BLOCK else 1.0), view, name)


@pytest.mark.parametrize("name", ALL)
def test_zero_dim_tensors(name):
    fmt = formats.get(name)
    for v in (2.6, -0.3, 1e-3, 1e6, -math.inf):
        x = torch.tensor(v)
        got = fmt.quantize(x)
        assert got.shape == () and got.dtype == torch.float32
        R.assert_same(got, reference_any(fmt, x, None if name in BLOCK else 1.0), x, name)


def test_invalid_format_parameters_name_the_parameter():
    with pytest.raises(ValueError, match="bits"):
        IntFormat(bits=0)
    with pytest.raises(ValueError, match="bits"):
        IntFormat(bits=9)
    with pytest.raises(ValueError, match="radix"):
        LogFormat(radix=1)
    with pytest.raises(ValueError, match="radix"):
        LogFormat(radix=3)
    with pytest.raises(ValueError, match="exponent_bits"):
        LogFormat(4, 0)
    with pytest.raises(ValueError, match="underflow"):
        LogFormat(4, 3, underflow="bogus")
    with pytest.raises(ValueError, match="specials"):
        FloatFormat(4, 3, specials="bogus")
    with pytest.raises(ValueError, match="overflow"):
        FloatFormat(4, 3, overflow="bogus")
    with pytest.raises(ValueError, match="block_shape"):
        BlockFormat((0,))
    with pytest.raises(ValueError, match="scale_format"):
        BlockFormat((16,), "e5m2")


@pytest.mark.parametrize("name", ALL)
def test_invalid_call_arguments_name_the_parameter(name):
    fmt = formats.get(name)
    x = torch.ones(4)
    for scale in (0.0, -1.0, math.nan, math.inf, torch.tensor(0.0)):
        with pytest.raises(ValueError, match="scale"):
            fmt.quantize(x, scale)
    with pytest.raises(ValueError, match="rounding"):
        fmt.quantize(x, rounding="bogus")
    with pytest.raises(ValueError, match="phase"):
        fmt.quantize(x, phase=2)
    with pytest.raises(ValueError, match="x must be"):
        fmt.quantize(torch.ones(4, dtype=torch.int32))
    if not isinstance(fmt, BlockFormat):
        with pytest.raises(ValueError, match="scale"):
            fmt.encode(x, -1.0)
        with pytest.raises(ValueError, match="phase"):
            fmt.values(phase=2)


# -- input pixels ---------------------------------------------------------------------------------


def test_pixels_to_int4_by_hand():
    codes = pixels_to_int4(torch.tensor([0.0, 1.0, 0.3, 0.5, 0.7]))
    # 15p - 8: -8, 7, -3.5 -> -4 (even), -0.5 -> 0 (even), 2.5 -> 2 (even)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [-8, 7, -4, 0, 2]


def test_pixels_every_uint8_level():
    p = torch.arange(256, dtype=torch.uint8).float() / 255
    expected = np.round(15 * p.double().numpy() - 8)  # numpy rounds half to even
    assert pixels_to_int4(p).tolist() == expected.astype(int).tolist()
    assert pixels_to_int4(p).unique().tolist() == list(range(-8, 8))  # all 16 codes are used


@pytest.mark.parametrize("bad", [[-0.1], [1.0001], [0.5, math.nan], [math.inf]])
def test_pixels_outside_unit_interval_raise(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pixels_to_int4(torch.tensor(bad))
