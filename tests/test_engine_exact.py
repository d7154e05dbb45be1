"""The three GEMMs of each Q-layer against GEMMs of operands quantized explicitly here."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fourbit import formats, recipes
from fourbit.nn import LayerSpec, OperandSpec, QConv1d, QConv2d, QLinear, QMatmul
from fourbit.nn.gemm import chunked_fp16, conv_ops, random_hadamard
from fourbit.nn.lstm import QLSTM
from fourbit.nn.quant import pack_bits, pack_nibbles, unpack_bits, unpack_nibbles
from fourbit.scaling import mse_scale, sawb_scale

INT4, UINT4, RADIX4 = formats.get("int4"), formats.get("uint4"), formats.get("fp4_radix4")
IBM4 = recipes.get("ibm4").default
NOTPR = recipes.get("ibm4-notpr").default
SYM_INT4 = formats.IntFormat(4, signed=True, symmetric=True)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _first_scale(dy, top=1.0):
    """GradScale's first scale: the largest power of two s with max|dY|·s <= top."""
    amax = dy.abs().max().item()
    s = 2.0 ** math.floor(math.log2(top / amax))
    return s / 2 if amax * s > top else s


def _expected_grads(dy, s, phases, qa, qw, dx_gemm, dw_gemm):
    """dX and dW from the gradient scaled by s, quantized on each GEMM's phase, unscaled."""
    g = dy * s
    g_dx = RADIX4.quantize(g, phase=phases[0])
    g_dw = RADIX4.quantize(g, phase=phases[1])
    return dx_gemm(g_dx, qw) / s, dw_gemm(qa, g_dw) / s


@pytest.mark.parametrize("spec, phases", [(IBM4, (1, 0)), (NOTPR, (0, 0))], ids=["tpr", "notpr"])
def test_qlinear_three_gemms(spec, phases):
    lin = nn.Linear(48, 24)
    q = QLinear.from_float(lin, spec)
    x = (torch.randn(16, 48, generator=_gen(1)) * 2).relu().requires_grad_()
    y = q(x)
    alpha = q.quant.pact_a.alpha.detach()
    assert alpha.item() == x.max().item()  # PACT's clip starts at the first batch's max
    qw = INT4.quantize(lin.weight.detach(), sawb_scale(lin.weight, INT4))
    qa = UINT4.quantize(x.detach().clamp(0, alpha), alpha / 15)
    assert torch.equal(y, F.linear(qa, qw) + lin.bias)

    dy = torch.randn(16, 24, generator=_gen(2)) * 0.05
    y.backward(dy)
    dx, dw = _expected_grads(dy, _first_scale(dy), phases, qa, qw, lambda g, w: g @ w, lambda a, g: g.t() @ a)
    clipped = x.detach() >= alpha
    assert torch.equal(x.grad, torch.where(clipped, 0.0, dx))
    assert torch.equal(lin.weight.grad, dw)
    assert torch.equal(lin.bias.grad, dy.sum(0))
    assert torch.equal(q.quant.pact_a.alpha.grad, dx[clipped].sum())


def test_unquantized_gradients_keep_the_forward_and_pass_dy_through_exactly():
    """QuantState.unquantize_gradients (the `own-forward` gradient reference): the same
    quantized forward; dX and dW the GEMMs of the float32 dY with the quantized operands,
    after the GradScale it kept from training (2**20: exact, so invisible)."""
    assert recipes.get("fp32").default.float32_gradients().is_fp32
    lin = nn.Linear(48, 24)
    q = QLinear.from_float(lin, IBM4)
    q.quant.gradscale.scale.fill_(2.0**20)
    q.quant.unquantize_gradients()
    assert q.quant.spec.weight == IBM4.weight and q.quant.spec.grad_dx.format is None
    x = (torch.randn(16, 48, generator=_gen(1)) * 2).relu().requires_grad_()
    y = q(x)
    alpha = q.quant.pact_a.alpha.detach()
    qw = INT4.quantize(lin.weight.detach(), sawb_scale(lin.weight, INT4))
    qa = UINT4.quantize(x.detach().clamp(0, alpha), alpha / 15)
    assert torch.equal(y, F.linear(qa, qw) + lin.bias)
    dy = torch.randn(16, 24, generator=_gen(2)) * 0.05
    y.backward(dy)
    clipped = x.detach() >= alpha
    assert torch.equal(x.grad, torch.where(clipped, 0.0, dy @ qw))
    assert torch.equal(lin.weight.grad, dy.t() @ qa)
    assert q.quant.gradscale.scale.item() == 2.0**20  # kept, not adapted


def test_tpr_off_feeds_both_gemms_from_one_quantization():
    # with TPR, dX and dW see different grids, so at least one gradient differs from no-TPR
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    x = torch.rand(64, 32)
    grads = {}
    for name, spec in (("tpr", IBM4), ("notpr", NOTPR)):
        q = QLinear.from_float(nn.Linear(32, 32), spec)
        q.load_state_dict(lin.state_dict(), strict=False)
        xx = x.clone().requires_grad_()
        q(xx).backward(torch.randn(64, 32, generator=_gen(3)) * 0.1)
        grads[name] = (xx.grad, q.weight.grad)
    assert not torch.equal(grads["tpr"][0], grads["notpr"][0])
    assert torch.equal(grads["tpr"][1], grads["notpr"][1])  # dW uses phase 0 in both


