"""Fast quantizer paths against the plain reference definitions, bit for bit."""

from contextlib import contextmanager

import pytest
import torch

from fourbit import formats
from fourbit.formats import BlockFormat, kernels

LOG_FORMATS = ["fp4_radix2", "fp4_radix4", "fp4_radix8"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(300_000, generator=g) * torch.exp2(
        torch.randint(-60, 60, (300_000,), generator=g).float()
    )
    special = torch.tensor([0.0, 1e-45, 2.0**-126, float("inf"), float("nan"), 2.5, 0.625, 2.0**0.5, 1.125])
    # every exponent field with every top-4 mantissa pattern, and a NaN with a low payload
    grid = (torch.arange(2**13, dtype=torch.int32) << 19).view(torch.float32)
    payload_nan = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)
    x = torch.cat([wide, special, grid, payload_nan])
    return torch.cat([x, -x])


@pytest.mark.parametrize("name", LOG_FORMATS)
@pytest.mark.parametrize("rounding", ["nearest", "log"])
@pytest.mark.parametrize("phase", [0, 1])
def test_log_format_fast_rounding_equals_the_reference(name, rounding, phase):
    fmt = formats.get(name)
    x = _inputs()
    ref = fmt._round_reference(x, phase, rounding, None)
    for fast in (fmt._round(x, phase, rounding, None), fmt._round_bits(x, phase, rounding)):
        nan = torch.isnan(ref)
        assert torch.equal(torch.isnan(fast), nan)
        assert torch.equal(fast[~nan].view(torch.int32), ref[~nan].view(torch.int32))  # signed zeros too


@contextmanager
def pure_torch():
    """Every quantizer on its pure-PyTorch definition (the kernels' oracle)."""
    saved = kernels.applies
    kernels.applies = lambda x: False
    try:
        yield
    finally:
        kernels.applies = saved


def _same_bits(fast: torch.Tensor, ref: torch.Tensor) -> None:
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(fast), nan)
    assert torch.equal(fast[~nan].view(torch.int32), ref[~nan].view(torch.int32))  # signed zeros too


def test_the_kernels_build_and_load_here():
    assert kernels.library() is not None, "kernels.c did not build: see the warning"


SCALES = [1.0, 0.37, torch.tensor(3.1e-3), 2.0**-20, 6.5e4]


@pytest.mark.parametrize("name", [n for n in formats.names() if not isinstance(formats.get(n), BlockFormat)])
@pytest.mark.parametrize("scale", SCALES, ids=str)
def test_every_format_fast_quantize_equals_the_definition(name, scale):
    fmt = formats.get(name)
    x = _inputs()
    for phase in fmt.phases:
        for rounding in [r for r in fmt.roundings if r != "stochastic"]:
            fast = fmt.quantize(x, scale, phase, rounding)
            with pure_torch():
                ref = fmt.quantize(x, scale, phase, rounding)
            _same_bits(fast, ref)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "nvfp4_2d"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_block_format_fast_quantize_equals_the_definition(name, axis):
    fmt = formats.get(name)
    x = _inputs()
    x = x[: x.numel() // 50 * 50].reshape(-1, 50)  # 50: blocks padded at the end of each row
    x[7, 3] = float("nan")  # one NaN block, one inf block, and one of subnormals only
    x[100, 40] = float("-inf")
    x[200] = 1e-45
    for scale in (None, 2.0**-10, torch.tensor(0.3)):
        fast = fmt.quantize(x, scale, axis=axis)
        with pure_torch():
            ref = fmt.quantize(x, scale, axis=axis)
        _same_bits(fast, ref)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "nvfp4_2d"])
@pytest.mark.parametrize("shape", [(0,), (0, 50), (3, 0), (), (5,), (2, 3, 37), (40, 1)], ids=str)
def test_block_format_fast_quantize_of_odd_shapes(name, shape):
    fmt = formats.get(name)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 100
    for axis in {-1, 0} if len(shape) else {-1}:
        fast = fmt.quantize(x, axis=axis)
        with pure_torch():
            ref = fmt.quantize(x, axis=axis)
        _same_bits(fast, ref)


def test_fast_paths_keep_the_input_dtype_and_fall_back_for_other_dtypes():
    x = _inputs()
    for name in ("int4", "fp4_radix4", "fp4_e2m1"):
        fmt = formats.get(name)
        half = x.clamp(-6e4, 6e4).half()
        out = fmt.quantize(half, 0.5)
        with pure_torch():
            ref = fmt.quantize(half, 0.5)
        assert out.dtype == torch.float16 and torch.equal(out.isnan(), ref.isnan())
        assert torch.equal(out[~out.isnan()], ref[~ref.isnan()])
