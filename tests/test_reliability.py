"""Runs that go wrong: non-finite steps skipped and counted, runs killed and resumed
bit for bit, signals, and checkpoints that must be refused."""

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import fourbit.train as train_module
from fourbit import tasks
from fourbit.cli import main
from fourbit.tasks.vision import FashionResNet20
from fourbit.train import CHECKPOINT_VERSION, RunConfig, RunStopped, check_same_run, load_checkpoint, train

from .test_train_cli import _tiny_fashion

STEPS_PER_EPOCH = 6  # 96 tiny images, batch 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _tiny_fashion(tmp_path_factory.mktemp("data"))


def _config(data, recipe="ibm4", **kwargs) -> RunConfig:
    return RunConfig(
        "fashion-resnet20", recipe, epochs=2, batch_size=16, seed=1, data_dir=str(data), **kwargs
    )


def _record_steps(monkeypatch) -> list[dict]:
    """After every train_step: copies of the model's state and the optimizer's state."""
    states = []
    real = train_module.train_step

    def recording(model, opt, *args):
        result = real(model, opt, *args)
        states.append({"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())})
        return result

    monkeypatch.setattr(train_module, "train_step", recording)
    return states


def _nan_gradient_into_the_stem(monkeypatch, from_step: int, to_step: int):
    """From backward `from_step` to `to_step` (1-based), the gradient that enters the stem
    conv's quantizer (the gradient of its BatchNorm's input) is NaN."""
    real = FashionResNet20.build_model
    calls = [0]

    def poisoned(self):
        model = real(self)

        def hook(module, grad_input, grad_output):
            calls[0] += 1
            if from_step <= calls[0] <= to_step:
                return (torch.full_like(grad_input[0], float("nan")),)
            return None

        model.stem[1].register_full_backward_hook(hook)
        return model

    monkeypatch.setattr(FashionResNet20, "build_model", poisoned)


def test_a_nan_gradient_skips_its_step_and_the_run_goes_on(data, tmp_path, monkeypatch, capsys):
    k = 3
    _nan_gradient_into_the_stem(monkeypatch, k, k)
    states = _record_steps(monkeypatch)
    summary = train(_config(data), tmp_path / "run", progress=False)

    assert len(states) == 2 * STEPS_PER_EPOCH  # the run went on to its end
    before, after, next_ = (states[i] for i in (k - 2, k - 1, k))  # after steps k-1, k, k+1
    for key, t in before["model"].items():
        if ".gradscale." not in key:  # parameters, BN statistics, PACT, generator states
            assert torch.equal(after["model"][key], t), key
    momentum = [s["momentum_buffer"] for s in before["opt"]["state"].values()]
    assert all(
        torch.equal(a["momentum_buffer"], m)
        for a, m in zip(after["opt"]["state"].values(), momentum, strict=True)
    )
    assert after["opt"]["param_groups"][0]["lr"] == before["opt"]["param_groups"][0]["lr"]  # scheduler too
    # the stem's GradScale counted the NaN and backed off; no other layer saw one
    assert after["model"]["stem.0.quant.gradscale.nonfinite"].item() == 1
    assert (
        after["model"]["stem.0.quant.gradscale.scale"] == before["model"]["stem.0.quant.gradscale.scale"] / 2
    )
    counters = {
        key: t.item() for key, t in states[-1]["model"].items() if key.endswith("gradscale.nonfinite")
    }
    assert sum(counters.values()) == 1 and len(counters) == 22
    # the step after trains again
    assert not torch.equal(next_["model"]["stem.0.weight"], after["model"]["stem.0.weight"])

    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in lines] == [1, 0] and summary["skipped_steps"] == 1
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in lines)
    err = capsys.readouterr().err
    assert f"epoch 1, step {k}: skipped: non-finite gradient entering the quantizer of stem.0" in err