def test_gradscale_in_a_layer_follows_the_adaptive_rule_over_steps():
    lin = nn.Linear(16, 8)
    q = QLinear.from_float(lin, IBM4)
    x = torch.rand(4, 16)
    # (max |dY|, the scale that step must use): the first gradient sets s = 8 (0.8 in
    # (1/2, 1]); 0.03·8 <= 1/2 doubles; 0.03·16 doubles; 0.03·32 keeps; 0.05·32 > 1 halves
    steps = [(0.1, 8.0), (0.03, 8.0), (0.03, 16.0), (0.03, 32.0), (0.05, 32.0), (0.05, 16.0)]
    for amplitude, s in steps:
        q.weight.grad = None
        y = q(x.clone().requires_grad_())
        alpha = q.quant.pact_a.alpha.detach()
        qw = INT4.quantize(lin.weight.detach(), sawb_scale(lin.weight, INT4))
        qa = UINT4.quantize(x.clamp(0, alpha), alpha / 15)
        dy = torch.full((4, 8), amplitude)
        y.backward(dy)
        _, dw = _expected_grads(dy, s, (1, 0), qa, qw, lambda g, w: g @ w, lambda a, g: g.t() @ a)
        assert torch.equal(q.weight.grad, dw)
    assert q.quant.gradscale.scale.item() == 16.0
    restored = QLinear.from_float(nn.Linear(16, 8), IBM4)
    restored.load_state_dict(q.state_dict())
    assert restored.quant.gradscale.scale.item() == 16.0


@pytest.mark.parametrize("groups, stride, padding, dilation", [(1, 1, 1, 1), (2, 2, 0, 1), (6, 1, 2, 2)])
def test_qconv2d_three_gemms(groups, stride, padding, dilation):
    conv = nn.Conv2d(6, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups)
    q = QConv2d.from_float(conv, IBM4)
    x = torch.randn(3, 6, 9, 9, generator=_gen(4)).requires_grad_()  # signed: PACT goes symmetric
    y = q(x)
    assert q.quant.pact_a.signed.item() == 1
    alpha = q.quant.pact_a.alpha.detach()
    args = (stride, padding, dilation, groups)
    qw = INT4.quantize(conv.weight.detach(), sawb_scale(conv.weight, INT4))
    qa = SYM_INT4.quantize(x.detach().clamp(-alpha, alpha), alpha / 7)
    # the bias is added after the GEMM, in float32
    assert torch.equal(y, F.conv2d(qa, qw, None, *args) + conv.bias.reshape(1, -1, 1, 1))

    dy = torch.randn(y.shape, generator=_gen(5)) * 0.01
    y.backward(dy)
    dx, dw = _expected_grads(
        dy, _first_scale(dy), (1, 0), qa, qw,
        lambda g, w: torch.nn.grad.conv2d_input(x.shape, w, g, *args),
        lambda a, g: torch.nn.grad.conv2d_weight(a, conv.weight.shape, g, *args),
    )  # fmt: skip
    assert torch.equal(x.grad, torch.where(x.detach().abs() >= alpha, 0.0, dx))  # PACT's STE
    assert torch.equal(conv.weight.grad, dw)


def test_qconv1d_forward_matches_explicit_quantization():
    conv = nn.Conv1d(4, 5, 3, padding="same")
    q = QConv1d.from_float(conv, IBM4)
    x = torch.rand(2, 4, 10)
    y = q(x)
    alpha = q.quant.pact_a.alpha.detach()
    qw = INT4.quantize(conv.weight.detach(), sawb_scale(conv.weight, INT4))
    qa = UINT4.quantize(x.clamp(0, alpha), alpha / 15)
    assert torch.equal(y, F.conv1d(qa, qw, None, padding=1) + conv.bias.reshape(1, -1, 1))


def test_qmatmul_quantizes_both_activations():
    m = QMatmul(IBM4)
    a = torch.randn(2, 5, 8, generator=_gen(6)).requires_grad_()
    b = torch.rand(2, 8, 3, generator=_gen(7)).requires_grad_()
    y = m(a, b)
    alpha_a, alpha_b = m.quant.pact_a.alpha.detach(), m.quant.pact_b.alpha.detach()
    qa = SYM_INT4.quantize(a.detach().clamp(-alpha_a, alpha_a), alpha_a / 7)
    qb = UINT4.quantize(b.detach().clamp(0, alpha_b), alpha_b / 15)
    assert torch.equal(y, qa @ qb)
    dy = torch.randn(2, 5, 3, generator=_gen(8)) * 0.1
    y.backward(dy)
    da, db = _expected_grads(
        dy, _first_scale(dy), (1, 0), qa, qb, lambda g, b_: g @ b_.mT, lambda a_, g: a_.mT @ g
    )
    assert torch.equal(a.grad, torch.where(a.detach().abs() >= alpha_a, 0.0, da))
    assert torch.equal(b.grad, torch.where(b.detach() >= alpha_b, 0.0, db))


