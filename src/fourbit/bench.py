"""`fourbit bench`: what 4-bit emulation costs, as ratios against fp32 measured in the same run.

- steps:      training-step time of each recipe / fp32, interleaved (fp32, recipe, fp32,
              recipe, ...) so drifting machine load hits both alike; median after warm-up;
- quantizers: GB/s (input read + output written) of every format's quantize on a 16M-element
              tensor, next to torch.clone of the same tensor;
- saved:      bytes autograd saves for backward in one training step, / fp32's.
Inputs are synthetic batches of each task's real shape (`Task.synthetic_batch`).
"""

from __future__ import annotations

import copy
import resource
import statistics
import time

import torch

from fourbit import formats, tasks
from fourbit.convert import convert

# (task, batch size, sequence length) of the benchmark steps
STEP_SHAPES = {
    "fashion-resnet20": (128, None),
    "speech-bilstm": (32, 100),
    "translate-transformer": (32, 64),
}


def _models(task: tasks.Task, batch, recipes: list[str], seed: int = 0) -> dict:
    torch.manual_seed(seed)
    base = task.build_model()
    models = {}
    for recipe in recipes:
        m = convert(
            copy.deepcopy(base), recipe, example_input=task.model_inputs(batch), seed=seed, verbose=False
        )
        models[recipe] = (m, torch.optim.SGD(m.parameters(), lr=1e-3))
    return models


def _step(task: tasks.Task, model, opt, batch) -> float:
    t0 = time.perf_counter()
    loss, _ = task.loss(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def bench_steps(task_name: str, recipes: list[str], steps: int = 10, warmup: int = 2) -> list[dict]:
    """ms per training step and the ratio to fp32, for each recipe (fp32 added first)."""
    task = tasks.get(task_name)
    batch_size, length = STEP_SHAPES[task_name]
    batch = task.synthetic_batch(batch_size, length, torch.Generator().manual_seed(0))
    names = ["fp32"] + [r for r in recipes if r != "fp32"]
    models = _models(task, batch, names)
    times: dict[str, list[float]] = {r: [] for r in names}
    for i in range(warmup + steps):
        for recipe in names:  # interleaved: fp32, recipe, fp32, recipe, ...
            model, opt = models[recipe]
            t = _step(task, model, opt, batch)
            if i >= warmup:
                times[recipe].append(t)
    base = statistics.median(times["fp32"])
    return [
        {
            "task": task_name,
            "recipe": r,
            "ms_per_step": 1e3 * statistics.median(times[r]),
            "ratio_vs_fp32": statistics.median(times[r]) / base,
        }
        for r in names
    ]


def bench_saved(task_name: str, recipes: list[str]) -> list[dict]:
    """Bytes packed by saved_tensors_hooks during one forward, and the ratio to fp32."""
    task = tasks.get(task_name)
    batch_size, length = STEP_SHAPES[task_name]
    batch = task.synthetic_batch(batch_size, length, torch.Generator().manual_seed(0))
    names = ["fp32"] + [r for r in recipes if r != "fp32"]
    models = _models(task, batch, names)
    saved = {}
    for recipe in names:
        model, _ = models[recipe]
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = task.loss(model, batch)
        loss.backward()
        saved[recipe] = total
    return [
        {"task": task_name, "recipe": r, "bytes": saved[r], "ratio_vs_fp32": saved[r] / saved["fp32"]}
        for r in names
    ]


def bench_quantizers(numel: int = 16 * 2**20, repeats: int = 5) -> list[dict]:
    """GB/s of each format's quantize (read + write) next to torch.clone, interleaved; the
    tensor is a matrix of 4096-wide rows (block formats block along rows, or in 16x16 tiles)."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 0.1
    x = x.reshape(-1, 4096) if numel % 4096 == 0 else x
    gbytes = 2 * x.numel() * x.element_size() / 1e9
    rows = []
    for name in formats.names():
        fmt = formats.get(name)
        fmt.quantize(x[:4096])  # warm-up
        q_times, c_times = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.clone()
            t1 = time.perf_counter()
            fmt.quantize(x)
            t2 = time.perf_counter()
            c_times.append(t1 - t0)
            q_times.append(t2 - t1)
        q, c = gbytes / statistics.median(q_times), gbytes / statistics.median(c_times)
        rows.append({"format": name, "gb_per_s": q, "clone_gb_per_s": c, "ratio_vs_clone": q / c})
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(task_names: list[str], recipes: list[str], steps: int, numel: int) -> dict:
    result = {"steps": [], "quantizers": [], "saved": []}
    for name in task_names:
        result["steps"] += bench_steps(name, recipes, steps)
        result["saved"] += bench_saved(name, recipes)
    result["quantizers"] = bench_quantizers(numel)
    result["peak_rss_mb"] = peak_rss_mb()
    result["torch_threads"] = torch.get_num_threads()
    return result


def format_report(result: dict) -> str:
    lines = [f"{'task':<24}{'recipe':<18}{'ms/step':>10}{'vs fp32':>9}{'saved vs fp32':>15}"]
    saved = {(r["task"], r["recipe"]): r["ratio_vs_fp32"] for r in result["saved"]}
    for r in result["steps"]:
        s = saved.get((r["task"], r["recipe"]), float("nan"))
        lines.append(
            f"{r['task']:<24}{r['recipe']:<18}{r['ms_per_step']:>10.1f}{r['ratio_vs_fp32']:>8.2f}×{s:>14.2f}×"
        )
    lines.append("")
    lines.append(f"{'format':<14}{'GB/s':>8}{'clone GB/s':>12}{'vs clone':>10}")
    for r in result["quantizers"]:
        lines.append(
            f"{r['format']:<14}{r['gb_per_s']:>8.2f}{r['clone_gb_per_s']:>12.2f}{r['ratio_vs_clone']:>9.0%}"
        )
    lines.append(f"\npeak RSS {result['peak_rss_mb']:.0f} MB, {result['torch_threads']} torch threads")
    return "\n".join(lines)
