"""Fast quantizer paths against the plain reference definitions, bit for bit."""

import dataclasses
from contextlib import contextmanager, nullcontext

import pytest
import torch

import fourbit
from fourbit import formats
from fourbit.formats import BlockFormat, base, kernels
from fourbit.nn import QMatmul
from fourbit.nn.gemm import _pact_backward
from fourbit.nn.quant import quantize_int_operand, quantize_operand
from test_engine_training import LSTMNet, SmallResNet, _lstm_batch, _resnet_batch

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
    saved = kernels.available
    kernels.available = lambda: False
    try:
        yield
    finally:
        kernels.available = saved


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
        for rounding in fmt.roundings:  # stochastic ones with the same generator state
            fast = fmt.quantize(x, scale, phase, rounding, torch.Generator().manual_seed(7))
            with pure_torch():
                ref = fmt.quantize(x, scale, phase, rounding, torch.Generator().manual_seed(7))
            _same_bits(fast, ref)


@pytest.mark.parametrize("name", LOG_FORMATS)
@pytest.mark.parametrize("scale", [1.0, 0.37, 2.0**-20], ids=str)
def test_stochastic_underflow_fast_quantize_equals_the_definition(name, scale):
    """LUQ's gradient format: stochastic rounding and stochastic underflow, two draws each."""
    fmt = dataclasses.replace(formats.get(name), underflow="stochastic")
    x = _inputs()
    for phase in fmt.phases:
        for rounding in fmt.roundings:
            fast = fmt.quantize(x, scale, phase, rounding, torch.Generator().manual_seed(7))
            with pure_torch():
                ref = fmt.quantize(x, scale, phase, rounding, torch.Generator().manual_seed(7))
            _same_bits(fast, ref)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "nvfp4_2d"])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_block_format_fast_quantize_equals_the_definition(name, axis, rounding):
    fmt = formats.get(name)
    x = _inputs()
    x = x[: x.numel() // 50 * 50].reshape(-1, 50)  # 50: blocks padded at the end of each row
    x[7, 3] = float("nan")  # one NaN block, one inf block, and one of subnormals only
    x[100, 40] = float("-inf")
    x[200] = 1e-45

    def draws():  # the same generator state for both paths (stochastic rounding)
        return {"rounding": rounding, "generator": torch.Generator().manual_seed(7), "axis": axis}

    for scale in (None, 2.0**-10, torch.tensor(0.3)):
        fast = fmt.quantize(x, scale, **draws())
        fast_codes = fmt.encode(x, scale, **draws())
        with pure_torch():
            ref = fmt.quantize(x, scale, **draws())
            ref_codes = fmt.encode(x, scale, **draws())
            ref_decoded = fmt.decode(ref_codes)
        _same_bits(fast, ref)
        for a, b in zip(fast_codes[:3], ref_codes[:3], strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
        _same_bits(fmt.decode(fast_codes), ref_decoded)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "nvfp4_2d"])
@pytest.mark.parametrize("shape", [(0,), (0, 50), (3, 0), (), (5,), (2, 3, 37), (40, 1)], ids=str)
def test_block_format_fast_quantize_of_odd_shapes(name, shape):
    fmt = formats.get(name)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 100
    for axis in {-1, 0} if len(shape) else {-1}:
        fast, fast_codes = fmt.quantize(x, axis=axis), fmt.encode(x, axis=axis)
        with pure_torch():
            ref, ref_codes = fmt.quantize(x, axis=axis), fmt.encode(x, axis=axis)
        _same_bits(fast, ref)
        assert all(torch.equal(a, b) for a, b in zip(fast_codes[:3], ref_codes[:3], strict=True))
        _same_bits(fmt.decode(fast_codes), fmt.decode(ref_codes))
        # stochastic: one draw per element of the padded block layout, in the same order
        draws = {"axis": axis, "rounding": "stochastic"}
        fast = fmt.quantize(x, **draws, generator=torch.Generator().manual_seed(2))
        with pure_torch():
            ref = fmt.quantize(x, **draws, generator=torch.Generator().manual_seed(2))
        _same_bits(fast, ref)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("axis", [1, -2, 0])
