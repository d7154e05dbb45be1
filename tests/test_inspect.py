"""fourbit inspect and fourbit bn-drift: the telemetry numbers against hand-worked values,
the JSON they write, the CLI end to end, and BatchNorm drift (exactly 0 under fp32)."""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import fourbit
from fourbit import telemetry
from fourbit.cli import main
from fourbit.nn import LayerSpec, OperandSpec, QLinear
from fourbit.recipes import LUQ_GRAD, Recipe
from fourbit.tasks.speech import SpeechBiLSTM
from fourbit.tasks.translate import TranslateTransformer
from fourbit.train import RunConfig, train

from .test_train_cli import _Killed, _tiny_fashion


def f32(values):
    """The float32 numbers a float32 tensor of `values` holds, as Python floats."""
    return [float(v) for v in np.asarray(values, dtype=np.float32)]


def expected(x, q, lo, hi):
    """The telemetry definitions written out on plain floats: an independent reference."""
    e = [b - a for a, b in zip(x, q, strict=True)]
    nonzero = [a for a in x if a != 0]
    return {
        "sqnr_db": 10 * math.log10(sum(a * a for a in x) / sum(d * d for d in e)),
        "clipped": sum(a < lo or a > hi for a in x) / len(x),
        "flushed": sum(a != 0 and b == 0 for a, b in zip(x, q, strict=True)) / len(nonzero),
        "bias": sum(e) / sum(abs(a) for a in x),
    }


def check(stats, want):
    for key, value in want.items():
        assert stats[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_operand_numbers_on_a_layer_worked_by_hand():
    """QLinear(4 -> 1), batch 4: a fixed-scale INT4 weight, a PACT activation with clip 1.5,
    radix-4 gradients with TPR under a fixed GradScale of 4. Every q below is worked out on
    paper from the grids; the statistics follow from the definitions."""
    spec = LayerSpec(
        weight=OperandSpec("int4", scaler="fixed", scale=0.5),  # grid -4.0, -3.5, ..., 3.5
        activation=OperandSpec("int4", scaler="pact", pact_init=1.5),  # 0, 0.1, ..., 1.5
        grad_dx=OperandSpec("fp4_radix4"),
        grad_dw=OperandSpec("fp4_radix4"),
        tpr=True,  # dX: phase 1 (2·4^-k), dW: phase 0 (4^-k)
        gradscale="none",
        gradscale_init=4.0,
    )
    layer = QLinear(4, 1, bias=False, spec=spec)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 0.3, -0.6, 5.0]]))
    a = torch.zeros(4, 4)
    a[0] = torch.tensor([0.0, 0.04, 0.26, 2.0])
    c = torch.tensor([0.75, 0.075, 0.0125, 2.5e-7])  # dY; times GradScale 4: 3, 0.3, 0.05, 1e-6
    with telemetry.Recorder(layer) as rec:
        (layer(a.requires_grad_()).squeeze(1) * c).sum().backward()
    assert layer.quant.observer is None  # detached after the block
    (summary,) = rec.layers()
    ops = summary["operands"]
    assert summary["name"] == "" and summary["kind"] == "QLinear"
    assert set(ops) == {"W", "A", "G_dx", "G_dw"}

    # W / 0.5 = 0.2, 0.6, -1.2, 10 -> 0, 1, -1, 7 (saturates); range [-8, 7]·0.5
    w = f32([0.1, 0.3, -0.6, 5.0])
    check(ops["W"], expected(w, [0.0, 0.5, -0.5, 3.5], -4.0, 3.5))
    assert ops["W"]["clipped"] == 0.25 and ops["W"]["flushed"] == 0.25

    # A / 0.1 = 0, 0.4, 2.6, 20 -> 0, 0, 3, 15 (clipped at alpha); the other rows are 0
    s = float(np.float32(1.5) / np.float32(15))
    x_a = f32([0.0, 0.04, 0.26, 2.0]) + [0.0] * 12
    q_a = [0.0, 0.0, float(np.float32(3) * np.float32(s)), float(np.float32(15) * np.float32(s))] + [0.0] * 12
    check(ops["A"], expected(x_a, q_a, 0.0, 1.5))
    assert ops["A"]["clipped"] == 1 / 16 and ops["A"]["flushed"] == 1 / 3

    g = [4 * v for v in f32([0.75, 0.075, 0.0125, 2.5e-7])]
    # phase 1: 3 -> 2 (top), 0.3 -> 0.125 (below the midpoint 0.3125), 0.05 -> 1/32, 1e-6 -> 0
    check(ops["G_dx"], expected(g, [2.0, 0.125, 0.03125, 0.0], -2.0, 2.0))
    # phase 0: 3 -> 1 (top), 0.3 -> 0.25, 0.05 -> 1/16 (above the midpoint 0.0390625), 1e-6 -> 0
    check(ops["G_dw"], expected(g, [1.0, 0.25, 0.0625, 0.0], -1.0, 1.0))
    for point in ("G_dx", "G_dw"):
        assert ops[point]["clipped"] == 0.25 and ops[point]["flushed"] == 0.25
        assert ops[point]["gradscale"] == {"last": 4.0, "min": 4.0, "max": 4.0}
        assert ops[point]["format"].endswith(f"phase {1 if point == 'G_dx' else 0}")
    assert ops["W"]["sqnr_db_per_step"] == [ops["W"]["sqnr_db"]]
    hist = summary["grad_hist"]  # log2 of 3, 0.3, 0.05, 1e-6: bins at 1.58, -1.74, -4.32, -19.9
    bins = [int((math.log2(v) - telemetry.HIST_LOW) / telemetry.HIST_WIDTH) for v in g]
    assert [i for i, n in enumerate(hist["counts"]) for _ in range(n)] == sorted(bins)
    assert hist["zero"] == hist["below"] == hist["above"] == 0


