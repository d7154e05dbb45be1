"""Fast quantizer paths against the plain reference definitions, bit for bit."""

import pytest
import torch

from fourbit import formats

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