@pytest.mark.parametrize(
    ("recipe", "layer_state"),
    [("ibm4", {"3.quant.pact_a.alpha", "3.quant.pact_a.signed"}), ("luq4", {"3.quant.rng_state"})],
)
def test_step_guard_restores_what_a_step_changes_in_place(recipe, layer_state):
    """BN statistics, PACT's first-batch alpha and signedness (ibm4), the layers' generator
    states (luq4's stochastic rounding) and the dropout RNG: restored, the same step gives
    the same output and gradients."""
    from fourbit import convert
    from fourbit.train import StepGuard

    layers = [torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 8)]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(8, 3))
    convert(model, recipe, example_input=torch.randn(2, 6), verbose=False)
    guard = StepGuard(model)
    initial = copy.deepcopy(model.state_dict())
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out, model[0].weight.grad.clone()

    snapshot = guard.snapshot()
    first = step()
    changed = {k for k, t in model.state_dict().items() if not torch.equal(t, initial[k])}
    assert {"1.running_mean", "1.num_batches_tracked"} | layer_state <= changed
    guard.restore(snapshot)
    assert all(torch.equal(t, initial[k]) for k, t in model.state_dict().items() if ".gradscale." not in k)
    second = step()
    assert torch.equal(second[0], first[0]) and torch.equal(second[1], first[1])
    third = step()  # not restored: another dropout mask
    assert not torch.equal(third[0], first[0])


def test_too_many_bad_steps_in_a_row_stop_with_a_loadable_checkpoint(data, tmp_path, monkeypatch, capsys):
    k = 2
    _nan_gradient_into_the_stem(monkeypatch, k, 100)
    states = _record_steps(monkeypatch)
    out = tmp_path / "run"
    argv = ["train", "--task", "fashion-resnet20", "--recipe", "ibm4", "--epochs", "2", "--batch-size", "16",
            "--seed", "1", "--data-dir", str(data), "--out", str(out), "--quiet",
            "--max-skipped-steps", "3"]  # fmt: skip
    assert main(argv) == train_module.EXIT_DIVERGED == 3

    err = capsys.readouterr().err
    assert (
        "3 steps in a row skipped (the last: non-finite gradient entering the quantizer of stem.0) "
        f"at epoch 1, step {k + 2}/6" in err
    )
    assert "holds the last good state" in err and "--resume" in err
    assert len(states) == k + 2  # nothing ran after the third bad step
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["progress"]["step"] == k + 2 and ckpt["progress"]["in_a_row"] == 3
    last_good = states[k - 2]["model"]
    for key, t in last_good.items():
        if ".gradscale." not in key:
            assert torch.equal(ckpt["model"][key], t), key
    assert ckpt["model"]["stem.0.quant.gradscale.nonfinite"].item() == 3


# fp32: a 3e38 weight overflows the forward; ibm4 would clip it (SAWB's float64 statistics
# stay finite), but an inf weight makes its scale, and so the layer's output, NaN
@pytest.mark.parametrize("recipe, bad", [("fp32", 3e38), ("ibm4", float("inf"))])
def test_a_forward_overflow_names_the_layer(recipe, bad, data, tmp_path, monkeypatch, capsys):
    real = train_module.train_step
    calls = [0]

    def overflow_at_step_2(model, *args):
        calls[0] += 1
        if calls[0] == 2:
            with torch.no_grad():
                model.stages[4].conv1.weight[0, 0, 0, 0] = bad  # fp32 max is 3.4e38
        return real(model, *args)

    monkeypatch.setattr(train_module, "train_step", overflow_at_step_2)
    with pytest.raises(RunStopped, match="2 steps in a row skipped") as stopped:
        train(_config(data, recipe, max_skipped_steps=2), tmp_path / "run", progress=False)
    assert stopped.value.exit_code == 3
    err = capsys.readouterr().err
    assert "epoch 1, step 2: skipped: loss is nan; the first non-finite output of the forward pass: " in err
    assert "forward pass: stages.4.conv1\n" in err  # not "(its input was not finite either)"


def _strip_times(lines: list[str]) -> list[dict]:
    rows = [json.loads(line) for line in lines]
    return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """The final checkpoint and metrics of a run never stopped."""
    out = tmp_path_factory.mktemp("whole")
    train(_config(data), out, progress=False)
    return load_checkpoint(out / "checkpoint.pt"), (out / "metrics.jsonl").read_text().splitlines()