def test_fp16_accumulation_is_chunked():
    spec = dataclasses.replace(IBM4, accumulate="fp16")
    lin = nn.Linear(200, 8, bias=False)
    q = QLinear.from_float(lin, spec)
    x = torch.rand(4, 200) * 50
    y = q(x)
    alpha = q.quant.pact_a.alpha.detach()
    qw = INT4.quantize(lin.weight.detach(), sawb_scale(lin.weight, INT4))
    qa = UINT4.quantize(x.clamp(0, alpha), alpha / 15)
    total = torch.zeros(4, 8, dtype=torch.float16)
    for start in range(0, 200, 64):
        total = total + (qa[:, start : start + 64] @ qw[:, start : start + 64].t()).half()
    assert torch.equal(y, total.float())
    assert not torch.equal(y, F.linear(qa, qw))  # fp16 partial sums do lose bits here


def test_chunked_fp16_of_exactly_representable_sums_is_exact():
    a, b = torch.ones(3, 130), torch.ones(130, 2)
    assert torch.equal(chunked_fp16(lambda u, v: u @ v, a, b, 1, 0, 1), a @ b)
    assert torch.equal(chunked_fp16(lambda u, v: u @ v, a[:, :0], b[:0], 1, 0, 1), torch.zeros(3, 2))


@pytest.mark.parametrize("groups", [2, 4])
def test_fp16_accumulation_of_a_grouped_conv_sums_each_group_in_its_own_chunks(groups):
    # integer operands (4-bit-sized): every fp32 partial sum is exact, so the only rounding
    # is fp16's, and the grouped GEMMs must equal each group's ungrouped GEMMs bit for bit
    g = _gen(21)
    c_per, o_per = 40, 3
    a = torch.randint(0, 16, (2, groups * c_per, 5, 5), generator=g).float()
    w = torch.randint(-8, 8, (groups * o_per, c_per, 3, 3), generator=g).float()
    dy = torch.randint(-8, 8, (2, groups * o_per, 5, 5), generator=g).float()
    grouped, single = (
        conv_ops(2, (1, 1), (1, 1), (1, 1), groups, 9),
        conv_ops(2, (1, 1), (1, 1), (1, 1), 1, 9),
    )
    y = chunked_fp16(grouped.forward, a, w, 1, 1, 9, (groups, 1))
    da = chunked_fp16(lambda u, v: grouped.grad_a(u, v, a.shape), dy, w, 1, 0, 9, (groups, groups))
    dw = chunked_fp16(lambda u, v: grouped.grad_b(u, v, w.shape), a, dy, 0, 0, 25)
    a_g, w_g, dy_g = a.chunk(groups, 1), w.chunk(groups, 0), dy.chunk(groups, 1)
    by_group = [
        (
            chunked_fp16(single.forward, a_i, w_i, 1, 1, 9),
            chunked_fp16(lambda u, v, s=a_i.shape: single.grad_a(u, v, s), dy_i, w_i, 1, 0, 9),
            chunked_fp16(lambda u, v, s=w_i.shape: single.grad_b(u, v, s), a_i, dy_i, 0, 0, 25),
        )
        for a_i, w_i, dy_i in zip(a_g, w_g, dy_g, strict=True)
    ]
    assert torch.equal(y, torch.cat([r[0] for r in by_group], 1))
    assert torch.equal(da, torch.cat([r[1] for r in by_group], 1))
    assert torch.equal(dw, torch.cat([r[2] for r in by_group], 0))
    assert not torch.equal(y, F.conv2d(a, w, padding=1, groups=groups))  # fp16 did round


def test_random_hadamard_is_orthonormal_and_preserves_the_dw_gemm():
    signs = torch.tensor([1.0, -1.0] * 8)
    a, g = torch.randn(37, 6, generator=_gen(9)), torch.randn(37, 5, generator=_gen(10))
    ta, tg = random_hadamard(a, 0, signs), random_hadamard(g, 0, signs)
    assert ta.shape == (48, 6)  # padded to whole blocks of 16
    torch.testing.assert_close(ta.t() @ tg, a.t() @ g, rtol=1e-5, atol=1e-5)
    eye = random_hadamard(torch.eye(16), 0, signs)
    torch.testing.assert_close(eye.t() @ eye, torch.eye(16))
    # the matrix itself: Sylvester's H[i, j] = (-1)^popcount(i & j), columns signed, / 4
    sylvester = [
        [(-1.0) ** bin(i & j).count("1") * signs[j].item() / 4 for j in range(16)] for i in range(16)
    ]
    assert torch.equal(eye, torch.tensor(sylvester))
    # blocks run along any axis of any rank, also with zero-size dimensions
    x = torch.randn(3, 20, 2, generator=_gen(11))
    torch.testing.assert_close(
        random_hadamard(x, 1, signs), random_hadamard(x.transpose(1, 2), 2, signs).transpose(1, 2)
    )
    assert random_hadamard(torch.zeros(0, 7), 1, signs).shape == (0, 16)
    assert random_hadamard(torch.zeros(0, 7), 0, signs).shape == (0, 7)


def test_nibble_and_bit_packing_round_trip():
    signed = torch.arange(-8, 8, dtype=torch.int8).repeat(3)[:-1]  # odd length
    unsigned = torch.arange(0, 16, dtype=torch.uint8).flip(0)
    for codes in (signed, unsigned):
        packed = pack_nibbles(codes)
        assert packed.numel() == (codes.numel() + 1) // 2
        assert torch.equal(unpack_nibbles(packed, codes.shape, codes.dtype), codes)
    mask = torch.rand(3, 7, generator=_gen(11)) > 0.5
    assert pack_bits(mask).numel() == 3
    assert torch.equal(unpack_bits(pack_bits(mask), mask.shape), mask)


