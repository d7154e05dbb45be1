"""`fourbit train` on two gloo processes: started by `--nproc 2` and by torchrun, with DDP's
fp32 all-reduce and the FP4 exchange; ranks identical, metrics reduced, one writer, skips
and stops agreed by every rank, resume bit-identical."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fourbit.train as train_module
from fourbit import distributed, tasks
from fourbit.cli import main
from fourbit.tasks.vision import FashionResNet20
from fourbit.train import RunConfig, load_checkpoint, train

from .test_train_cli import _tiny_fashion

STEPS_PER_EPOCH = 6  # 96 tiny images, batch 16: 8 per rank


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _tiny_fashion(tmp_path_factory.mktemp("data"))


def _config(data, **changes) -> RunConfig:
    cfg = RunConfig("fashion-resnet20", "ibm4", epochs=2, batch_size=16, seed=1, data_dir=str(data), nproc=2)
    return dataclasses.replace(cfg, **changes)


def _rank_run(cfg: RunConfig, out: Path, nan_loss_at_step: int | None = None) -> dict:
    """`train` on this rank of a `distributed.launch` (this process is the test's own
    child, patched freely): its summary, final parameters and optimizer state, the files
    it wrote; with `nan_loss_at_step`, rank 1's loss at that step is NaN."""
    torch.set_num_threads(1)  # as the CLI's processes below: the same sums
    written, kept = [], {}
    real_write, real_summary = train_module.atomic_write, train_module._Run.write_summary

    def recording_write(path, write):
        written.append(Path(path).name)
        return real_write(path, write)

    def keeping_summary(run):
        kept["params"] = {name: p.detach().clone() for name, p in run.model.named_parameters()}
        kept["optimizer"] = run.opt.state_dict()
        return real_summary(run)

    train_module.atomic_write, train_module._Run.write_summary = recording_write, keeping_summary
    if nan_loss_at_step is not None and distributed.rank() == 1:
        real_loss, calls = FashionResNet20.loss, [0]

        def poisoned(self, model, batch):
            loss, n = real_loss(self, model, batch)
            calls[0] += 1  # (the rerun that looks for the bad layer is call step + 1)
            return (loss * float("nan") if calls[0] == nan_loss_at_step else loss), n

        FashionResNet20.loss = poisoned
    summary = train(cfg, out, progress=False)
    return {"summary": summary, "written": written, **kept}


@pytest.fixture(scope="module")
def fp4_run(data, tmp_path_factory):
    """Two ranks, FP4 gradient exchange, never interrupted."""
    out = tmp_path_factory.mktemp("fp4")
    return out, distributed.launch(2, _rank_run, _config(data, grad_comm="fp4"), out)


def _strip_times(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows]