def test_an_exact_operand_has_null_sqnr_and_no_error():
    layer = QLinear(3, 2, spec=LayerSpec(weight=OperandSpec("int4", scaler="fixed", scale=0.25)))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.25, -0.5, 1.0], [0.0, 0.75, -2.0]]))  # on the grid
    with telemetry.Recorder(layer) as rec:
        layer(torch.randn(5, 3))
    ops = rec.layers()[0]["operands"]
    assert ops["W"]["sqnr_db"] is None and ops["W"]["bias"] == 0 and ops["W"]["clipped"] == 0
    assert ops["A"]["sqnr_db"] is None  # an fp32 operand: q is x


def test_block_format_range_is_per_block():
    """MXFP4 block scale 2^(floor(log2 amax) - 2): amax 7 -> 1 (top 6), amax 3 -> 0.5 (top 3)."""
    x = torch.zeros(2, 32)
    x[0, :3] = torch.tensor([7.0, 6.5, -5.0])
    x[1, :3] = torch.tensor([3.0, -2.9, 0.1])
    lo, hi = telemetry.grid_range(OperandSpec("mxfp4"), x, phase=0, axis=-1)
    assert torch.equal(hi[0], torch.full((32,), 6.0)) and torch.equal(hi[1], torch.full((32,), 3.0))
    assert torch.equal(lo, -hi)
    # blocks along the other axis: column 0 holds 7 and 3 -> its block's top is 6
    lo, hi = telemetry.grid_range(OperandSpec("mxfp4"), x, phase=0, axis=0)
    assert float(hi[0, 0]) == 6.0 and float(hi[0, 5]) == 6 * 2.0**-127  # all zero: the smallest scale


def test_row_scaled_range_is_per_row_and_clipping_counts_against_it():
    """max scales, one per row: the top of row r is max |x_r| (x = -max clips at -8·s < -max)."""
    x = torch.tensor([[7.0, -1.0, 0.5], [0.07, 0.01, -0.03]])
    spec = OperandSpec("int4", "max", granularity="row")
    lo, hi = telemetry.grid_range(spec, x, phase=0, axis=-1)
    assert torch.equal(hi, torch.tensor([[7.0] * 3, [0.07] * 3]))
    assert torch.equal(lo, -hi * 8 / 7)
    layer = QLinear(3, 2, spec=LayerSpec(activation=spec))
    with telemetry.Recorder(layer) as rec:
        layer(x)
    a = rec.layers()[0]["operands"]["A"]
    # row 0's 0.5 (step 1) ties to 0; row 1's 0.01, on its own step of 0.01, stays
    assert a["clipped"] == 0 and a["flushed"] == 1 / 6


def _train_steps(model, batches, loss_fn, seed=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(seed)
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()


@pytest.mark.parametrize("recipe", ["ibm4", "luq4", "nvfp4"])
def test_recording_leaves_training_bit_identical(recipe):
    """The probes draw no random numbers and change no tensor: the same steps with and
    without a Recorder end with the same parameters (luq4 / nvfp4 round stochastically)."""
    task = SpeechBiLSTM(hidden=8)
    batches = [task.synthetic_batch(3, 12, torch.Generator().manual_seed(i)) for i in range(2)]
    params = []
    for record in (False, True):
        torch.manual_seed(0)
        model = fourbit.convert(task.build_model(), recipe, example_input=task.model_inputs(batches[0]),
                                verbose=False)  # fmt: skip
        if record:
            with telemetry.Recorder(model) as rec:
                _train_steps(model, batches, lambda m, b: task.loss(m, b)[0])
            assert len(rec.layers()) == 2 + 2 * 2 * 4  # proj, out, and 4 layers x 2 directions x (ih, hh)
        else:
            _train_steps(model, batches, lambda m, b: task.loss(m, b)[0])
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params, strict=True))