def test_nan_activation_reaches_the_output():
    q = QLinear.from_float(nn.Linear(4, 3), IBM4)
    q(torch.rand(2, 4))  # fix PACT's clip on a clean batch
    x = torch.rand(2, 4)
    x[0, 1] = float("nan")
    y = q(x.requires_grad_())
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


ROW_SAWB = OperandSpec("int4", "sawb", granularity="row")


def _rows_quantized(x, dim):
    """x on the INT4 grid with one SAWB scale per slice along `dim`, each fitted on its own."""
    slices = x.detach().movedim(dim, -1)
    flat = slices.reshape(-1, slices.shape[-1])
    q = torch.stack([INT4.quantize(r, sawb_scale(r, INT4)) for r in flat])
    return q.reshape(slices.shape).movedim(-1, dim)


def test_qlinear_row_scales_requantize_along_each_gemms_reduction_axis():
    lin = nn.Linear(48, 24)
    q = QLinear.from_float(lin, LayerSpec(ROW_SAWB, ROW_SAWB))
    x = torch.randn(16, 48, generator=_gen(11)) * torch.logspace(-2, 1, 16).unsqueeze(1)
    x.requires_grad_()
    y = q(x)
    w = lin.weight.detach()
    # forward: a scale per token and per output channel, both along the reduction axis (in)
    assert torch.equal(y, F.linear(_rows_quantized(x, -1), _rows_quantized(w, -1)) + lin.bias)
    dy = torch.randn(16, 24, generator=_gen(12))
    y.backward(dy)
    # dX reduces over the output channels: W again, a scale per input channel; dW reduces over
    # the tokens: X again, a scale per input feature
    assert torch.equal(x.grad, dy @ _rows_quantized(w, 0))
    assert torch.equal(lin.weight.grad, dy.t() @ _rows_quantized(x, 0))


def test_qmatmul_row_scales_follow_each_gemms_reduction_axis():
    m = QMatmul(LayerSpec(activation=ROW_SAWB))
    a = torch.randn(2, 5, 8, generator=_gen(13)).requires_grad_()
    b = torch.randn(2, 8, 3, generator=_gen(14)).requires_grad_()
    y = m(a, b)
    assert torch.equal(y, _rows_quantized(a, -1) @ _rows_quantized(b, -2))
    dy = torch.randn(2, 5, 3, generator=_gen(15))
    y.backward(dy)
    assert torch.equal(a.grad, dy @ _rows_quantized(b, -1).mT)
    assert torch.equal(b.grad, _rows_quantized(a, -2).mT @ dy)


def test_row_scales_are_refused_where_they_cannot_factor_out():
    with pytest.raises(ValueError, match="convolution"):
        QConv2d(3, 4, 3, spec=LayerSpec(activation=ROW_SAWB))
    with pytest.raises(ValueError, match="convolution"):
        QConv1d.from_float(nn.Conv1d(3, 4, 3), LayerSpec(weight=ROW_SAWB))
    with pytest.raises(ValueError, match="granularity 'row'.*'sawb' or 'max'"):
        OperandSpec("int4", "pact", granularity="row")
    with pytest.raises(ValueError, match="granularity must be one of"):
        OperandSpec("int4", "sawb", granularity="column")


def test_nan_in_one_row_of_a_row_scaled_activation_reaches_the_output():
    q = QLinear.from_float(nn.Linear(4, 3), LayerSpec(ROW_SAWB, ROW_SAWB))
    x = torch.rand(2, 4)
    x[0, 1] = float("nan")
    y = q(x.requires_grad_())
    assert torch.isnan(y[0]).all()


UNSIGNED_SAWB = OperandSpec("uint4", "sawb")


def test_unsigned_sawb_takes_the_unsigned_grid_after_a_relu_and_the_signed_one_otherwise():
    # a ReLU output: SAWB's clip over all 16 codes 0 ... 15 (the signed grid has 8 for it)
    lin = nn.Linear(48, 24)
    q = QLinear.from_float(lin, LayerSpec(OperandSpec("int4", "sawb"), UNSIGNED_SAWB))
    x = torch.randn(64, 48, generator=_gen(21)).relu().requires_grad_()
    y = q(x)
    w = lin.weight.detach()
    qw = INT4.quantize(w, sawb_scale(w, INT4))
    qa = UINT4.quantize(x.detach(), sawb_scale(x, UINT4))
    assert sawb_scale(x, UINT4) * 15 == sawb_scale(x, INT4) * 7  # the same clip, twice the codes
    assert torch.equal(y, F.linear(qa, qw) + lin.bias)
    assert len(qa.unique()) > 8 and q.quant.sign_a.signed.item() == 0
    dy = torch.randn(64, 24, generator=_gen(22))
    y.backward(dy)
    assert torch.equal(x.grad, dy @ qw)  # straight through: no clip, no PACT mask
    assert torch.equal(lin.weight.grad, dy.t() @ qa)
    # the grid is kept: a later negative value saturates at 0, as outside any grid
    x2 = torch.randn(8, 48, generator=_gen(23))
    assert torch.equal(q(x2), F.linear(UINT4.quantize(x2, sawb_scale(x2, UINT4)), qw) + lin.bias)
    # a signed first input: exactly the signed SAWB activation (int4, scale alpha / 7)
    signed = QLinear.from_float(lin, LayerSpec(OperandSpec("int4", "sawb"), UNSIGNED_SAWB))
    plain = QLinear.from_float(lin, LayerSpec(OperandSpec("int4", "sawb"), OperandSpec("int4", "sawb")))
    assert torch.equal(signed(x2), plain(x2)) and signed.quant.sign_a.signed.item() == 1
    assert torch.equal(signed(x.detach()), plain(x.detach()))
    # the sign travels with the state_dict
    fresh = QLinear.from_float(nn.Linear(48, 24), LayerSpec(OperandSpec("int4", "sawb"), UNSIGNED_SAWB))
    fresh.load_state_dict(q.state_dict())
    assert fresh.quant.sign_a.signed.item() == 0 and torch.equal(fresh(x.detach()), q(x.detach()))


