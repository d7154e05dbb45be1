"""The training engine end to end: convert a model, train it, save it, copy it.

fp32 conversion is bit-identical to the plain model; under ibm4 every GEMM operand of a
4-bit layer is one of at most 16 values (15 for gradients) and the first/last layers see
fp16 values only; backward keeps packed 4-bit operands, not float32 copies; every preset
trains a small CNN on Fashion-MNIST; runs are reproducible from their seeds; converted
models survive no_grad/eval, state_dict round trips, deepcopy and half-precision inputs;
unknown recipes, unconvertible modules and policies behave as documented; QLSTM keeps the
nn.LSTM interface.
"""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fourbit
from fourbit import formats, recipes
from fourbit.nn import QConv2d, QLinear, QuantState
from fourbit.nn import gemm as gemm_module
from fourbit.nn import lstm as lstm_module
from fourbit.nn.lstm import QLSTM, cell_backward, cell_forward
from fourbit.nn.spec import FP32_LAYER, LayerSpec
from fourbit.scaling import sawb_scale

IBM4 = recipes.get("ibm4")
INT4 = formats.get("int4")


def _convert(model, recipe, **kwargs):
    return fourbit.convert(model, recipe, verbose=False, **kwargs)


# -- small models --------------------------------------------------------------------------------


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """stem conv -> residual block -> strided 1x1 conv -> residual block -> pool -> fc."""

    def __init__(self, in_channels: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block1 = ResBlock(8)
        self.down = nn.Conv2d(8, 16, 1, stride=2)
        self.block2 = ResBlock(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.block1(F.relu(self.bn(self.stem(x))))
        x = self.block2(self.down(x))
        return self.fc(x.mean((2, 3)))


class LSTMNet(nn.Module):
    """Linear -> 2-layer bidirectional LSTM -> Linear (the LSTM is neither first nor last)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.lstm = nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        y, (h, c) = self.lstm(self.inp(x))
        return self.out(y).mean(1) + h.sum(0).mean(-1, keepdim=True) + c.sum(0).mean(-1, keepdim=True)


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.proj(x)
        a, _ = self.attn(h, h, h)
        return self.head(a).mean(1)


def _resnet_batch(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _lstm_batch(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


# -- 1. fp32 recipe: bit-identical ---------------------------------------------------------------


@pytest.mark.parametrize("make, batch", [(SmallResNet, _resnet_batch), (LSTMNet, _lstm_batch)])
def test_fp32_recipe_is_bit_identical_to_the_original(make, batch):
    torch.manual_seed(0)
    ref = make()
    model = copy.deepcopy(ref)
    _convert(model, "fp32", example_input=batch(99)[0])
    kinds = {type(m) for m in model.modules()}
    assert kinds & {QLinear, QConv2d, QLSTM}, "nothing was converted"
    assert not any(type(m) in (nn.Linear, nn.Conv2d, nn.LSTM) for m in model.modules())

    initial = {name: p.detach().clone() for name, p in ref.named_parameters()}
    x, y = batch(0)
    out_ref, out = ref(x), model(x)
    assert torch.equal(out, out_ref)
    F.cross_entropy(out_ref, y).backward()
    F.cross_entropy(out, y).backward()
    ref_params, params = dict(ref.named_parameters()), dict(model.named_parameters())
    assert list(params) == list(ref_params)  # fp32 layers add no parameters (no PACT)
    for name, p in params.items():
        assert torch.equal(p.grad, ref_params[name].grad), name

    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x, y = batch(step + 1)
        assert torch.equal(_step(model, opt, x, y), _step(ref, opt_ref, x, y)), step
    for name, p in params.items():
        assert torch.equal(p, ref_params[name]), name
        assert not torch.equal(p, initial[name]), name  # the steps did move every parameter
    # BatchNorm running statistics too; the converted model only adds `quant` state
    state, ref_state = model.state_dict(), ref.state_dict()
    assert [k for k in state if ".quant." not in k] == list(ref_state)
    for name, t in ref_state.items():
        assert torch.equal(state[name], t), name


# -- 2. every GEMM operand of an ibm4 training step ----------------------------------------------


def _record_gemms(monkeypatch, model):
    """Wrap QuantState.gemm (which layer runs which GemmOps) and gemm._gemm (the operands).

    Returns a list of (layer name, "fwd" | "da" | "db", x, y): every GEMM that runs."""
    owner = {
        id(m): name.removesuffix(".quant") for name, m in model.named_modules() if isinstance(m, QuantState)
    }
    ops_of = {}  # id(callable) -> (layer, gemm); the GemmOps are kept alive in `keep`
    keep, calls = [], []
    original_gemm, original_state_gemm = gemm_module._gemm, QuantState.gemm

    def state_gemm(self, a, b, ops):
        layer = owner[id(self)]
        keep.append(ops)
        ops_of.update(
            {id(ops.forward): (layer, "fwd"), id(ops.grad_a): (layer, "da"), id(ops.grad_b): (layer, "db")}
        )
        return original_state_gemm(self, a, b, ops)

    def recording_gemm(op, x, y, *args, **kwargs):
        layer, which = ops_of[id(op)]
        calls.append((layer, which, x.detach().clone(), y.detach().clone()))
        return original_gemm(op, x, y, *args, **kwargs)

    monkeypatch.setattr(QuantState, "gemm", state_gemm)
    monkeypatch.setattr(gemm_module, "_gemm", recording_gemm)
    return calls


def _distinct(t):
    return t.unique().numel()


def _is_fp16(t):
    return torch.equal(t, t.half().float())


def test_ibm4_training_step_sees_only_4bit_operands_in_4bit_layers(monkeypatch):
    torch.manual_seed(0)
    model = SmallResNet()
    x, y = _resnet_batch(0, n=16)
    _convert(model, "ibm4", example_input=x[:2])
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QLinear | QConv2d)}
    assert set(layers) == {
        "stem", "block1.conv1", "block1.conv2", "down", "block2.conv1", "block2.conv2", "fc",
    }  # fmt: skip
    assert layers["stem"].quant.spec == IBM4.first == recipes.get("fp16").default
    assert layers["fc"].quant.spec == IBM4.last == recipes.get("fp16").default
    four_bit = {n for n, m in layers.items() if m.quant.spec == IBM4.default}
    assert four_bit == set(layers) - {"stem", "fc"}

    # quant.* parameters (PACT clips) are trained too
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # one step before recording: GradScale and PACT settle past their first iteration
    _step(model, opt, *_resnet_batch(1, n=16))
    weights = {n: m.weight.detach().clone() for n, m in layers.items()}
    pacts = {n: m.quant.pact_a for n, m in layers.items() if n in four_bit}
    alphas = {n: pact.alpha.detach().clone() for n, pact in pacts.items()}
    calls = _record_gemms(monkeypatch, model)
    _step(model, opt, x, y)

    by_layer = {}
    for layer, which, a, b in calls:
        assert which not in by_layer.setdefault(layer, {}), f"{layer}: {which} GEMM ran twice"
        by_layer[layer][which] = (a, b)
    assert set(by_layer) == set(layers)
    for layer, gemms in by_layer.items():
        # the stem's input needs no gradient: no dA GEMM there
        expected = {"fwd", "db"} if layer == "stem" else {"fwd", "da", "db"}
        assert set(gemms) == expected, layer

    # after a ReLU the unsigned grid; block2.conv1 reads the 1x1 conv's output: the signed one
    assert {n for n, p in pacts.items() if p.signed} == {"block2.conv1"}
    for layer in four_bit:
        act, weight = by_layer[layer]["fwd"]
        g_dx, weight_da = by_layer[layer]["da"]
        act_db, g_dw = by_layer[layer]["db"]
        assert 8 <= _distinct(weight) <= 16, layer  # INT4 SAWB: a real 4-bit grid, not a constant
        assert 2 <= _distinct(act) <= 16, layer  # PACT: unsigned 0..15 or signed -7..7
        assert _distinct(g_dx) <= 15 and _distinct(g_dw) <= 15, layer  # radix-4 FP4: 0 and ±7 magnitudes
        assert _distinct(g_dx) >= 3 and _distinct(g_dw) >= 3, layer
        # the dA GEMM uses the forward's quantized weight, the dB GEMM its quantized activation
        assert torch.equal(weight_da, weight), layer
        assert torch.equal(act_db, act), layer
        # weights: integers -8..7 times the SAWB scale; activations: integers times alpha / qmax
        codes = weight / sawb_scale(weights[layer], INT4)
        assert torch.allclose(codes, codes.round(), atol=1e-4), layer
        assert codes.round().min() >= -8 and codes.round().max() <= 7, layer
        signed = bool(pacts[layer].signed)
        qmax = 7 if signed else 15
        codes = act / (alphas[layer] / qmax)
        assert torch.allclose(codes, codes.round(), atol=1e-4), layer
        assert codes.round().min() >= (-qmax if signed else 0) and codes.round().max() <= qmax, layer
        # gradients: powers of four times 2**phase; TPR feeds phase 1 to dX, phase 0 to dW
        for g, parity in ((g_dx, 1), (g_dw, 0)):
            mags = g[g != 0].abs()
            exps = torch.log2(mags)
            assert torch.equal(exps, exps.round()), layer
            assert bool((exps.round().long() % 2 == parity).all()), (layer, parity, exps.unique())
            assert mags.max() <= 2.0**parity, layer  # GradScale keeps s·dY within the top value

    for layer in ("stem", "fc"):
        for which, (a, b) in by_layer[layer].items():
            assert _is_fp16(a) and _is_fp16(b), (layer, which)
    stem_input = by_layer["stem"]["fwd"][0]
    assert _distinct(stem_input) > 16  # fp16 pixels, not a 4-bit grid
    assert torch.equal(stem_input, x.half().float())


# -- 3. saved-for-backward bytes -----------------------------------------------------------------


def _saved_bytes(module, x):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    # the packed form still serves both backward GEMMs (a gradient of order 1: GradScale
    # starts at 1 and only doubles per step, so a tiny first gradient would underflow)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    return sum(saved)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda cls, **kw: cls(512, 256, **kw), (256, 512)),
        (lambda cls, **kw: cls(64, 64, 3, padding=1, **kw), (16, 64, 16, 16)),
    ],
    ids=["linear", "conv2d"],
)
def test_backward_keeps_packed_4bit_operands_not_float32_copies(make, shape):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(shape))
    plain = _saved_bytes(make(nn.Linear if len(shape) == 2 else nn.Conv2d), x.clone().requires_grad_())
    q_cls = QLinear if len(shape) == 2 else QConv2d
    quant = _saved_bytes(make(q_cls, spec=IBM4.default), x.clone().requires_grad_())
    # fp32 saves X and W (4 bytes each); ibm4: half a byte each, plus a 1-bit PACT clip mask
    w_numel = 512 * 256 if len(shape) == 2 else 64 * 64 * 9
    assert plain >= 4 * (x.numel() + w_numel)
    assert quant / plain <= 0.30, (quant, plain)
    assert quant <= x.numel() * (1 / 2 + 1 / 8) + w_numel / 2 + 64, quant  # + a few scalar scales


# -- 4. every preset trains ----------------------------------------------------------------------

TRAIN, TEST, STEPS, BATCH = 2000, 500, 150, 64


@pytest.fixture(scope="module")
def fashion():
    from fourbit.tasks.idx import load_idx_split

    images, labels = load_idx_split(None, "train")
    test_images, test_labels = load_idx_split(None, "test")
    # every other pixel: 14x14 images keep the test fast; values stay pixel/255 in [0, 1]
    x = images[:TRAIN, ::2, ::2].unsqueeze(1).float() / 255
    xt = test_images[:TEST, ::2, ::2].unsqueeze(1).float() / 255
    return x, labels[:TRAIN], xt, test_labels[:TEST]


def _tiny_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip


def _tiny_mlp():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(14 * 14, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
    )


def _row_scaled(name: str) -> bool:
    return any(recipes.get(name).spec_for(role).row_scaled for role in recipes.ROLES)


@pytest.mark.parametrize("name", recipes.names())
def test_every_recipe_trains_a_small_cnn_on_fashion_mnist(name, fashion):
    """(A recipe with row scales, which a convolution refuses, trains an MLP instead.)"""
    x, y, xt, yt = fashion
    torch.manual_seed(0)
    if _row_scaled(name):
        with pytest.raises(ValueError, match="convolution"):
            _convert(_tiny_cnn(), name, example_input=x[:2])
    model = _convert(_tiny_mlp() if _row_scaled(name) else _tiny_cnn(), name, example_input=x[:2])
    layers = [i for i, m in enumerate(model) if isinstance(m, QLinear | QConv2d)]
    assert len(layers) == 3
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        idx = torch.randint(0, TRAIN, (BATCH,), generator=g)
        losses.append(_step(model, opt, x[idx], y[idx]).item())
    assert all(math.isfinite(v) for v in losses), name
    model.eval()
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    print(f"{name}: test accuracy {accuracy:.3f}, last loss {losses[-1]:.3f}")
    assert accuracy > 0.5, (name, accuracy)  # chance is 0.1
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:5]) / 5, name
    # a head on frozen random convs alone reaches ~0.76 here, so the accuracy does not prove
    # the quantized backward: the weight gradients of every layer must point the way of the
    # float32 gradients of the same weights (all4, whose forward differs most, is lowest: ~0.5)
    model.train()
    reference = _convert(copy.deepcopy(model), "fp32")
    for net in (model, reference):
        net.zero_grad()
        F.cross_entropy(net(x[:256]), y[:256]).backward()
    for i in layers:
        cosine = F.cosine_similarity(
            model[i].weight.grad.flatten(), reference[i].weight.grad.flatten(), dim=0
        )
        assert cosine > 0.3, (name, i, cosine.item())


# -- 5. reproducibility ----------------------------------------------------------------------------


def _losses(name, seed, steps=10):
    torch.manual_seed(0)
    model = _convert(SmallResNet(), name, example_input=_resnet_batch(99)[0], seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return [_step(model, opt, *_resnet_batch(step, n=16)).item() for step in range(steps)]


@pytest.mark.parametrize("name", ["ibm4", "luq4", "nvfp4"])
def test_same_seed_same_losses_and_the_seed_drives_stochastic_rounding(name):
    first = _losses(name, seed=0)
    assert _losses(name, seed=0) == first
    other = _losses(name, seed=1)
    if recipes.get(name).default.stochastic:
        # forward rounding is deterministic in both, so only the gradients differ
        assert other[0] == first[0]
        assert other != first
    else:
        assert other == first  # nothing random: the seed has nothing to change


# -- 6. inference, checkpoints, copies, half precision --------------------------------------------


MODELS = {"resnet": (SmallResNet, _resnet_batch), "lstm": (LSTMNet, _lstm_batch)}


def _trained(name="ibm4", model="resnet", steps=2):
    make, batch = MODELS[model]
    torch.manual_seed(0)
    net = _convert(make(), name, example_input=batch(99)[0])
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        _step(net, opt, *batch(step, n=16))
    return net


def _quant_states(model):
    return {
        name: copy.deepcopy(m.state_dict()) for name, m in model.named_modules() if isinstance(m, QuantState)
    }


@pytest.mark.parametrize("name", ["ibm4", "luq4", "nvfp4"])
def test_no_grad_and_eval_forward_leaves_the_training_state_alone(name):
    model = _trained(name)
    before = _quant_states(model)
    if recipes.get(name).default.gradscale != "none":  # the steps moved GradScale off its start
        assert any(s["gradscale.scale"] != 1 for s in before.values())
    x, _ = _resnet_batch(5)
    model.eval()
    with torch.no_grad():
        out = model(x)  # nothing saved for backward: the keep=False path
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    assert not out.requires_grad
    after = _quant_states(model)
    for layer, state in before.items():
        for key, t in state.items():
            assert torch.equal(after[layer][key], t), (layer, key)
    out_grad = model(x)  # eval with autograd on: the keep=True path computes the same values
    assert out_grad.requires_grad
    assert torch.equal(out, out_grad.detach())


@pytest.mark.parametrize("name, model", [("ibm4", "resnet"), ("luq4", "resnet"), ("ibm4", "lstm")])
def test_state_dict_round_trip_into_a_fresh_model(name, model, tmp_path):
    trained = _trained(name, model)
    make, batch = MODELS[model]
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    torch.manual_seed(123)  # a different initialisation, overwritten by the checkpoint
    fresh = _convert(make(), name, example_input=batch(99)[0])
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x, y = batch(5)
    trained.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
    # training resumes identically: GradScale, PACT clip and signedness and the rounding
    # generators' state came back too
    trained.train()
    fresh.train()
    opt_a = torch.optim.SGD(trained.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(fresh.parameters(), lr=0.05)
    for step in range(3):
        x, y = batch(10 + step, n=16)
        assert torch.equal(_step(fresh, opt_b, x, y), _step(trained, opt_a, x, y)), step
    for (key, p), q in zip(trained.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), key


@pytest.mark.parametrize("model", ["resnet", "lstm"])
def test_deepcopy_gives_identical_outputs_and_independent_state(model):
    trained = _trained("ibm4", model)
    twin = copy.deepcopy(trained)
    _, batch = MODELS[model]
    x, _ = batch(5)
    trained.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.equal(twin(x), trained(x))
    before = copy.deepcopy(trained.state_dict())
    twin.train()
    opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    for step in range(3):
        _step(twin, opt, *batch(20 + step, n=16))
    changed = [k for k, t in twin.state_dict().items() if not torch.equal(t, before[k])]
    assert any(".quant." in k for k in changed)  # GradScale, PACT clips
    assert any(k.endswith("weight") or "weight_" in k for k in changed)
    for key, t in trained.state_dict().items():  # the original did not move with its copy
        assert torch.equal(t, before[key]), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_half_precision_inputs_give_outputs_of_the_same_dtype(dtype, kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = QLinear(16, 8, spec=IBM4.default), torch.randn(4, 16)
    else:
        layer, x = QConv2d(3, 4, 3, padding=1, spec=IBM4.default), torch.randn(2, 3, 6, 6)
    x = x.to(dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype
    assert torch.isfinite(y).all() and y.float().abs().sum() > 0
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()
    # the same layer and input in float32 give the same values, up to the half-precision output
    ref = layer(x.detach().float())
    assert torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


# -- 7. errors and policies ------------------------------------------------------------------------


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(ValueError, match="nope") as info:
        recipes.get("nope")
    for name in recipes.names():
        assert name in str(info.value)
    model = SmallResNet()
    with pytest.raises(ValueError, match="nope"):
        _convert(model, "nope")
    with pytest.raises(ValueError, match="nope"):
        _convert(model, "ibm4", policy={"fc": "nope"})
    # nothing was swapped before the error
    assert not any(isinstance(m, QLinear | QConv2d) for m in model.modules())


def test_multihead_attention_is_left_unconverted_and_listed():
    torch.manual_seed(0)
    model = AttnNet()
    x = torch.randn(2, 5, 8)
    _convert(model, "ibm4", example_input=x)
    assert type(model.attn) is nn.MultiheadAttention
    assert not isinstance(model.attn.out_proj, QLinear)
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(model.proj, QLinear) and isinstance(model.head, QLinear)
    rows = fourbit.summary(model, file=io.StringIO())
    row = next(r for r in rows if r["name"] == "attn")
    assert row["W"] == "not converted"
    assert "MultiheadAttention" in row["kind"] and len(row["G"]) > 10
    assert not any(r["name"].startswith("attn.") and r["W"] != "not converted" for r in rows)
    assert {r["name"] for r in rows if r["W"] != "not converted"} == {"proj", "head"}
    out = model(x)
    out.sum().backward()
    assert torch.isfinite(model.proj.weight.grad).all()


def test_policy_picks_a_recipe_per_module():
    fp16, all4 = recipes.get("fp16").default, recipes.get("all4")
    torch.manual_seed(0)
    model = _convert(SmallResNet(), "all4", example_input=_resnet_batch(99)[0])
    assert model.fc.quant.spec == all4.spec_for("last") == all4.default  # all4: the last layer is 4-bit
    assert model.stem.quant.spec == all4.first
    model = _convert(
        SmallResNet(),
        "all4",
        policy={"fc": "fp16", "block1.*": "hfp8", "down": FP32_LAYER},
        example_input=_resnet_batch(99)[0],
    )
    assert model.fc.quant.spec == fp16
    assert model.block1.conv1.quant.spec == model.block1.conv2.quant.spec == recipes.get("hfp8").default
    assert model.down.quant.spec == FP32_LAYER
    assert model.block2.conv1.quant.spec == all4.default
    rows = {r["name"]: r for r in fourbit.summary(model, file=io.StringIO())}
    assert rows["fc"]["W"] == "fp16" and rows["down"]["W"] == "fp32"


# -- 8. QLSTM ------------------------------------------------------------------------------------

NO_QUANT = LayerSpec(dx_phase=0, dw_phase=1)  # every operand float32, yet not FP32_LAYER


def _lstm_and_copy(recipe="ibm4"):
    torch.manual_seed(0)
    net = LSTMNet()
    ref = copy.deepcopy(net.lstm)
    _convert(net, recipe, example_input=_lstm_batch(99)[0])
    return net, ref


def _lstm_inputs(batched: bool, with_state: bool, batch_first: bool = True, layers: int = 2, dirs: int = 2):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 7, 8, generator=g) if batch_first else torch.randn(7, 3, 8, generator=g)
    h0 = torch.randn(layers * dirs, 3, 16, generator=g)
    c0 = torch.randn(layers * dirs, 3, 16, generator=g)
    if not batched:
        x, h0, c0 = (x[0] if batch_first else x[:, 0]), h0[:, 0], c0[:, 0]
    return (x, (h0, c0)) if with_state else (x,)


def test_qlstm_state_dict_is_the_lstm_one_plus_quant_state():
    net, ref = _lstm_and_copy()
    q = net.lstm
    assert type(q) is QLSTM and q.spec == IBM4.spec_for("lstm") == IBM4.default
    assert type(net.inp) is QLinear and net.inp.quant.spec == IBM4.first
    assert type(net.out) is QLinear and net.out.quant.spec == IBM4.last

    ref_keys, keys = list(ref.state_dict()), list(q.state_dict())
    assert [k for k in keys if not k.startswith("quant.")] == ref_keys
    extra = set(keys) - set(ref_keys)
    for cell in ("l0", "l0_reverse", "l1", "l1_reverse"):
        for gemm in ("ih", "hh"):
            assert f"quant.{cell}_{gemm}.gradscale.scale" in extra
            assert f"quant.{cell}_{gemm}.pact_a.alpha" in extra
            assert f"quant.{cell}_{gemm}.rng_state" in extra
    # an nn.LSTM checkpoint loads into the QLSTM (strict=False: its quant state stays)
    missing, unexpected = q.load_state_dict(ref.state_dict(), strict=False)
    assert set(missing) == extra and not unexpected


@pytest.mark.parametrize("with_state", [False, True], ids=["no-hx", "hx"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_qlstm_output_shapes_are_nn_lstm_shapes(batched, with_state):
    net, ref = _lstm_and_copy()
    args = _lstm_inputs(batched, with_state)
    out, (h, c) = net.lstm(*args)
    out_ref, (h_ref, c_ref) = ref(*args)
    assert (out.shape, h.shape, c.shape) == (out_ref.shape, h_ref.shape, c_ref.shape)
    assert torch.isfinite(out).all() and torch.isfinite(h).all() and torch.isfinite(c).all()


def test_qlstm_ibm4_gradients_are_finite_and_close_to_the_lstm():
    net, ref = _lstm_and_copy()
    q = net.lstm
    x, (h0, c0) = _lstm_inputs(True, True)
    x.requires_grad_()
    out, (h, c) = q(x, (h0, c0))
    out_ref, _ = ref(x, (h0, c0))
    # 4-bit, but still the same LSTM: the outputs point the same way
    assert F.cosine_similarity(out.flatten(), out_ref.flatten(), dim=0) > 0.9
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in q.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.startswith("quant."):
            assert p.grad.abs().sum() > 0, name


class _Cell(torch.autograd.Function):
    """cell_forward / cell_backward as an autograd node of their own."""

    @staticmethod
    def forward(ctx, gates, c):
        h, c_new, ctx.cell = cell_forward(gates, c)
        return h, c_new

    @staticmethod
    def backward(ctx, dh, dc_new):
        return cell_backward(ctx.cell, dh, dc_new)


def _recurrence_as_step_nodes(gates_x, h, c, w_hh, alpha, state, held_w, reverse, keep):
    """QuantizedRecurrence spelled out as 2·T autograd nodes: a QuantizedGemm (through the
    layer's QuantState, as any QLinear runs it) and a cell node per time step."""
    outputs = [None] * gates_x.shape[0]
    for t in reversed(range(len(outputs))) if reverse else range(len(outputs)):
        keep_t = torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (h, w_hh, alpha))
        ops = gemm_module.linear_ops()
        y = gemm_module.QuantizedGemm.apply(h, w_hh, alpha, None, state, ops, keep_t, held_w)
        h, c = _Cell.apply(gates_x[t] + y, c)
        outputs[t] = h
    return torch.stack(outputs), h, c


@pytest.mark.parametrize("recipe", ["ibm4", "luq4", "nvfp4", "mxfp4", "ibm4-fp16acc", "ibm4-lstm-sawb"])
def test_qlstm_one_node_recurrence_is_the_per_step_nodes_bit_for_bit(recipe, monkeypatch):
    """The recurrence as one autograd node computes what one QuantizedGemm node per step
    computes: outputs, every gradient, GradScale values and generator states, over three
    training steps (so the adaptive GradScale and stochastic rounding carry across steps)."""
    fast, _ = _lstm_and_copy(recipe)
    slow = copy.deepcopy(fast)
    x, y = _lstm_batch(3, n=5)

    def train(net):
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        losses, grads = [], []
        for _ in range(3):
            losses.append(_step(net, opt, x, y))
            grads.append({k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None})
        with torch.no_grad():
            return losses, grads, net(x)

    ours = train(fast)
    with monkeypatch.context() as m:
        m.setattr(lstm_module.QuantizedRecurrence, "apply", _recurrence_as_step_nodes)
        theirs = train(slow)
    assert torch.equal(torch.stack(ours[0]), torch.stack(theirs[0]))
    for g_ours, g_theirs in zip(ours[1], theirs[1], strict=True):
        assert g_ours.keys() == g_theirs.keys()
        assert "lstm.quant.l1_reverse_hh.pact_a.alpha" in g_ours or recipe != "ibm4"
        for k in g_ours:
            assert torch.equal(g_ours[k], g_theirs[k]), k
    assert torch.equal(ours[2], theirs[2])
    for (k, a), (_, b) in zip(fast.state_dict().items(), slow.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_qlstm_recurrence_with_frozen_weights_and_no_grad_input():
    """With W_hh frozen and h0 constant, the first step has nothing to differentiate: it
    saves nothing and its GradScale does not move, as if it were a node of its own."""
    net, _ = _lstm_and_copy()
    ref = copy.deepcopy(net)
    for model in (net, ref):
        for name, p in model.lstm.named_parameters():
            p.requires_grad_(not name.startswith("weight_hh") and not name.startswith("quant."))
    x, y = _lstm_batch(4)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(lstm_module.QuantizedRecurrence, "apply", _recurrence_as_step_nodes)
        F.cross_entropy(ref(x), y).backward()
    for (k, a), (_, b) in zip(net.named_parameters(), ref.named_parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), k
    for (k, a), (_, b) in zip(net.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_qlstm_trains_finite_inside_a_model():
    net, _ = _lstm_and_copy()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses = [_step(net, opt, *_lstm_batch(0, n=8)).item() for _ in range(10)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_qlstm_fp32_is_nn_lstm_exactly(batched):
    net, ref = _lstm_and_copy("fp32")
    assert type(net.lstm) is QLSTM and net.lstm.spec == FP32_LAYER
    args = _lstm_inputs(batched, True)
    out, (h, c) = net.lstm(*args)
    out_ref, (h_ref, c_ref) = ref(*args)
    assert torch.equal(out, out_ref) and torch.equal(h, h_ref) and torch.equal(c, c_ref)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_qlstm_own_recurrence_without_quantization_matches_nn_lstm(batched, batch_first):
    """A LayerSpec that quantizes nothing but is not FP32_LAYER runs QLSTM's own loop."""
    torch.manual_seed(0)
    ref = nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=batch_first)
    assert not NO_QUANT.is_fp32
    q = QLSTM.from_float(copy.deepcopy(ref), NO_QUANT)
    args = _lstm_inputs(batched, True, batch_first)
    out, (h, c) = q(*args)
    out_ref, (h_ref, c_ref) = ref(*args)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-6)
    (out.sum() + h.square().sum()).backward()
    (out_ref.sum() + h_ref.square().sum()).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in q.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)