def test_lstm_recurrent_gemm_is_pooled_over_time_steps():
    task = SpeechBiLSTM(hidden=8)
    batch = task.synthetic_batch(3, 12, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = fourbit.convert(task.build_model(), "ibm4", example_input=task.model_inputs(batch), verbose=False)
    with telemetry.Recorder(model) as rec:
        task.loss(model, batch)[0].backward()
    layers = {layer["name"]: layer["operands"] for layer in rec.layers()}
    # l1's input GEMM sees [T·B, 2H] once, its recurrent GEMM [B, H] at each of T steps
    for kind in ("l1", "l1_reverse"):
        ih, hh = layers[f"lstm.{kind}_ih"], layers[f"lstm.{kind}_hh"]
        assert ih["A"]["elements"] == 2 * hh["A"]["elements"] == 2 * 3 * 3 * 8  # T = 12 / 4 stacked
        assert hh["G_dw"]["elements"] == 3 * 3 * 4 * 8 and len(hh["W"]["sqnr_db_per_step"]) == 1


def test_attention_matmuls_report_their_second_activation():
    task = TranslateTransformer(vocab_size=60, dim=16, layers=(1, 1), heads=2, hidden=32, dropout=0.0)
    batch = task.synthetic_batch(2, 6, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = fourbit.convert(task.build_model(), "ibm4", example_input=task.model_inputs(batch), verbose=False)
    with telemetry.Recorder(model) as rec:
        task.loss(model, batch)[0].backward()
    kinds = {}
    for layer in rec.layers():
        kinds.setdefault(layer["kind"], []).append(set(layer["operands"]))
    assert len(kinds["QMatmul"]) == 2 * 3  # scores and mix in 3 attentions
    assert all({"A", "B", "G_dx", "G_dw"} <= ops for ops in kinds["QMatmul"])
    assert all("W" in ops for ops in kinds["QLinear"])


def test_cli_inspect_writes_json_and_plots_and_follows_train(tmp_path, capsys):
    """Two steps of batch 48 on 96 images are one epoch: their mean loss is what
    `fourbit train` reports for that epoch (same init, data order and augmentation)."""
    data = _tiny_fashion(tmp_path / "data")
    out = tmp_path / "inspect"
    argv = ["inspect", "--task", "fashion-resnet20", "--recipes", "ibm4,mxfp4", "--steps", "2",
            "--batch-size", "48", "--data-dir", str(data), "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "stages.0.conv1" in printed and "SQNR dB" in printed
    assert "gradients against an fp32 copy of the model" in printed
    result = json.loads((out / "inspect.json").read_text())
    assert result["format"] == "fourbit-inspect" and result["version"] == 1
    assert result["task"] == "fashion-resnet20" and list(result["recipes"]) == ["ibm4", "mxfp4"]
    for recipe, r in result["recipes"].items():
        assert r["steps"] == 2 and r["batch_size"] == 48 and len(r["losses"]) == 2 and r["skipped_steps"] == 0
        names = [layer["name"] for layer in r["layers"]]
        assert names[0] == "stem.0" and names[-1] == "fc" and len(names) == 1 + 18 + 2 + 1
        for layer in r["layers"]:
            for point, o in layer["operands"].items():
                assert point in telemetry.POINTS and o["elements"] > 0
                assert isinstance(o["sqnr_db"], float) and 0 < o["sqnr_db"] < 150
                assert 0 <= o["clipped"] <= 1 and 0 <= o["flushed"] <= 1 and abs(o["bias"]) < 1
                assert len(o["sqnr_db_per_step"]) == 2
                assert ("gradscale" in o) == point.startswith("G_")
            assert ("grad_hist" in layer) == ("G_dx" in layer["operands"])
        # the last layer (fp16) gets the gradient no 4-bit GEMM touched yet; the 4-bit layers
        # below get one bent by every quantized layer above and by the 4-bit forward
        grads = {row["name"]: row for row in r["gradients"]}
        assert len(grads) == 65 and all(-1 <= row["cosine"] <= 1 for row in grads.values())
        assert grads["fc.weight"]["cosine"] > 0.95 and grads["stages.0.conv1.weight"]["cosine"] < 0.9
        conv = r["layers"][1]["operands"]
        assert conv["W"]["format"] == ("int4 (sawb)" if recipe == "ibm4" else "mxfp4")
    for name in ("sqnr.png", "grad_hist.png", "gradients.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*.tmp"))

    cfg = RunConfig("fashion-resnet20", "ibm4", epochs=1, batch_size=48, data_dir=str(data))
    train(cfg, tmp_path / "train", progress=False)
    epoch = json.loads((tmp_path / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["train_loss"] == pytest.approx(sum(result["recipes"]["ibm4"]["losses"]) / 2, rel=1e-6)


def test_cli_inspect_refuses_more_steps_than_an_epoch_and_an_unknown_layer(tmp_path, capsys):
    data = _tiny_fashion(tmp_path / "data")
    base = ["inspect", "--task", "fashion-resnet20", "--recipe", "ibm4", "--batch-size", "48",
            "--data-dir", str(data), "--out", str(tmp_path / "o"), "--quiet"]  # fmt: skip
    assert main([*base, "--steps", "3"]) == 2
    assert "exceeds the 2 steps left in the epoch" in capsys.readouterr().err
    assert main([*base, "--steps", "1", "--layer", "nope"]) == 2
    assert "--layer 'nope'" in capsys.readouterr().err


def test_cli_inspect_from_a_checkpoint_takes_the_next_steps_of_training(tmp_path, capsys, monkeypatch):
    """--from: inspect continues a checkpointed run. Its two steps from the end of epoch 1
    are epoch 2 of the uninterrupted run: their mean loss is that epoch's train loss."""
    data = _tiny_fashion(tmp_path / "data")
    cfg = RunConfig("fashion-resnet20", "ibm4", epochs=2, batch_size=48, seed=3, data_dir=str(data))
    train(cfg, tmp_path / "whole", progress=False)
    epoch2 = json.loads((tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()[1])

    import fourbit.train as train_module

    real_write = train_module.atomic_write

    def write_then_die(path, write):
        real_write(path, write)
        if path.name == "checkpoint.pt":
            raise _Killed  # the run stops at its first checkpoint, the end of epoch 1

    monkeypatch.setattr(train_module, "atomic_write", write_then_die)
    with pytest.raises(_Killed):
        train(cfg, tmp_path / "runs" / "ibm4", progress=False)
    monkeypatch.setattr(train_module, "atomic_write", real_write)
    checkpoint = tmp_path / "runs" / "ibm4" / "checkpoint.pt"
    before = checkpoint.read_bytes()

    out = tmp_path / "inspect"
    argv = ["inspect", "--task", "fashion-resnet20", "--recipe", "ibm4", "--from", str(tmp_path / "runs"),
            "--steps", "2", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    r = json.loads((out / "inspect.json").read_text())["recipes"]["ibm4"]
    assert r["from"] == {"epoch": 1, "step": 0} and r["seed"] == 3 and r["batch_size"] == 48
    assert sum(r["losses"]) / 2 == pytest.approx(epoch2["train_loss"], rel=1e-6)
    assert len(r["gradients"]) == 65 and len(r["layers"]) == 22
    assert checkpoint.read_bytes() == before  # inspecting writes nothing into the run
    assert r["reference_losses"] != r["losses"]  # an fp32 copy: not the 4-bit forward

    capsys.readouterr()
    assert main([*argv, "--gradient-reference", "own-forward"]) == 0
    assert "gradients against the recipe's own forward with float32 gradients" in capsys.readouterr().out
    result = json.loads((out / "inspect.json").read_text())
    own = result["recipes"]["ibm4"]
    assert result["gradient_reference"] == "own-forward" and own["losses"] == r["losses"]
    assert own["reference_losses"] == own["losses"]  # the same forward, from the checkpoint on
    extra = {g["name"] for g in own["gradients"]} - {g["name"] for g in r["gradients"]}
    assert extra and all(n.endswith(".quant.pact_a.alpha") for n in extra)  # the PACT clips' too

    capsys.readouterr()
    assert main([*argv, "--seed", "3"]) == 2
    assert "--from takes each run's settings from its checkpoint; drop --seed" in capsys.readouterr().err
    assert main([*argv[:4], "fp32", *argv[5:]]) == 2  # no run of fp32 in that folder
    assert f"no checkpoint at {tmp_path / 'runs' / 'fp32' / 'checkpoint.pt'}" in capsys.readouterr().err
    assert main(["inspect", "--task", "speech-bilstm", *argv[3:]]) == 2
    assert "is a checkpoint of task 'fashion-resnet20', not 'speech-bilstm'" in capsys.readouterr().err


def test_bn_distance_by_hand():
    bn, ref = nn.BatchNorm1d(2, eps=0.0), nn.BatchNorm1d(2, eps=0.0)
    bn.running_mean.copy_(torch.tensor([1.0, 0.0]))
    bn.running_var.copy_(torch.tensor([4.0, 1.0]))
    ref.running_var.copy_(torch.tensor([1.0, 2.0]))
    mean, var = telemetry.bn_distance(bn, ref)
    assert mean == pytest.approx(math.sqrt((1 / 1 + 0 / 2) / 2))
    assert var == pytest.approx(math.sqrt((3.0**2 + (-0.5) ** 2) / 2))


def test_cli_bn_drift_is_zero_under_fp32_and_not_under_ibm4(tmp_path, capsys):
    data = _tiny_fashion(tmp_path / "data")
    out = tmp_path / "bn"
    argv = ["bn-drift", "--task", "fashion-resnet20", "--recipes", "fp32,ibm4", "--epochs", "1",
            "--batch-size", "32", "--every", "1", "--data-dir", str(data), "--out", str(out),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "fp32: after 3 steps" in capsys.readouterr().out
    result = json.loads((out / "bn_drift.json").read_text())
    assert result["format"] == "fourbit-bn-drift" and result["every"] == 1
    for recipe, r in result["recipes"].items():
        assert [rec["step"] for rec in r["records"]] == [0, 1, 2, 3]
        assert len(r["records"][0]["mean_drift"]) == 1 + 9 * 2 + 2  # stem, 2 per block, 2 shortcuts
        drifts = [v for rec in r["records"] for key in ("mean_drift", "var_drift") for v in rec[key].values()]
        if recipe == "fp32":  # the shadow computes exactly what the model computes
            assert all(d == 0 for d in drifts)
        else:
            assert all(d == 0 for d in r["records"][0]["mean_drift"].values())  # nothing seen yet
            last = r["records"][-1]["var_drift"]  # the stem conv is fp16, the others 4-bit
            assert 0 < last["stem.1"] < 1e-4 < min(v for name, v in last.items() if name != "stem.1")
    assert (out / "bn_drift.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "ibm4" / "metrics.jsonl").exists()
    assert main([*argv, "--resume"]) == 2


def _fidelity(recipe, dropout, reference="fp32", steps=1, losses=None):
    """GradientFidelity over `steps` SGD steps of a tiny Transformer under `recipe`, as
    inspect runs it; appends (the model's loss, the reference's) of each step to `losses`."""
    task = TranslateTransformer(vocab_size=60, dim=16, layers=(1, 1), heads=2, hidden=32, dropout=dropout)
    gen = torch.Generator().manual_seed(0)
    batches = [task.synthetic_batch(4, 6, gen) for _ in range(steps)]
    torch.manual_seed(0)
    model = task.build_model()
    fourbit.convert(model, recipe, example_input=task.model_inputs(batches[0]), verbose=False)
    fidelity = telemetry.GradientFidelity(model, telemetry.reference_model(model, task, reference))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for batch in batches:
        fidelity.reference(task, batch)
        opt.zero_grad()
        loss = task.loss(model, batch)[0]
        loss.backward()
        fidelity.compare()
        if losses is not None:
            losses.append((float(loss.detach()), fidelity.reference_loss))
        opt.step()
    return {row["name"]: row for row in fidelity.summary()}


def _inner_weights(rows):
    return [r for n, r in rows.items() if n.startswith(("encoder", "decoder")) and n.endswith("weight")]


def test_gradient_fidelity_is_exact_under_fp32_with_dropout_on():
    """The fp32 shadow draws the model's dropout masks: under fp32 every gradient is the same
    (null SQNR: no error at all); with the masks not shared they would differ."""
    rows = _fidelity("fp32", dropout=0.3)
    assert len(rows) > 10 and "encoder.0.ffn.0.weight" in rows
    assert all(r["sqnr_db"] is None and r["cosine"] == pytest.approx(1.0) for r in rows.values())


def test_gradient_fidelity_measures_ibm4s_error():
    rows = _fidelity("ibm4", dropout=0.0)
    inner = _inner_weights(rows)
    assert inner and all(0 < r["sqnr_db"] < 40 and 0 < r["cosine"] < 1 for r in inner)
    linears = [r for r in inner if r["ndim"] == 2]  # (the norms have no coherence)
    assert linears and all(1 < r["coherence"] < 4 * 6 for r in linears)  # 4 sentences of 6 tokens
    assert rows["embed.weight"]["coherence"] is None  # shared with the output projection


# a 4-bit forward whose weights round stochastically (drawing from the layer's generator)
# and whose gradients stay float32
W4A4_FP32_GRADS = Recipe(
    "w4a4", LayerSpec(OperandSpec("int4", "sawb", rounding="stochastic"), OperandSpec("uint4", "pact"))
)


def test_own_forward_reference_is_exact_where_gradients_are_not_quantized():
    """Against the recipe's own forward with float32 gradients, a recipe that quantizes no
    gradient has no gradient error at all, over steps that move the weights and PACT clips,
    with dropout on and stochastic rounding in the forward (the copy draws what the model
    draws); against fp32 the same gradients are far off (the 4-bit forward's effect)."""
    own = _fidelity(W4A4_FP32_GRADS, dropout=0.3, reference="own-forward", steps=3)
    assert len(own) > 10 and "encoder.0.attn.qkv.weight" in own
    assert all(r["sqnr_db"] is None and r["cosine"] == pytest.approx(1.0) for r in own.values())
    assert any(".pact_a." in name for name in own)  # the clips' gradients too
    fp32 = _inner_weights(_fidelity(W4A4_FP32_GRADS, dropout=0.3, reference="fp32", steps=3))
    assert fp32 and all(r["sqnr_db"] < 30 for r in fp32)


@pytest.mark.parametrize(
    "rows, coherence",
    [([[1.0, 0.0], [2.0, 0.0]], (1 + 2) ** 2 / (1 + 4)), ([[1.0, 0.0], [0.0, 2.0]], 1.0)],
    ids=["aligned", "orthogonal"],
)
def test_gradient_coherence_by_hand(rows, coherence):
    """Two rows x_t, each with output gradient g_t = 1: dW = Σ_t x_t, and the coherence
    ‖dW‖² / Σ_t ‖x_t‖²: (1+2)² / (1+4) for parallel rows, 1 for orthogonal ones. Only the
    reference's Linear weights get one."""
    ref_model, model = nn.Linear(2, 1, bias=True), nn.Linear(2, 1, bias=True)

    class Task:
        def loss(self, m, batch):
            return m(torch.tensor(rows)).sum(), 2

    fidelity = telemetry.GradientFidelity(model, ref_model)
    fidelity.reference(Task(), None)
    Task().loss(model, None)[0].backward()
    fidelity.compare()
    got = {row["name"]: row for row in fidelity.summary()}
    assert got["weight"]["coherence"] == pytest.approx(coherence)
    assert got["bias"]["coherence"] is None


def _dw_coherence(grad_spec, rows):
    """A QLinear under a 4-bit forward and `grad_spec` gradients, `rows` rows, recorded."""
    spec = dataclasses.replace(
        W4A4_FP32_GRADS.default, grad_dx=grad_spec, grad_dw=grad_spec, gradscale="current"
    )
    layer = QLinear(32, 32, spec=spec, seed=0)
    gen = torch.Generator().manual_seed(1)
    x, dy = torch.randn(rows, 32, generator=gen), torch.randn(rows, 32, generator=gen)
    return x, dy, layer


def test_dw_coherence_of_identical_rows_is_their_number():
    """Every row the same: the gradient's terms and their rounding errors (nearest) all point
    one way, so both coherences are the number of rows."""
    x, dy, layer = _dw_coherence(OperandSpec("fp4_radix4"), 1)
    with telemetry.Recorder(layer) as rec:
        layer(x.expand(16, 32)).backward(dy.expand(16, 32))
    (probe,) = rec.layers()
    assert probe["dw_coherence"]["gradient"] == pytest.approx(16)
    assert probe["dw_coherence"]["error"] == pytest.approx(16)


@pytest.mark.parametrize("grad_spec", [LUQ_GRAD, OperandSpec("fp4_radix4")], ids=["stochastic", "nearest"])
def test_dw_coherence_of_stochastic_rounding_errors_is_near_1(grad_spec):
    """Stochastic rounding's errors are independent from row to row: coherence ~1, where the
    rows of a gradient with a common direction add up (here a shared mean of dY). Rounded to
    nearest, the errors of similar values are alike and add up too."""
    x, dy, layer = _dw_coherence(grad_spec, 512)
    with telemetry.Recorder(layer) as rec:
        for rec.step in range(2):  # two steps, pooled: 2 x 32 x 32 sums of 512 terms
            layer(x + 1.0).backward(dy + 1.0)
    (probe,) = rec.layers()
    assert probe["dw_coherence"]["gradient"] > 50
    if grad_spec.rounding == "stochastic":
        assert 0.9 < probe["dw_coherence"]["error"] < 1.1
    else:
        assert probe["dw_coherence"]["error"] > 3


def test_an_unknown_gradient_reference_is_named_before_anything_runs():
    with pytest.raises(ValueError, match="unknown gradient reference 'fp64'; known: fp32, own-forward"):
        telemetry.inspect("fashion-resnet20", ["ibm4"], data_dir="/nonexistent", reference="fp64")


def test_own_forward_reference_isolates_the_gradient_quantizer():
    """ibm4's 4-bit forward with fp16 gradients: against fp32 the forward's effect dominates;
    against its own forward only fp16's rounding of the gradients is left (far smaller)."""
    fp32 = _inner_weights(_fidelity("ibm4-fp16grad", dropout=0.0, reference="fp32"))
    own = _inner_weights(_fidelity("ibm4-fp16grad", dropout=0.0, reference="own-forward"))
    assert max(r["sqnr_db"] for r in fp32) < 30 < 50 < min(r["sqnr_db"] for r in own)
    ibm4 = _inner_weights(_fidelity("ibm4", dropout=0.0, reference="own-forward"))
    assert all(0 < r["sqnr_db"] < 40 for r in ibm4)  # ibm4's radix-4 gradients: far coarser
    acc16 = _inner_weights(_fidelity("ibm4-fp16acc", dropout=0.0, reference="own-forward"))
    assert all(0 < r["sqnr_db"] < 40 for r in acc16)  # (fp16 accumulation on GradScale'd gradients)


def test_own_forward_reference_computes_the_models_forward_step_after_step():
    """Stochastic rounding in the forward and in the gradients (which draw from the same
    layer generator): the copy's loss is the model's at every step, so its forward drew
    what the model's did, though only the model's backward drew gradient noise."""
    luq = {"grad_dx": LUQ_GRAD, "grad_dw": LUQ_GRAD, "gradscale": "current"}
    spec = dataclasses.replace(W4A4_FP32_GRADS.default, **luq)
    losses = []
    rows = _fidelity(Recipe("w4a4-luq", spec), dropout=0.3, reference="own-forward", steps=3, losses=losses)
    assert len(losses) == 3 and all(model == ref for model, ref in losses)
    assert all(0 < r["sqnr_db"] < 40 for r in _inner_weights(rows))


def test_gradient_fidelity_numbers_by_hand():
    """g_ref = (3, 4); the recipe's g = (3, 0): SQNR 10·log10(25 / 16), cosine 9 / (5·3)."""
    ref_model, model = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)

    class Task:
        def loss(self, m, batch):
            return (m.weight * torch.tensor([[3.0, 4.0]])).sum(), 1

    fidelity = telemetry.GradientFidelity(model, ref_model)
    fidelity.reference(Task(), None)
    model.weight.grad = torch.tensor([[3.0, 0.0]])
    fidelity.compare()
    (row,) = fidelity.summary()
    assert row["name"] == "weight" and row["ndim"] == 2
    assert row["sqnr_db"] == pytest.approx(10 * math.log10(25 / 16))
    assert row["cosine"] == pytest.approx(9 / 15)

    model.weight.grad, ref_model.weight.grad = torch.tensor([[1.0, 0.0]]), None
    fidelity = telemetry.GradientFidelity(model, ref_model)  # a reference gradient of exactly 0
    fidelity.reference_grads = [torch.zeros(1, 2)]
    fidelity.compare()
    (row,) = fidelity.summary()
    assert row["sqnr_db"] is None and row["cosine"] is None  # null cosine: not "exact"
    line = telemetry._fidelity_line([row], "fp32")
    assert line.endswith("exact for 0 of 1 weight tensors; 1 with a zero reference gradient")


def test_cli_evaluate_runs_trained_weights_under_other_forwards(tmp_path, capsys):
    """`fourbit evaluate`: the run's own forward gives back its last evaluation exactly; an
    fp32 forward is the plain model with the trained weights (loaded here by hand); a layer
    moved to a recipe the run did not train it with starts that recipe's quantizer state."""
    data = _tiny_fashion(tmp_path / "data")
    run = tmp_path / "ibm4"
    train(RunConfig("fashion-resnet20", "ibm4", epochs=1, batch_size=48, seed=1, data_dir=str(data)), run,
          progress=False)  # fmt: skip
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    out = tmp_path / "evaluate.json"
    argv = ["evaluate", str(run), "--as", "own", "--as", "fp32", "--as", "own:stem.0=ibm4,fc=fp32",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "own:stem.0=ibm4,fc=fp32" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert (result["format"], result["trained_recipe"], result["metric_name"]) == (
        "fourbit-evaluate",
        "ibm4",
        "accuracy",
    )
    own, fp32, moved = result["results"]
    assert own["metrics"] == {"accuracy": last["accuracy"], "test_loss": last["test_loss"]}
    assert own["fresh_quantizer_state"] == [] and fp32["fresh_quantizer_state"] == []

    task = fourbit.tasks.get("fashion-resnet20")
    model = task.build_model()
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    model.load_state_dict({k: v for k, v in state.items() if "quant" not in k.split(".")})
    model.eval()
    loader = torch.utils.data.DataLoader(
        task.dataset("test", data, None, 1), batch_size=48, collate_fn=task.collate
    )
    assert fp32["metrics"] == task.evaluate(model, loader) != own["metrics"]

    assert (moved["recipe"], moved["policy"]) == ("ibm4", {"stem.0": "ibm4", "fc": "fp32"})
    assert moved["fresh_quantizer_state"] == ["stem.0.quant.pact_a.alpha", "stem.0.quant.pact_a.signed"]
    assert moved["metrics"] != own["metrics"]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))

    bad = [("own:fc", "write RECIPE or RECIPE:GLOB=RECIPE"), ("int3", "unknown recipe 'int3'"),
           ("own:fc=int3", "unknown recipe 'int3'")]  # fmt: skip
    for forward, message in bad:
        assert main(["evaluate", str(run), "--as", forward]) == 2
        assert message in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err

    assert main([*argv[:-2], "--recalibrate", "1", "--json", str(out)]) == 0
    recal = json.loads(out.read_text())
    assert recal["recalibrate_batches"] == 1
    assert all(
        r["metrics"] != before["metrics"]
        for r, before in zip(recal["results"], result["results"], strict=True)
    )
    assert main(["evaluate", str(run), "--recalibrate", "-1"]) == 2
    assert "recalibrate must be a number of batches >= 0" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--bootstrap", "-1"]) == 2
    assert "resamples must be a number of bootstrap draws >= 0" in capsys.readouterr().err


def test_cli_evaluate_bootstraps_differences_to_the_first_forward_or_a_baseline_run(tmp_path, capsys):
    """Every forward's metric gets a bootstrap interval over the test images; its difference
    is to the first forward, or with --baseline to another run scored on the same images."""
    data = _tiny_fashion(tmp_path / "data")
    run, base = tmp_path / "ibm4", tmp_path / "fp32"
    for recipe, folder in (("ibm4", run), ("fp32", base)):
        cfg = RunConfig("fashion-resnet20", recipe, epochs=1, batch_size=48, seed=1, data_dir=str(data))
        train(cfg, folder, progress=False)
    out = tmp_path / "evaluate.json"
    assert main(["evaluate", str(run), "--bootstrap", "300", "--json", str(out)]) == 0
    own, fp32 = json.loads(out.read_text())["results"]
    for row in (own, fp32):
        b, accuracy = row["bootstrap"], row["metrics"]["accuracy"]
        assert b["value"] == accuracy and b["low"] < accuracy < b["high"] and b["resamples"] == 300
    assert "delta" not in own["bootstrap"]
    assert fp32["bootstrap"]["delta"] == pytest.approx(
        fp32["metrics"]["accuracy"] - own["metrics"]["accuracy"]
    )
    assert fp32["bootstrap"]["delta_low"] <= fp32["bootstrap"]["delta"] <= fp32["bootstrap"]["delta_high"]
    assert "Δ" in capsys.readouterr().out

    assert main(["evaluate", str(run), "--as", "own", "--baseline", str(base), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    baseline, (own,) = result["baseline"], result["results"]
    last = json.loads((base / "metrics.jsonl").read_text().splitlines()[-1])
    assert (baseline["recipe"], baseline["run"]) == ("fp32", str(base))
    assert baseline["metrics"] == {"accuracy": last["accuracy"], "test_loss": last["test_loss"]}
    assert own["bootstrap"]["delta"] == pytest.approx(own["metrics"]["accuracy"] - last["accuracy"])
    assert "baseline fp32" in capsys.readouterr().out

    assert main(["evaluate", str(run), "--bootstrap", "0", "--json", str(out)]) == 0
    assert all("bootstrap" not in row for row in json.loads(out.read_text())["results"])

    other = tmp_path / "speech"
    other.mkdir()
    ckpt = torch.load(base / "checkpoint.pt", weights_only=True)
    ckpt["config"]["task"] = "speech-bilstm"
    torch.save(ckpt, other / "checkpoint.pt")
    assert main(["evaluate", str(run), "--baseline", str(other)]) == 2
    assert "is a speech-bilstm run" in capsys.readouterr().err


def test_recalibrated_batchnorm_holds_the_mean_of_its_batches_statistics():
    """Each BatchNorm ends with the plain average, over the batches, of its input's per-channel
    mean and unbiased variance under the forward the model has (taken here by hooks), its
    momentum restored and the model in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2),
                          nn.BatchNorm1d(2))  # fmt: skip
    fourbit.convert(model, "ibm4", verbose=False)
    batches = [torch.randn(5, 1, 6, 6) * (i + 1) + i for i in range(3)]
    # what each BatchNorm sees: the other layers in eval mode, the norms normalizing by their
    # batch's statistics (which is what a norm in train mode does)
    copy_ = copy.deepcopy(model).eval()
    seen = {1: [], 5: []}
    for i in seen:
        copy_[i].train()
        copy_[i].register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().double()))
    with torch.no_grad():
        for x in batches:
            copy_(x)

    class Task:
        def loss(self, m, x):
            return m(x).sum(), len(x)

    assert telemetry.recalibrate_batchnorm(model, Task(), batches) == 3
    assert not model.training and model[1].momentum == model[5].momentum == 0.1
    for i, dims in ((1, (0, 2, 3)), (5, (0,))):
        mean = torch.stack([x.mean(dims) for x in seen[i]]).mean(0)
        var = torch.stack([x.var(dims, unbiased=True) for x in seen[i]]).mean(0)
        assert torch.allclose(model[i].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(model[i].running_var.double(), var, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no BatchNorm"):
        telemetry.recalibrate_batchnorm(nn.Linear(2, 2), Task(), batches)