def test_unsigned_sawb_fixes_each_matmul_operand_and_the_lstm_state_on_its_own():
    m = QMatmul(LayerSpec(activation=UNSIGNED_SAWB))
    p = torch.rand(2, 5, 8, generator=_gen(24)).softmax(-1)  # probabilities: nonnegative
    v = torch.randn(2, 8, 3, generator=_gen(25))
    y = m(p, v)
    qp = UINT4.quantize(p, sawb_scale(p, UINT4))
    qv = INT4.quantize(v, sawb_scale(v, INT4))
    assert torch.equal(y, qp @ qv)
    assert (m.quant.sign_a.signed.item(), m.quant.sign_b.signed.item()) == (0, 1)
    # an LSTM's hidden state lies in (-1, 1): signed from the start, not fixed by h0 = 0
    lstm = QLSTM.from_float(nn.LSTM(4, 6), LayerSpec(OperandSpec("int4", "sawb"), UNSIGNED_SAWB))
    assert lstm.quant["l0_hh"].sign_a.signed.item() == 1 and lstm.quant["l0_ih"].sign_a.signed.item() == -1
    lstm(torch.rand(3, 2, 4))
    assert lstm.quant["l0_ih"].sign_a.signed.item() == 0


def test_mse_activation_is_each_tensors_own_clip_on_the_grid_its_sign_picks():
    """The `mse` scaler in a layer: exactly the GEMM of the operands quantized with
    scaling.mse_scale, the unsigned grid after a ReLU and the signed one otherwise, as SAWB's."""
    lin = nn.Linear(48, 24)
    act = OperandSpec("uint4", "mse")
    w = lin.weight.detach()
    qw = INT4.quantize(w, sawb_scale(w, INT4))
    for x, grid, signed in (
        (torch.randn(64, 48, generator=_gen(27)).relu(), UINT4, 0),
        (torch.randn(64, 48, generator=_gen(28)), INT4, 1),
    ):
        q = QLinear.from_float(lin, LayerSpec(OperandSpec("int4", "sawb"), act))
        x = x.requires_grad_()
        qa = grid.quantize(x.detach(), mse_scale(x, grid))
        assert not torch.equal(mse_scale(x, grid), sawb_scale(x, grid))
        y = q(x)
        assert torch.equal(y, F.linear(qa, qw) + lin.bias) and q.quant.sign_a.signed.item() == signed
        dy = torch.randn(64, 24, generator=_gen(29))
        y.backward(dy)
        assert torch.equal(lin.weight.grad, dy.t() @ qa)
        lin.weight.grad = None
    m = QMatmul(LayerSpec(activation=act))
    p = torch.rand(2, 5, 8, generator=_gen(24)).softmax(-1)
    v = torch.randn(2, 8, 3, generator=_gen(25))
    assert torch.equal(m(p, v), UINT4.quantize(p, mse_scale(p, UINT4)) @ INT4.quantize(v, mse_scale(v, INT4)))
    with pytest.raises(ValueError, match="integer format"):
        OperandSpec("nvfp4", "mse")
    with pytest.raises(ValueError, match="granularity 'row'"):
        OperandSpec("int4", "mse", granularity="row")


def test_a_hadamard_turn_refuses_a_grid_whose_sign_the_input_fixes():
    for act in (UNSIGNED_SAWB, OperandSpec("uint4", "mse"), OperandSpec("uint4", "pact")):
        with pytest.raises(ValueError, match="hadamard_dw turns the raw activation.*signed or block"):
            LayerSpec(activation=act, hadamard_dw=True)


def test_unsigned_sawb_halves_the_step_after_a_relu():
    """On a rectified Gaussian the unsigned grid's error power is about a quarter of the signed
    grid's (half the step); this test fails if the recipe keeps the signed grid."""
    x = torch.randn(4096, 64, generator=_gen(26)).relu()
    errors = []
    for act in (OperandSpec("int4", "sawb"), UNSIGNED_SAWB):
        q = QLinear.from_float(nn.Linear(64, 64, bias=False), LayerSpec(activation=act))
        q.weight.data = torch.eye(64)
        errors.append((q(x) - x).square().mean().item())
    assert errors[1] < errors[0] / 3.5


# -- recipes ------------------------------------------------------------------------------------


FP16 = OperandSpec("fp16")