def _assert_same_end(out, uninterrupted):
    ckpt, lines = uninterrupted
    mine = load_checkpoint(out / "checkpoint.pt")
    assert mine["model"].keys() == ckpt["model"].keys()
    for key, t in ckpt["model"].items():
        assert torch.equal(mine["model"][key], t), key
    for a, b in zip(mine["optimizer"]["state"].values(), ckpt["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert _strip_times((out / "metrics.jsonl").read_text().splitlines()) == _strip_times(lines)


def _start(data, out, *extra) -> subprocess.Popen:
    argv = ["train", "--task", "fashion-resnet20", "--recipe", "ibm4", "--epochs", "2", "--batch-size", "16",
            "--seed", "1", "--data-dir", str(data), "--out", str(out), "--quiet", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread like this test process: same sums
    return subprocess.Popen(
        [sys.executable, "-m", "fourbit", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_checkpoint(proc, path, at_least: int, timeout=120.0) -> None:
    """Until `path` holds a checkpoint at least `at_least` steps into the run."""
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.exists() and path.stat().st_mtime_ns != seen:
            seen = path.stat().st_mtime_ns
            p = load_checkpoint(path)["progress"]
            if p["epoch"] * STEPS_PER_EPOCH + p["step"] >= at_least:
                return
        time.sleep(0.005)
    raise AssertionError("no checkpoint in time")


def test_sigkill_at_a_random_step_resumes_bit_identical(data, tmp_path, uninterrupted):
    out = tmp_path / "run"
    kill_after = random.Random(5).randint(1, 2 * STEPS_PER_EPOCH - 2)
    proc = _start(data, out, "--checkpoint-every", "1")
    _wait_for_checkpoint(proc, out / "checkpoint.pt", kill_after)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    p = load_checkpoint(out / "checkpoint.pt")["progress"]
    done = p["epoch"] * STEPS_PER_EPOCH + p["step"]
    assert kill_after <= done < 2 * STEPS_PER_EPOCH  # killed mid-run
    train(_config(data), out, resume=True, progress=False)
    _assert_same_end(out, uninterrupted)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = _start(data, out, "--checkpoint-every", "4")
    _wait_for_checkpoint(proc, out / "checkpoint.pt", 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 == 128 + signal.SIGTERM
    assert "fourbit: stopped by SIGTERM at epoch " in err
    assert "to continue, run the same command with --resume" in err
    ckpt = load_checkpoint(out / "checkpoint.pt")  # saved at a step boundary, not only every 4 steps
    p = ckpt["progress"]
    assert f"epoch {p['epoch'] + 1}, step {p['step']}/6" in err
    assert 0 < p["epoch"] * STEPS_PER_EPOCH + p["step"] < 2 * STEPS_PER_EPOCH
    train(_config(data), out, resume=True, progress=False)
    _assert_same_end(out, uninterrupted)


class _Killed(Exception):
    pass


def test_resume_mid_epoch_in_process_and_a_wrong_augmentation_state_is_caught(
    data, tmp_path, monkeypatch, uninterrupted
):
    """Resumed from a mid-epoch checkpoint, the run ends as the uninterrupted one; with that
    epoch's augmentation generator state replaced, the same comparison fails."""
    real_write = train_module.atomic_write

    def die_after_step_3(path, write):
        real_write(path, write)
        if path.name == "checkpoint.pt" and load_checkpoint(path)["progress"]["step"] == 3:
            raise _Killed

    monkeypatch.setattr(train_module, "atomic_write", die_after_step_3)
    with pytest.raises(_Killed):
        train(_config(data, checkpoint_every=3), tmp_path / "good", progress=False)
    monkeypatch.setattr(train_module, "atomic_write", real_write)
    ckpt = load_checkpoint(tmp_path / "good" / "checkpoint.pt")
    assert (ckpt["progress"]["epoch"], ckpt["progress"]["step"]) == (0, 3)

    ckpt["ranks"][0]["augment_rng"] = torch.Generator().manual_seed(0).get_state()
    (tmp_path / "bad").mkdir()
    torch.save(ckpt, tmp_path / "bad" / "checkpoint.pt")
    for run in ("good", "bad"):
        train(_config(data), tmp_path / run, resume=True, progress=False)
    _assert_same_end(tmp_path / "good", uninterrupted)
    with pytest.raises(AssertionError):
        _assert_same_end(tmp_path / "bad", uninterrupted)


def test_checkpoints_that_must_be_refused(data, tmp_path, uninterrupted):
    ckpt, _ = uninterrupted
    good = tmp_path / "good.pt"
    torch.save(ckpt, good)
    assert load_checkpoint(good)["progress"]["epoch"] == 2

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated.pt is not a readable fourbit checkpoint \("):
        load_checkpoint(truncated)
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)  # a torch file, but no checkpoint of ours
    with pytest.raises(ValueError, match="weights.pt is not a fourbit checkpoint"):
        load_checkpoint(foreign)
    old = tmp_path / "old.pt"
    torch.save({**ckpt, "version": 1}, old)
    with pytest.raises(
        ValueError, match=f"old.pt has checkpoint version 1; this fourbit reads {CHECKPOINT_VERSION}"
    ):
        load_checkpoint(old)

    cfg = RunConfig(**ckpt["config"])
    check_same_run(ckpt, cfg, good)
    check_same_run(ckpt, RunConfig(**{**ckpt["config"], "checkpoint_every": 7, "max_skipped_steps": 1}), good)
    other_task = RunConfig(**{**ckpt["config"], "task": "fashion-mobilenetv2"})
    with pytest.raises(
        ValueError, match="good.pt is from another task: 'fashion-resnet20', not 'fashion-mobilenetv2'"
    ):
        check_same_run(ckpt, other_task, good)
    other_recipe = RunConfig(**{**ckpt["config"], "recipe": "luq4"})
    with pytest.raises(ValueError, match="from another recipe: 'ibm4', not 'luq4'"):
        check_same_run(ckpt, other_recipe, good)
    other_seed = RunConfig(**{**ckpt["config"], "seed": 4})
    with pytest.raises(ValueError, match=r"from a run with other settings: seed 1 \(now 4\)"):
        check_same_run(ckpt, other_seed, good)
    task = tasks.get("fashion-resnet20")
    adam = RunConfig(**{**ckpt["config"], "optimizer": "adam"}).resolved(task)
    with pytest.raises(ValueError, match=r"other settings: optimizer None \(now 'adam'\)"):
        check_same_run(ckpt, adam, good)
    # naming the task's own optimizer is the same run; a checkpoint from before the field
    # existed (no "optimizer" in its config) is one with the task's optimizer
    check_same_run(ckpt, RunConfig(**{**ckpt["config"], "optimizer": "sgd"}).resolved(task), good)
    config = dict(ckpt["config"])
    del config["optimizer"]
    check_same_run({**ckpt, "config": config}, cfg, good)


def test_run_config_checks_the_new_fields():
    for bad in (
        {"checkpoint_every": 0},
        {"max_skipped_steps": 0},
        {"checkpoint_every": 1.5},
        {"optimizer": "rmsprop"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RunConfig("fashion-resnet20", "ibm4", **bad)


def test_another_optimizer_than_the_tasks_needs_a_learning_rate_and_is_used():
    vision, translate = tasks.get("fashion-resnet20"), tasks.get("translate-transformer")
    with pytest.raises(ValueError, match=r"'adam' is not fashion-resnet20's own \('sgd'\).*--lr"):
        RunConfig("fashion-resnet20", "ibm4", optimizer="adam").resolved(vision)
    with pytest.raises(ValueError, match=r"'sgd' is not translate-transformer's own \('adam'\)"):
        RunConfig("translate-transformer", "ibm4", optimizer="sgd").resolved(translate)
    assert RunConfig("fashion-resnet20", "ibm4", optimizer="sgd").resolved(vision).optimizer is None

    model = torch.nn.Linear(3, 2)
    for optimizer, lr, kind in ((None, None, torch.optim.SGD), ("adam", 1e-3, torch.optim.AdamW)):
        cfg = RunConfig("fashion-resnet20", "ibm4", lr=lr, optimizer=optimizer).resolved(vision)
        opt, _ = train_module._optimizer(vision, model, cfg, total_steps=10)
        assert type(opt) is kind
        assert opt.defaults["lr"] == (lr or vision.defaults.lr)