def test_block_format_fast_quantize_along_a_strided_axis(name, axis):
    """Blocks along a middle axis are quantized in place (no transposition), in chunks of 64
    columns and 16 rows: 150 columns leave a partial chunk, 37 rows a partial block, and
    mxfp4's blocks of 32 rows take two chunks of rows."""
    fmt = formats.get(name)
    x = torch.randn(3, 37, 150, generator=torch.Generator().manual_seed(3)) * 10
    x[1, 5, 70], x[2, 36, 149], x[0, :16, 3] = float("nan"), float("inf"), 1e-45
    for rounding in ("nearest", "stochastic"):
        draws = {"axis": axis, "rounding": rounding}
        fast = fmt.quantize(x, **draws, generator=torch.Generator().manual_seed(4))
        fast_codes = fmt.encode(x, **draws, generator=torch.Generator().manual_seed(4))
        with pure_torch():
            ref = fmt.quantize(x, **draws, generator=torch.Generator().manual_seed(4))
            ref_codes = fmt.encode(x, **draws, generator=torch.Generator().manual_seed(4))
            ref_decoded = fmt.decode(ref_codes)
        _same_bits(fast, ref)
        assert all(torch.equal(a, b) for a, b in zip(fast_codes[:3], ref_codes[:3], strict=True))
        _same_bits(fmt.decode(fast_codes), ref_decoded)
        assert fast.is_contiguous()


@pytest.mark.parametrize("n", [0, 1, 3, 4, 255, 256, 257, 1001, 300_001])
def test_philox_kernel_equals_the_definition(n):
    fast = base.philox_uniform((0x12345678, 0x9ABCDEF0), n)
    with pure_torch():
        ref = base.philox_uniform((0x12345678, 0x9ABCDEF0), n)
    assert torch.equal(fast, ref)


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