def test_recipe_presets_are_the_spec_table():
    assert recipes.names() == [
        "fp32", "fp16", "hfp8", "ibm4", "ibm4-notpr", "ibm4-radix2", "ibm4-nogradscale",
        "ibm4-radix8", "ibm4-fp16acc", "ibm4-pw-hfp8", "ibm4-lstm-sawb", "ibm4-sawb", "ibm4-gradsr",
        "ibm4-luqgrad", "ibm4-fp16grad", "ibm4-matmul-fp16grad", "ibm4-fp16dx", "ibm4-fp16dw", "ibm4-nvfp4dx",
        "ibm4-nvfp4grad", "ibm4-sawb-nvfp4grad", "ibm4-sawb-nvfp4grad-nvprobs",
        "ibm4-rowsawb-nvfp4grad-nvprobs", "ibm4-usawb-nvfp4grad-nvprobs", "ibm4-usawb-nvfp4rtngrad-nvprobs",
        "ibm4-umse-nvfp4rtngrad-nvprobs", "ibm4-usawb-nvprobs-fp16grad", "ibm4-fp16fwd",
        "all4", "luq4", "mxfp4", "nvfp4",
    ]  # fmt: skip
    ibm4 = recipes.get("ibm4")
    assert ibm4.default.tpr and ibm4.default.gradscale == "adaptive"
    assert ibm4.spec_for("first").weight.format == "fp16" and ibm4.spec_for("last").grad_dx.format == "fp16"
    assert ibm4.spec_for("depthwise") == ibm4.default
    assert not recipes.get("ibm4-notpr").default.tpr
    assert recipes.get("ibm4-radix2").default.grad_dx.format == "fp4_radix2"
    assert recipes.get("ibm4-nogradscale").default.gradscale == "none"
    assert recipes.get("ibm4-radix8").default.grad_dw.format == "fp4_radix8"
    fp16acc = recipes.get("ibm4-fp16acc")
    assert fp16acc.default == dataclasses.replace(ibm4.default, accumulate="fp16")
    assert fp16acc.spec_for("depthwise") == fp16acc.default
    pw = recipes.get("ibm4-pw-hfp8")
    assert pw.default == ibm4.default and pw.spec_for("pointwise_conv") == recipes.get("hfp8").default
    assert pw.spec_for("depthwise") == ibm4.default
    lstm_sawb = recipes.get("ibm4-lstm-sawb")
    assert lstm_sawb.default == ibm4.default and lstm_sawb.spec_for("lstm").activation.scaler == "sawb"
    sawb = recipes.get("ibm4-sawb")
    assert sawb.default == dataclasses.replace(ibm4.default, activation=OperandSpec("int4", "sawb"))
    assert sawb.spec_for("first") == ibm4.spec_for("first") and sawb.spec_for("matmul") == sawb.default
    gradsr = recipes.get("ibm4-gradsr").default
    assert gradsr.grad_dx.rounding == gradsr.grad_dw.rounding == "stochastic" and gradsr.tpr
    assert (
        dataclasses.replace(gradsr, grad_dx=ibm4.default.grad_dx, grad_dw=ibm4.default.grad_dw)
        == ibm4.default
    )
    luqgrad = recipes.get("ibm4-luqgrad").default
    luq4 = recipes.get("luq4").default
    assert (
        luqgrad.grad_dx == luqgrad.grad_dw == luq4.grad_dx and luqgrad.tpr and luqgrad.gradscale == "adaptive"
    )
    assert (
        dataclasses.replace(luqgrad, grad_dx=ibm4.default.grad_dx, grad_dw=ibm4.default.grad_dw)
        == ibm4.default
    )
    # one backward GEMM's gradient in fp16, the other as ibm4's dW gradient (phase 0), with
    # GradScale aiming at the radix-4 grid either way
    dx, dw = recipes.get("ibm4-fp16dx").default, recipes.get("ibm4-fp16dw").default
    assert (dx.grad_dx, dx.grad_dw, dx.phases(), dx.gradscale_top) == (
        FP16,
        ibm4.default.grad_dw,
        (0, 0),
        1.0,
    )
    assert (dw.grad_dx, dw.grad_dw, dw.phases(), dw.gradscale_top) == (
        ibm4.default.grad_dx,
        FP16,
        (0, 0),
        1.0,
    )
    for diag in (dx, dw):
        assert (
            dataclasses.replace(
                diag, **{k: getattr(ibm4.default, k) for k in ("grad_dx", "grad_dw", "tpr", "gradscale_max")}
            )
            == ibm4.default
        )
    # NVFP4 gradients (nvfp4's own, stochastic) into the dX GEMMs only, or into both
    nv = recipes.get("nvfp4").default.grad_dx
    nvdx, nvgrad = recipes.get("ibm4-nvfp4dx").default, recipes.get("ibm4-nvfp4grad").default
    assert (nvdx.grad_dx, nvdx.grad_dw, nvdx.phases(), nvdx.gradscale, nvdx.gradscale_top) == (
        nv,
        ibm4.default.grad_dw,
        (0, 0),
        "adaptive",
        1.0,
    )
    assert (nvgrad.grad_dx, nvgrad.grad_dw, nvgrad.tpr, nvgrad.gradscale) == (nv, nv, False, "none")
    assert (nvgrad.weight, nvgrad.activation) == (ibm4.default.weight, ibm4.default.activation)
    sawb_nvgrad = recipes.get("ibm4-sawb-nvfp4grad")
    assert sawb_nvgrad.default == dataclasses.replace(nvgrad, activation=sawb.default.activation)
    assert sawb_nvgrad.spec_for("last") == ibm4.spec_for("last")
    assert sawb_nvgrad.spec_for("attention_probs") == sawb_nvgrad.default  # via matmul's spec
    nvprobs = recipes.get("ibm4-sawb-nvfp4grad-nvprobs")
    assert nvprobs.default == nvprobs.spec_for("matmul") == sawb_nvgrad.default
    assert nvprobs.spec_for("attention_probs") == dataclasses.replace(nvgrad, activation=OperandSpec("nvfp4"))
    rowsawb = recipes.get("ibm4-rowsawb-nvfp4grad-nvprobs")
    assert rowsawb.default == dataclasses.replace(nvprobs.default, activation=ROW_SAWB)
    assert rowsawb.spec_for("attention_probs") == nvprobs.spec_for("attention_probs")
    assert (
        rowsawb.spec_for("first") == nvprobs.spec_for("first")
        and rowsawb.default.weight == ibm4.default.weight
    )
    usawb = recipes.get("ibm4-usawb-nvfp4grad-nvprobs")
    assert usawb.default == dataclasses.replace(nvprobs.default, activation=UNSIGNED_SAWB)
    assert usawb.default.activation.for_signed_input == nvprobs.default.activation
    assert usawb.spec_for("attention_probs") == nvprobs.spec_for("attention_probs")
    assert usawb.spec_for("first") == nvprobs.spec_for("first")
    fwd, grad = recipes.get("ibm4-fp16fwd").default, recipes.get("ibm4-fp16grad").default
    assert (fwd.weight, fwd.activation, fwd.grad_dx, fwd.tpr) == (FP16, FP16, ibm4.default.grad_dx, True)
    assert (grad.weight, grad.activation, grad.grad_dw) == (
        ibm4.default.weight,
        ibm4.default.activation,
        FP16,
    )
    # the diagnostic: usawb's forward everywhere, ibm4-fp16grad's gradients everywhere
    usawb16 = recipes.get("ibm4-usawb-nvprobs-fp16grad")
    for role in ("default", "attention_probs", "matmul"):
        spec, forward = usawb16.spec_for(role), usawb.spec_for(role)
        assert (spec.weight, spec.activation) == (forward.weight, forward.activation), role
        assert (spec.grad_dx, spec.grad_dw, spec.tpr, spec.gradscale) == (
            grad.grad_dx, grad.grad_dw, grad.tpr, grad.gradscale,
        ), role  # fmt: skip
    assert usawb16.spec_for("first") == usawb.spec_for("first")
    # usawb with its NVFP4 gradients rounded to nearest, everything else as usawb
    rtn = recipes.get("ibm4-usawb-nvfp4rtngrad-nvprobs")
    assert rtn.spec_for("first") == usawb.spec_for("first") and rtn.spec_for("last") == usawb.spec_for("last")
    for role in ("default", "attention_probs", "matmul"):
        spec, stochastic = rtn.spec_for(role), usawb.spec_for(role)
        assert spec.grad_dx == spec.grad_dw == OperandSpec("nvfp4") and spec.grad_dx.rounding is None, role
        assert stochastic.grad_dx.rounding == "stochastic", role
        assert dataclasses.replace(spec, grad_dx=stochastic.grad_dx, grad_dw=stochastic.grad_dw) == stochastic
    # rtn with its activations' clips fitted by the MSE estimate, everything else as rtn
    umse = recipes.get("ibm4-umse-nvfp4rtngrad-nvprobs")
    assert umse.spec_for("first") == rtn.spec_for("first") and umse.spec_for("last") == rtn.spec_for("last")
    assert umse.spec_for("attention_probs") == rtn.spec_for("attention_probs")
    for role in ("default", "matmul"):
        spec = umse.spec_for(role)
        assert spec.activation == OperandSpec("uint4", "mse") and spec.weight == rtn.spec_for(role).weight
        assert dataclasses.replace(spec, activation=UNSIGNED_SAWB) == rtn.spec_for(role), role
    assert umse.default.activation.for_signed_input == OperandSpec("int4", "mse")
    matmul = recipes.get("ibm4-matmul-fp16grad")
    assert matmul.default == ibm4.default and matmul.spec_for("first") == ibm4.spec_for("first")
    assert matmul.spec_for("matmul") == matmul.spec_for("attention_probs") == grad
    assert recipes.get("all4").spec_for("first").activation.format == "uint4"
    luq = recipes.get("luq4").default.grad_dx
    assert (luq.format, luq.rounding, luq.underflow) == ("fp4_radix2", "stochastic", "stochastic")
    nv = recipes.get("nvfp4")
    assert nv.default.hadamard_dw and nv.default.grad_dw.rounding == "stochastic"
    assert nv.default.weight.format == "nvfp4_2d" and nv.spec_for("first").weight.format == "bf16"


