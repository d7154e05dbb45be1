"""The one training loop: any task, any recipe, resumable, bit-reproducible.

Everything random comes from seeded generators: model init from `seed`, each epoch's data
order and augmentation from (seed, epoch), each layer's stochastic rounding from its own
generator (in the model's state_dict), dropout from torch's global RNG (checkpointed).
So a run resumed from a checkpoint ends with exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fourbit import recipes, tasks
from fourbit.convert import convert
from fourbit.io import atomic_write

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class RunConfig:
    """One training run. None means the task's default."""

    task: str
    recipe: str
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    data_dir: str | None = None

    def __post_init__(self):
        tasks.get(self.task)  # ValueErrors listing the known names
        recipes.get(self.recipe)
        for name in ("epochs", "batch_size", "train_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr!r}")

    def resolved(self, task: tasks.Task) -> RunConfig:
        d = task.defaults
        return dataclasses.replace(
            self,
            epochs=self.epochs or d.epochs,
            batch_size=self.batch_size or d.batch_size,
            lr=self.lr or d.lr,
        )


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + stream)


def _optimizer(task: tasks.Task, model, cfg: RunConfig, total_steps: int):
    d = task.defaults
    if d.optimizer == "adam":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=d.weight_decay)
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=d.weight_decay
        )
    warmup = int(d.warmup * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if d.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by `train`, loaded with weights_only=True; clear errors otherwise."""
    try:
        ckpt = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"no checkpoint at {path}") from None
    except Exception as e:  # torch raises many types for truncated / foreign files
        raise ValueError(f"{path} is not a readable fourbit checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "fourbit-checkpoint":
        raise ValueError(f"{path} is not a fourbit checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        version = ckpt.get("version")
        raise ValueError(f"{path} has checkpoint version {version}; this fourbit reads {CHECKPOINT_VERSION}")
    return ckpt


def train(cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train, evaluate each epoch, checkpoint each epoch; returns (and writes) summary.json."""
    out = Path(out)
    task = tasks.get(cfg.task)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    status = task.data_status(data_dir)
    if status is not None:
        raise ValueError(status)
    cfg = cfg.resolved(task)
    train_set = task.dataset("train", data_dir, cfg.train_limit, cfg.seed)
    test_set = task.dataset("test", data_dir, cfg.test_limit, cfg.seed)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)

    torch.manual_seed(cfg.seed)
    model = task.build_model()
    example = task.collate([train_set[i] for i in range(min(2, len(train_set)))])
    convert(model, cfg.recipe, example_input=task.model_inputs(example), seed=cfg.seed, verbose=progress)
    opt, sched = _optimizer(task, model, cfg, cfg.epochs * steps_per_epoch)

    history: list[dict] = []
    start_epoch, wall_before = 0, 0.0
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["config"] != dataclasses.asdict(cfg):
            theirs = {k: v for k, v in ckpt["config"].items() if dataclasses.asdict(cfg).get(k) != v}
            raise ValueError(f"{ckpt_path} is from a different run (differs in {theirs}); use another --out")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        history, start_epoch, wall_before = ckpt["history"], ckpt["epoch"], ckpt["wall_time_s"]

    test_loader = DataLoader(test_set, batch_size=cfg.batch_size, collate_fn=task.collate)
    t_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = torch.randperm(len(train_set), generator=_epoch_generator(cfg.seed, epoch, 0)).tolist()
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=order, collate_fn=task.collate)
        aug = _epoch_generator(cfg.seed, epoch, 1)
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        bar = tqdm(
            loader, desc=f"{cfg.task} {cfg.recipe} epoch {epoch + 1}/{cfg.epochs}", disable=not progress
        )
        for batch in bar:
            loss, n = task.loss(model, task.augment(batch, aug))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += n
            loss_sum += loss.item() * n
            bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{seen / (time.perf_counter() - t0):.0f}")
        train_time = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            metrics = task.evaluate(model, test_loader)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            **metrics,
            "lr": sched.get_last_lr()[0],
            "epoch_time_s": train_time,
            "samples_per_s": seen / train_time,
        }
        history.append(record)
        if progress:
            value = metrics[task.metric_name]
            tqdm.write(
                f"epoch {epoch + 1}: {task.metric_name} {value:.3f}, train loss {record['train_loss']:.4f}"
            )
        wall = wall_before + time.perf_counter() - t_start
        _write_json_lines(out / "metrics.jsonl", history)
        checkpoint = {
            "format": "fourbit-checkpoint",
            "version": CHECKPOINT_VERSION,
            "config": dataclasses.asdict(cfg),
            "epoch": epoch + 1,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": history,
            "wall_time_s": wall,
        }
        atomic_write(ckpt_path, lambda tmp, c=checkpoint: torch.save(c, tmp))

    wall = wall_before + time.perf_counter() - t_start
    final = history[-1] if history else {}
    summary = {
        "task": cfg.task,
        "recipe": cfg.recipe,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "train_limit": cfg.train_limit,
        "test_limit": cfg.test_limit,
        "metric_name": task.metric_name,
        "metric": final.get(task.metric_name),
        "higher_is_better": task.higher_is_better,
        "wall_time_s": wall,
        "samples_per_s": sum(h["samples_per_s"] for h in history) / max(len(history), 1),
        "epoch_time_s": sum(h["epoch_time_s"] for h in history) / max(len(history), 1),
        "peak_rss_mb": _peak_rss_mb(),
        "final": final,
    }
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    from fourbit.plots import plot_curves

    plot_curves({cfg.recipe: history}, task.metric_name, out / "curves.png")
    return summary


def _write_json_lines(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))