class MatmulNet(torch.nn.Module):
    """Linear -> attention-style QMatmuls (q·kᵀ, then ·v) -> Linear."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(5, 24)
        self.scores, self.mix = QMatmul(), QMatmul()
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.proj(x).chunk(3, -1)
        attn = torch.softmax(self.scores(q, k.transpose(1, 2)), -1)
        return self.head(self.mix(attn, v)).mean(1)


def _train(make, batch, recipe: str, steps: int = 3) -> dict:
    torch.manual_seed(0)
    model = make()
    x, y = batch(0)
    fourbit.convert(model, recipe, example_input=x, verbose=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        x, y = batch(step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


@pytest.mark.parametrize("recipe", ["ibm4", "ibm4-notpr", "all4", "luq4", "mxfp4", "nvfp4", "fp16", "hfp8"])
@pytest.mark.parametrize(
    "make, batch",
    [(SmallResNet, _resnet_batch), (LSTMNet, _lstm_batch), (MatmulNet, _lstm_batch)],
    ids=["resnet", "lstm", "matmul"],
)
def test_training_with_the_kernels_equals_training_on_the_definitions(recipe, make, batch):
    fast = _train(make, batch, recipe)
    with pure_torch():
        ref = _train(make, batch, recipe)
    assert fast.keys() == ref.keys()
    for key in fast:
        assert torch.equal(fast[key], ref[key]), key


def test_kernel_results_do_not_depend_on_the_thread_count():
    x = _inputs()[:200_000].reshape(-1, 400)  # above the size where the kernels go parallel
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            values, nibbles, clip, nans = kernels.int_quantize(x, 0.25, -7, 7, -1.5, 1.5, True, True, True)
            grad, top, bottom = kernels.pact_backward(d.clone(), clip, nibbles, True)
            quantized = [formats.get(n).quantize(x) for n in ("fp4_radix4", "fp4_e2m1", "mxfp4", "nvfp4")]
            results.append([values, nibbles, clip, nans, grad, top, bottom, kernels.abs_max(x), *quantized])
        finally:
            torch.set_num_threads(1)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("clipped", [False, True])
def test_int_operand_kernel_equals_the_definition(signed, clipped):
    grid = formats.IntFormat(4, signed=signed, symmetric=signed)
    alpha = torch.tensor(1.7)
    clip = (-alpha if signed else torch.tensor(0.0), alpha) if clipped else None
    edges = torch.tensor([0.0, -0.0, 1.7, -1.7, 1.6999999, -1.6999999, 1.7000001, 1e-30, -1e-30])
    x = torch.cat([_inputs() * 1e-18, edges, torch.randn(5000, generator=torch.Generator().manual_seed(3))])
    x = x[~x.isnan()]  # a NaN makes the operand keep float32 values, tested apart below
    scale = alpha / grid.qmax
    fast = quantize_int_operand(grid, x, scale, clip=clip)
    with pure_torch():
        ref = quantize_int_operand(grid, x, scale, clip=clip)
    _same_bits(fast[0], ref[0])
    assert torch.equal(fast[1].codes, ref[1].codes) and fast[1].codes_dtype == ref[1].codes_dtype
    _same_bits(fast[1].unpack(), ref[1].unpack())
    if clipped:
        assert torch.equal(fast[2], ref[2])
        d = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
        fast_d, fast_dalpha = _pact_backward(d.clone(), fast[2], fast[1], signed)
        with pure_torch():
            ref_d, ref_dalpha = _pact_backward(d.clone(), ref[2], ref[1], signed)
        _same_bits(fast_d, ref_d)
        torch.testing.assert_close(fast_dalpha, ref_dalpha, rtol=1e-6, atol=0)

    with_nan = torch.cat([x[:100], torch.tensor([float("nan")])])
    fast, ref = quantize_int_operand(grid, with_nan, scale, clip=clip), None
    with pure_torch():
        ref = quantize_int_operand(grid, with_nan, scale, clip=clip)
    assert fast[1].values is not None and ref[1].values is not None  # NaN must reach the loss
    _same_bits(fast[1].unpack(), ref[1].unpack())


@pytest.mark.parametrize("name", [n for n in formats.names() if not isinstance(formats.get(n), BlockFormat)])
def test_saved_operands_equal_the_definition(name):
    fmt = formats.get(name)
    x = _inputs()
    x = x[~x.isnan()]
    for scale in (1.0, torch.tensor(0.37)):
        fast_values, fast_packed = quantize_operand(fmt, x, scale)
        with pure_torch():
            ref_values, ref_packed = quantize_operand(fmt, x, scale)
        _same_bits(fast_values, ref_values)
        _same_bits(fast_packed.unpack(), ref_packed.unpack())
        _same_bits(fast_packed.unpack(), fast_values)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("axis", [0, 1])
def test_a_block_operand_not_kept_equals_the_kept_one(name, rounding, axis):
    # keep=False takes the values-only kernel (no codes): the same bits as the codes' decode
    # and as the definition, from the same draws
    fmt = formats.get(name)
    x = _inputs()[: 40 * 1000].reshape(40, 1000)
    x[3, 5] = float("nan")  # one block (per axis) of NaN
    outs = []
    for keep, torch_only in ((False, False), (True, False), (False, True)):
        gen = torch.Generator().manual_seed(7)
        with pure_torch() if torch_only else nullcontext():
            outs.append(quantize_operand(fmt, x, None, 0, rounding, gen, axis, keep=keep))
    assert outs[0][1] is None and outs[1][1] is not None
    _same_bits(outs[0][0], outs[1][0])
    _same_bits(outs[0][0], outs[2][0])
    assert int(outs[0][0].isnan().sum()) == fmt.block_shape[0]  # the NaN's block, and no other


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_format_gives_the_same_bits_on_a_gpu():
    x = _inputs()
    for name in formats.names():
        fmt = formats.get(name)
        for phase in fmt.phases:
            _same_bits(fmt.quantize(x.cuda(), phase=phase).cpu(), fmt.quantize(x, phase=phase))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", ["ibm4", "luq4", "nvfp4"])
@pytest.mark.parametrize("convert_first", [True, False])
def test_a_training_step_runs_on_a_gpu(recipe, convert_first):
    torch.manual_seed(0)
    model = SmallResNet()
    x, y = _resnet_batch(0)
    if convert_first:
        fourbit.convert(model, recipe, example_input=x, verbose=False)
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    if not convert_first:
        fourbit.convert(model, recipe, example_input=x, verbose=False)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    assert all(p.is_cuda for p in model.parameters())  # PACT's α too, whichever came first


@pytest.mark.parametrize("scale", [torch.tensor(0.0), torch.tensor(-0.5), torch.tensor(float("nan"))])
def test_int_operand_refuses_a_bad_scale_on_both_paths(scale):
    grid = formats.IntFormat(4, signed=False)
    with pytest.raises(ValueError, match="scale must be"):
        quantize_int_operand(grid, torch.randn(10), scale)
    with pure_torch(), pytest.raises(ValueError, match="scale must be"):
        quantize_int_operand(grid, torch.randn(10), scale)