@pytest.mark.parametrize("name", recipes.names())
def test_recipe_toml_round_trip(name, tmp_path):
    recipe = recipes.get(name)
    path = tmp_path / f"{name}.toml"
    recipe.to_toml(path)
    assert recipes.Recipe.from_toml(path) == recipe


def test_recipe_validation_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="known recipes: fp32, fp16"):
        recipes.get("int3")
    with pytest.raises(ValueError, match="tpr"):
        LayerSpec(grad_dx=OperandSpec("int4"), grad_dw=OperandSpec("int4"), tpr=True)
    with pytest.raises(ValueError, match="integer format"):
        OperandSpec("fp16", "sawb")
    with pytest.raises(ValueError, match="unknown format"):
        OperandSpec("fp5")
    with pytest.raises(ValueError, match="rounding"):
        OperandSpec("int4", rounding="log")
    with pytest.raises(ValueError, match="gradscale"):
        LayerSpec(gradscale="sometimes")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[default]\nwieght = 1\n')
    with pytest.raises(ValueError, match="unknown keys"):
        recipes.Recipe.from_toml(bad)
    bad.write_text("name = ")
    with pytest.raises(ValueError, match="cannot read recipe"):
        recipes.Recipe.from_toml(bad)


def test_qlstm_cell_forward_and_backward_are_the_plain_formulas_and_their_derivative():
    from fourbit.nn.lstm import cell_backward, cell_forward

    def plain(gates, c):
        i, f, g, o = gates.chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new

    gen = torch.Generator().manual_seed(0)
    gates, c = torch.randn(5, 16, generator=gen), torch.randn(5, 4, generator=gen)
    h, c_new, _ = cell_forward(gates, c)
    assert all(torch.equal(a, b) for a, b in zip((h, c_new), plain(gates, c), strict=True))
    # the hand-written backward against autograd of the formulas, in float64; dh and dc'
    # alone, then both (an LSTM's last step gets only one of them when h_n or c_n is unused)
    g64, c64 = (t.double().requires_grad_() for t in (gates, c))
    dh, dc = torch.randn(5, 4, generator=gen).double(), torch.randn(5, 4, generator=gen).double()
    for wh, wc in ((1, 0), (0, 1), (1, 1)):
        h64, cn64 = plain(g64, c64)
        theirs = torch.autograd.grad((h64 * dh * wh).sum() + (cn64 * dc * wc).sum(), (g64, c64))
        ours = cell_backward(cell_forward(g64.detach(), c64.detach())[2], dh * wh, dc * wc)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_observer_sees_every_operand_before_and_after_quantization():
    q = QLinear(12, 5, spec=IBM4)
    x = torch.randn(6, 12, generator=_gen(1))
    dy = torch.randn(6, 5, generator=_gen(2))
    seen = {}
    q.quant.observer = lambda point, a, a_q, s: seen.setdefault(point, (a.clone(), a_q.clone(), s))
    q(x.requires_grad_()).backward(dy)
    assert list(seen) == ["A", "W", "G_dx", "G_dw"]
    w, w_q, s_w = seen["W"]
    assert torch.equal(w, q.weight.detach()) and s_w is None
    assert torch.equal(w_q, INT4.quantize(w, sawb_scale(w, INT4)))
    s = _first_scale(dy, RADIX4.max_value(0))
    for point, phase in (("G_dx", 1), ("G_dw", 0)):
        g, g_q, s_g = seen[point]
        assert s_g == s and torch.equal(g, dy * s)
        assert torch.equal(g_q, RADIX4.quantize(g, phase=phase))