def _assert_ranks_identical(ranks: list[dict]) -> None:
    first, second = ranks
    assert first["params"].keys() == second["params"].keys()
    for name, p in first["params"].items():
        assert torch.equal(p, second["params"][name]), name
    for a, b in zip(first["optimizer"]["state"].values(), second["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_two_ranks_end_bit_identical_and_trained(fp4_run):
    _, ranks = fp4_run
    _assert_ranks_identical(ranks)
    torch.manual_seed(1)
    start = dict(tasks.get("fashion-resnet20").build_model().named_parameters())
    for name, p in start.items():
        assert not torch.equal(ranks[0]["params"][name], p.detach()), name


def test_only_rank_0_writes_and_metrics_cover_both_shards(fp4_run):
    out, ranks = fp4_run
    # each epoch the test counts, metrics.jsonl and a checkpoint, then summary.json (curves.png
    # is plotted)
    assert ranks[0]["written"] == ["test_counts.pt", "metrics.jsonl", "checkpoint.pt"] * 2 + ["summary.json"]
    assert ranks[1]["written"] == []
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_examples"] for r in lines] == [96, 96]  # both ranks' 48 each
    assert [r["skipped_steps"] for r in lines] == [0, 0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nproc"] == 2 and summary["grad_comm"] == "fp4"
    assert ranks[1]["summary"]["metric"] == ranks[0]["summary"]["metric"] == summary["metric"]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    residuals = [r["grad_comm"]["residuals"]["sent"]["fc.weight"] for r in ckpt["ranks"]]
    assert len(residuals) == 2 and not torch.equal(*residuals)  # each rank's own error feedback


def test_fp4_exchange_reports_its_bytes(fp4_run):
    out, ranks = fp4_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    numel = sum(p.numel() for p in ranks[0]["params"].values())
    shard = 2 * -(-numel // 4)  # one rank's half of the single bucket, rounded to whole bytes
    per_step = 2 * (shard // 2 + -(-shard // 256))  # codes and scale bytes, there and back
    sent = [r["grad_bytes_sent_per_rank"] for r in lines]
    assert sent == [STEPS_PER_EPOCH * per_step, 2 * STEPS_PER_EPOCH * per_step]
    assert summary["grad_bytes_sent_per_rank"] == sent[-1]
    fp32 = 2 * STEPS_PER_EPOCH * distributed.ring_allreduce_bytes(numel, 2)
    assert summary["grad_bytes_ratio"] == sent[-1] / fp32
    assert 0.12 < summary["grad_bytes_ratio"] < 1 / 7  # measured 0.126


def test_a_nan_loss_on_one_rank_skips_the_step_on_both(data, tmp_path, capfd):
    out = tmp_path / "run"
    ranks = distributed.launch(2, _rank_run, _config(data, epochs=1), out, 1)
    _assert_ranks_identical(ranks)  # rank 0 skipped too: it would have stepped without rank 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["skipped_steps"] == 1 and lines[0]["train_examples"] == 96
    err = capfd.readouterr().err
    assert "epoch 1, step 1: skipped: rank 1: loss is nan; the first non-finite output" in err
    assert err.count("skipped:") == 1  # printed by rank 0 only


def test_a_checkpoint_from_another_number_of_processes_is_refused(data, fp4_run, tmp_path, capsys):
    out = tmp_path / "one"
    train(dataclasses.replace(_config(data), nproc=1, epochs=1), out, progress=False)
    argv = ["train", "--task", "fashion-resnet20", "--recipe", "ibm4", "--epochs", "1", "--batch-size", "16",
            "--seed", "1", "--data-dir", str(data), "--out", str(out), "--quiet", "--resume"]  # fmt: skip
    assert main([*argv, "--nproc", "2"]) == 2  # refused before any process starts
    assert (
        f"{out / 'checkpoint.pt'} is from a run on 1 process(es), not 2: each process's data shard and "
        "random states are in it; resume with the same --nproc or use another --out"
    ) in capsys.readouterr().err
    two, _ = fp4_run
    argv[argv.index(str(out))] = str(two)
    assert main([*argv, "--epochs", "2"]) == 2
    assert "is from a run on 2 process(es), not 1" in capsys.readouterr().err


def test_config_checks(data, monkeypatch):
    with pytest.raises(ValueError, match="grad_comm 'fp4' needs nproc >= 2"):
        RunConfig("fashion-resnet20", "ibm4", grad_comm="fp4")
    with pytest.raises(ValueError, match="nproc must be a positive integer"):
        RunConfig("fashion-resnet20", "ibm4", nproc=0)
    with pytest.raises(ValueError, match="grad_comm must be 'fp32' or 'fp4'"):
        RunConfig("fashion-resnet20", "ibm4", nproc=2, grad_comm="int8")
    with pytest.raises(ValueError, match="nproc is 2, but this process group has 3 processes"):
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        train(_config(data), Path("unused"))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # each rank checks the split
    with pytest.raises(ValueError, match="batch size 15 does not split evenly between 2 processes"):
        train_module._Run(_config(data, batch_size=15), Path("unused"), progress=False)


def _cli(data, out, *extra) -> list[str]:
    return ["train", "--task", "fashion-resnet20", "--recipe", "ibm4", "--epochs", "2", "--batch-size", "16",
            "--seed", "1", "--data-dir", str(data), "--out", str(out), "--quiet", "--grad-comm", "fp4",
            *extra]  # fmt: skip


def test_sigterm_on_two_processes_then_resume_under_torchrun_ends_as_the_uninterrupted_run(
    data, tmp_path, fp4_run
):
    """SIGTERM to the process `--nproc 2` started: both ranks stop at the same step with one
    checkpoint; `torchrun ... -m fourbit train --resume` ends bit-identical to `fp4_run`."""
    out, env = tmp_path / "run", {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fourbit", *_cli(data, out, "--nproc", "2", "--checkpoint-every", "1")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    path, deadline = out / "checkpoint.pt", time.monotonic() + 240
    while not path.exists():  # the first step's checkpoint: the ranks are in the loop
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # to the launching process only: it passes it on
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    p = load_checkpoint(path)["progress"]
    assert f"fourbit: stopped by SIGTERM at epoch {p['epoch'] + 1}, step {p['step']}/6" in err
    assert 0 < p["epoch"] * STEPS_PER_EPOCH + p["step"] < 2 * STEPS_PER_EPOCH  # stopped mid-run

    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2"]
    resumed = subprocess.run(
        [*torchrun, "-m", "fourbit", *_cli(data, out, "--resume")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("fashion-resnet20 ibm4: accuracy") == 1  # rank 0 prints
    whole, _ = fp4_run
    mine, theirs = load_checkpoint(path), load_checkpoint(whole / "checkpoint.pt")
    for key, t in theirs["model"].items():
        assert torch.equal(mine["model"][key], t), key
    for a, b in zip(mine["optimizer"]["state"].values(), theirs["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    for a, b in zip(mine["ranks"], theirs["ranks"], strict=True):
        for name, t in b["grad_comm"]["residuals"]["mean"].items():
            assert torch.equal(a["grad_comm"]["residuals"]["mean"][name], t), name
    assert _strip_times(out / "metrics.jsonl") == _strip_times(whole / "metrics.jsonl")
