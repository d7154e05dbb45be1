"""Vision data loaders, the vision tasks, the training loop and the train/compare/tasks CLI."""

import json
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import fourbit
from fourbit import tasks
from fourbit.cli import compare_table, main
from fourbit.io import source_commit
from fourbit.tasks.idx import DataError
from fourbit.tasks.vision import load_cifar10, load_images
from fourbit.train import RunConfig, load_checkpoint, load_test_counts, train

from .test_cli import _write_idx


def _tiny_fashion(tmp_path, n_train=96, n_test=32, size=12):
    """IDX files of small images where the class is drawn in: learnable in a few steps."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, c : c + 3, :] = 255
        _write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def _write_cifar(directory, n=4):
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        (directory / name).write_bytes(pickle.dumps(batch))


def test_cifar10_pickles_and_their_errors(tmp_path):
    _write_cifar(tmp_path)
    images, labels = load_images(tmp_path, "train")
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 2, 3] * 5
    (tmp_path / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a CIFAR-10 batch"):
        load_cifar10(tmp_path, "test")
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataError, match="no data_batch_3"):
        load_cifar10(tmp_path, "train")


@pytest.mark.parametrize("name", ["fashion-resnet20", "fashion-mobilenetv2"])
@pytest.mark.parametrize("recipe", ["fp32", "ibm4"])
def test_vision_task_one_step_and_evaluation(tmp_path, name, recipe):
    task = tasks.get(name)
    data = _tiny_fashion(tmp_path, size=8)
    train_set = task.dataset("train", data, limit=8, seed=0)
    assert len(train_set) == 8
    batch = task.collate([train_set[i] for i in range(8)])
    assert batch[0].shape == (8, 1, 8, 8) and batch[0].min() >= 0 and batch[0].max() <= 1
    torch.manual_seed(0)
    model = fourbit.convert(task.build_model(), recipe, example_input=task.model_inputs(batch), verbose=False)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, n = task.loss(model, task.augment(batch, torch.Generator().manual_seed(0)))
    loss.backward()
    opt.step()
    assert n == 8 and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model, [batch])
    assert 0 <= metrics["accuracy"] <= 100 and np.isfinite(metrics["test_loss"])


def test_augment_is_a_function_of_the_generator():
    task = tasks.get("fashion-resnet20")
    images = torch.rand(8, 1, 12, 12)
    a = task.augment((images, None), torch.Generator().manual_seed(3))[0]
    b = task.augment((images, None), torch.Generator().manual_seed(3))[0]
    c = task.augment((images, None), torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    shifted = task.augment((images, None), torch.Generator())[0]
    assert bool((shifted.sum((1, 2, 3)) <= images.sum((1, 2, 3))).all())  # shifts only drop pixels


class _Killed(Exception):
    pass


def test_resume_after_a_kill_ends_with_the_uninterrupted_metrics(tmp_path, monkeypatch):
    data = _tiny_fashion(tmp_path / "data")
    cfg = RunConfig("fashion-resnet20", "ibm4", epochs=2, batch_size=32, seed=3, data_dir=str(data))
    whole = train(cfg, tmp_path / "whole", progress=False)
    whole_state = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]

    import fourbit.train as train_module

    real_write = train_module.atomic_write

    def write_then_die(path, write):
        real_write(path, write)
        if path.name == "checkpoint.pt":
            raise _Killed  # the process dies right after its first checkpoint

    monkeypatch.setattr(train_module, "atomic_write", write_then_die)
    with pytest.raises(_Killed):
        train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(train_module, "atomic_write", real_write)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["progress"]["epoch"] == 1
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)

    assert resumed["metric"] == whole["metric"]
    cut_lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    whole_lines = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    strip = [
        {k: v for k, v in json.loads(line).items() if "time" not in k and "per_s" not in k}
        for line in cut_lines
    ]
    assert strip == [
        {k: v for k, v in json.loads(line).items() if "time" not in k and "per_s" not in k}
        for line in whole_lines
    ]
    resumed_state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert all(torch.equal(resumed_state[k], whole_state[k]) for k in whole_state)
    keys = {"task", "recipe", "seed", "epochs", "train_limit", "metric_name", "metric", "higher_is_better",
            "wall_time_s", "samples_per_s", "peak_rss_mb", "torch_threads", "commits"}  # fmt: skip
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert keys <= set(summary) and summary["commits"] == [source_commit()]
    assert summary["torch_threads"] == [torch.get_num_threads()]
    assert summary["optimizer"] == "sgd"  # the task's, recorded though the config left it None
    assert (tmp_path / "cut" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_source_commit_names_this_checkout():
    checkout = Path(fourbit.__file__).parents[2]
    if not (checkout / ".git").exists():
        pytest.skip("fourbit is not running from a git checkout")
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert re.fullmatch(head.stdout.strip() + r"(\+changes)?", source_commit())


def test_resume_refuses_a_checkpoint_from_another_run(tmp_path):
    data = _tiny_fashion(tmp_path / "data")
    cfg = RunConfig("fashion-resnet20", "fp32", epochs=1, batch_size=48, data_dir=str(data))
    train(cfg, tmp_path / "run", progress=False)
    other = RunConfig("fashion-resnet20", "ibm4", epochs=1, batch_size=48, data_dir=str(data))
    with pytest.raises(ValueError, match="from another recipe: 'fp32', not 'ibm4'"):
        train(other, tmp_path / "run", resume=True, progress=False)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable fourbit checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_cli_compare_writes_table_and_plot(tmp_path, capsys):
    data = _tiny_fashion(tmp_path / "data")
    out = tmp_path / "cmp"
    argv = ["compare", "--task", "fashion-resnet20", "--recipes", "fp32,ibm4", "--epochs", "1",
            "--batch-size", "48", "--data-dir", str(data), "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    table = (out / "compare.md").read_text()
    assert "| fp32 |" in table and "| ibm4 |" in table and "+0.00" in table
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| ibm4 |" in capsys.readouterr().out

    # each run keeps its last evaluation's per-example counts; the table bootstraps them
    task = tasks.get("fashion-resnet20")
    fp32, ibm4 = (load_test_counts(out / r, 1) for r in ("fp32", "ibm4"))
    for recipe, counts in (("fp32", fp32), ("ibm4", ibm4)):
        summary = json.loads((out / recipe / "summary.json").read_text())
        assert counts.shape[1] == 2 and bool((counts[:, 1] == 1).all())  # (right, 1) per image
        assert task.metric_from_counts(counts.sum(0)) == summary["metric"]
    assert load_test_counts(out / "ibm4", 2) is None and load_test_counts(tmp_path, 1) is None
    b = tasks.bootstrap(task, ibm4, fp32)
    assert f"{b['delta']:+.2f} [{b['delta_low']:+.2f}, {b['delta_high']:+.2f}]" in table
    assert "95 % bootstrap intervals" in table
    (out / "ibm4" / "test_counts.pt").unlink()  # a run without them: a table without intervals
    assert main(argv + ["--resume"]) == 0
    assert "bootstrap" not in (out / "compare.md").read_text()


def test_curves_of_many_runs_are_told_apart(tmp_path, monkeypatch):
    # a headline of 12 recipes outruns matplotlib's 10 colours: no two lines may look alike
    from fourbit import plots

    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig) or Path(path))
    histories = {f"r{k}": [{"epoch": 1, "bleu": k, "train_loss": 1.0 + k}] for k in range(12)}
    plots.plot_curves(histories, "bleu", tmp_path / "c.png")
    (fig,) = figures
    for ax in fig.axes:
        looks = {(line.get_color(), line.get_linestyle()) for line in ax.get_lines()}
        assert len(looks) == len(ax.get_lines()) == 12
    (legend,) = fig.legends  # one legend for both panels, outside them
    assert [t.get_text() for t in legend.get_texts()] == list(histories)
    assert not any(ax.get_legend() for ax in fig.axes)


def test_compare_table_has_deltas_against_fp32_and_fp16():
    def summary(recipe, metric, epoch_time):
        return {"recipe": recipe, "metric": metric, "metric_name": "accuracy", "epoch_time_s": epoch_time}

    table = compare_table(
        [summary("fp32", 93.5, 100.0), summary("fp16", 93.25, 150.0), summary("ibm4", 92.5, 130.0)]
    )
    rows = table.splitlines()
    assert rows[0] == "| recipe | accuracy | Δ vs fp32 | Δ vs fp16 | time per epoch vs fp32 |"
    assert rows[4] == "| ibm4 | 92.50 | -1.00 | -0.75 | 1.30× |"
    two = [summary("fp32", 90.0, 1.0), summary("ibm4", 89.0, 2.0)]
    assert "Δ vs fp16" not in compare_table(two)
    assert compare_table(two, times=False).splitlines()[2:] == [
        "| fp32 | 90.00 | +0.00 |",
        "| ibm4 | 89.00 | -1.00 |",
    ]
    intervals = [{"low": 89.0, "high": 91.004}, {"low": 88.1, "high": 90.0, "delta": -1.0,
                                                 "delta_low": -1.5, "delta_high": -0.496}]  # fmt: skip
    assert compare_table(two, times=False, intervals=intervals).splitlines()[2:] == [
        "| fp32 | 90.00 [89.00, 91.00] | +0.00 |",
        "| ibm4 | 89.00 [88.10, 90.00] | -1.00 [-1.50, -0.50] |",
    ]


def test_cli_train_and_tasks(tmp_path, capsys):
    data = _tiny_fashion(tmp_path / "data")
    out = str(tmp_path / "t")
    argv = ["train", "--task", "fashion-mobilenetv2", "--recipe", "fp32", "--epochs", "1",
            "--batch-size", "48", "--data-dir", str(data), "--out", out, "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert len((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()) == 1
    assert main(["tasks"]) == 0
    assert "fashion-resnet20" in capsys.readouterr().out
    assert (
        main(["train", "--task", "fashion-resnet20", "--recipe", "int3", "--out", str(tmp_path / "x")]) == 2
    )
    assert "known recipes" in capsys.readouterr().err
