"""`fourbit bench` on a tiny configuration: the JSON has the three documented lists."""

import json

import torch

from fourbit import tasks
from fourbit.bench import STEP_SHAPES
from fourbit.cli import main


def test_every_benchmarked_task_has_a_synthetic_batch():
    for name, (_, length) in STEP_SHAPES.items():
        task = tasks.get(name)
        batch = task.synthetic_batch(2, 8 if length else None, torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        loss, n = task.loss(task.build_model(), batch)
        assert n == 2 and torch.isfinite(loss)


def test_bench_writes_steps_quantizers_and_saved(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--tasks", "fashion-resnet20", "--recipes", "ibm4", "--steps", "1", "--numel", "4096",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert [(r["task"], r["recipe"]) for r in result["steps"]] == [
        ("fashion-resnet20", "fp32"),
        ("fashion-resnet20", "ibm4"),
    ]
    assert result["steps"][0]["ratio_vs_fp32"] == 1.0 and result["steps"][1]["ms_per_step"] > 0
    assert {r["format"] for r in result["quantizers"]} >= {"int4", "fp4_radix4", "mxfp4", "nvfp4"}
    assert all(r["gb_per_s"] > 0 and r["clone_gb_per_s"] > 0 for r in result["quantizers"])
    saved = {r["recipe"]: r["ratio_vs_fp32"] for r in result["saved"]}
    assert saved["fp32"] == 1.0 and 0 < saved["ibm4"] < 1
    assert "fp4_radix4" in capsys.readouterr().out