@pytest.mark.parametrize("torch_module, upper", [(nn.ReLU(), None), (nn.ReLU6(), 6.0)])
@pytest.mark.parametrize("fast", [True, False])
def test_masked_relu_equals_torch_bit_for_bit_and_saves_one_bit(torch_module, upper, fast, monkeypatch):
    from fourbit.formats import kernels
    from fourbit.nn.activation import MaskedReLU

    if not fast:
        monkeypatch.setattr(kernels, "available", lambda: False)
    special = torch.tensor([-1.0, -0.0, 0.0, 1e-45, 0.5, 6.0, 7.0, float("inf"), -float("inf"), float("nan")])
    x = torch.cat([special, torch.randn(99_990, generator=_gen(5)) * 4]).reshape(20, -1)
    g = torch.randn(x.shape, generator=_gen(6))
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = MaskedReLU(upper)(ours)
    y.backward(g)
    torch_module(theirs).backward(g)
    assert torch.equal(y.view(torch.int32), torch_module(x).view(torch.int32))  # NaN and -0 too
    # (torch's ReLU6 backward is inconsistent at NaN: 0 or the gradient, by position)
    same = ~x.isnan() if upper is not None else torch.ones_like(x, dtype=torch.bool)
    assert torch.equal(ours.grad[same], theirs.grad[same])
    assert sum(t.numel() * t.element_size() for t in saved) == math.ceil(x.numel() / 8)


def test_convert_swaps_relus_only_under_a_quantized_recipe():
    from fourbit import convert
    from fourbit.nn.activation import MaskedReLU

    def model():
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU6(), nn.Linear(8, 2))

    q = convert(model(), "ibm4", verbose=False)
    assert [type(m) for m in q[1::2]] == [MaskedReLU, MaskedReLU] and q[3].upper == 6.0
    assert [type(m) for m in convert(model(), "fp32", verbose=False)[1::2]] == [nn.ReLU, nn.ReLU6]
