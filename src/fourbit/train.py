"""The one training loop: any task, any recipe, resumable, bit-reproducible, fault-tolerant.

Everything random comes from seeded generators: model init from `seed`, each epoch's data
order and augmentation from (seed, epoch), each layer's stochastic rounding from its own
generator (in the model's state_dict), dropout from torch's global RNG. A checkpoint (each
epoch, and every `checkpoint_every` steps) holds all of them and the position within the
epoch, so a run resumed from one, even after a SIGKILL mid-epoch, ends bit-identical to an
uninterrupted one.

A step whose loss or any gradient is not finite is skipped (`train_step`); after
`max_skipped_steps` in a row the run stops. SIGINT / SIGTERM stop it at the next step
boundary, after a checkpoint. Either way `RunStopped` says how, and how to go on.

With `nproc` > 1 the run is DistributedDataParallel on that many processes (started here,
or by torchrun): every rank builds the same model from the seed and trains on its shard of
each epoch's order with batch_size / nproc; whatever decides the run's course (skipping a
step, stopping on a signal) is agreed across ranks each step, so no rank waits forever in
a collective the others left. Rank 0 evaluates and writes every file; the checkpoint holds
what differs between ranks (random states, FP4 error-feedback residuals) for each rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fourbit import distributed, recipes, tasks
from fourbit.convert import convert
from fourbit.io import atomic_write, source_commit
from fourbit.scaling import PACT, GradScale, nonfinite_gradients
from fourbit.tasks.idx import DataError

# 2: mid-epoch position, GradScale's non-finite counter; 3: per-rank random states and
# FP4 residuals ("ranks"), nproc and grad_comm in the config
CHECKPOINT_VERSION = 3

# RunConfig fields that change how a run is looked after, not its numbers: a run may be
# resumed with other values of these
OPERATIONAL_FIELDS = ("checkpoint_every", "max_skipped_steps")

EXIT_DIVERGED = 3  # the CLI's exit status after max_skipped_steps skipped steps in a row

TEST_COUNTS = "test_counts.pt"  # in a run's folder: its last evaluation's per-example counts


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
    checkpoint_every: int | None = None  # also checkpoint every N steps (None: each epoch only)
    max_skipped_steps: int = 20  # stop after this many non-finite steps in a row
    nproc: int = 1  # processes (DDP ranks); batch_size is split between them
    grad_comm: str = "fp32"  # gradient exchange between ranks: "fp32" (DDP's) or "fp4"
    optimizer: str | None = None  # one of tasks.OPTIMIZERS (None: the task's); another needs lr

    def __post_init__(self):
        tasks.get(self.task)  # ValueErrors listing the known names
        recipes.get(self.recipe)
        for name in ("epochs", "batch_size", "train_limit", "test_limit", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(self.max_skipped_steps, int) or self.max_skipped_steps < 1:
            raise ValueError(f"max_skipped_steps must be a positive integer; got {self.max_skipped_steps!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr!r}")
        if not isinstance(self.nproc, int) or self.nproc < 1:
            raise ValueError(f"nproc must be a positive integer; got {self.nproc!r}")
        if self.grad_comm not in ("fp32", "fp4"):
            raise ValueError(f"grad_comm must be 'fp32' or 'fp4'; got {self.grad_comm!r}")
        if self.grad_comm == "fp4" and self.nproc == 1:
            raise ValueError("grad_comm 'fp4' needs nproc >= 2: one process exchanges no gradients")
        if self.optimizer not in (None, *tasks.OPTIMIZERS):
            raise ValueError(f"optimizer must be one of {tasks.OPTIMIZERS}; got {self.optimizer!r}")

    def resolved(self, task: tasks.Task) -> RunConfig:
        """Every None filled in from the task's defaults, except `optimizer`: None (the task's
        own) stays None, so a run is the same run whether or not it names the default."""
        d = task.defaults
        optimizer = None if self.optimizer == d.optimizer else self.optimizer
        if optimizer is not None and self.lr is None:
            raise ValueError(
                f"optimizer {optimizer!r} is not {task.name}'s own ({d.optimizer!r}), whose learning "
                f"rate {d.lr:g} is tuned for it; give the learning rate too (--lr)"
            )
        return dataclasses.replace(
            self,
            epochs=self.epochs or d.epochs,
            batch_size=self.batch_size or d.batch_size,
            lr=self.lr or d.lr,
            optimizer=optimizer,
        )

    def optimizer_name(self, task: tasks.Task) -> str:
        """The optimizer this run trains with: its own, or the task's."""
        return self.optimizer or task.defaults.optimizer


class RunStopped(RuntimeError):
    """The run stopped before its end and left a checkpoint; the CLI exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):  # pickled whole: it comes back from the processes `train` launches
        return RunStopped, (str(self), self.exit_code)


@dataclass
class Progress:
    """Where a run is, and what its current epoch has summed so far (kept in the checkpoint)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # batches done in the current epoch
    seen: int = 0  # examples done in the current epoch
    loss_sum: float = 0.0  # Σ loss · examples over the steps whose loss was finite
    loss_seen: int = 0  # the examples in that sum
    skipped: int = 0  # steps of this epoch skipped for a non-finite loss or gradient
    in_a_row: int = 0  # skipped steps since the last good one (across epochs)
    train_time: float = 0.0  # seconds spent training in this epoch, over every resume

    def next_epoch(self) -> Progress:
        return Progress(epoch=self.epoch + 1, in_a_row=self.in_a_row)


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + stream)


def _optimizer(task: tasks.Task, model, cfg: RunConfig, total_steps: int):
    d = task.defaults
    if cfg.optimizer_name(task) == "adam":
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


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A checkpoint written by `train`, loaded with weights_only=True; clear errors otherwise.
    `mmap`: map its tensors instead of reading them (for a look at its config)."""
    try:
        ckpt = torch.load(path, weights_only=True, mmap=mmap)
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


def load_test_counts(run: Path, epoch: int) -> Tensor | None:
    """The per-example counts (`Task.evaluate_examples`) of the run's evaluation after
    `epoch`; None where the run did not keep them (runs before they were kept; an evaluation
    of another epoch)."""
    try:
        saved = torch.load(run / TEST_COUNTS, weights_only=True)
    except FileNotFoundError:
        return None
    return saved["counts"] if saved.get("epoch") == epoch else None


def check_same_run(ckpt: dict, cfg: RunConfig, path: Path) -> None:
    """Refuse a checkpoint from another task, recipe or setting, saying which."""
    theirs, ours = ckpt["config"], dataclasses.asdict(cfg)
    for key in ("task", "recipe"):
        if theirs.get(key) != ours[key]:
            raise ValueError(
                f"{path} is from another {key}: {theirs.get(key)!r}, not {ours[key]!r}; use another --out"
            )
    if theirs.get("nproc") != cfg.nproc:
        raise ValueError(
            f"{path} is from a run on {theirs.get('nproc')} process(es), not {cfg.nproc}: each process's "
            "data shard and random states are in it; resume with the same --nproc or use another --out"
        )
    differ = [
        f"{k} {theirs.get(k)!r} (now {v!r})"
        for k, v in ours.items()
        if k not in OPERATIONAL_FIELDS and theirs.get(k) != v
    ]
    if differ:
        raise ValueError(f"{path} is from a run with other settings: {', '.join(differ)}; use another --out")


def _all_finite(x) -> bool:
    """Every floating-point tensor in x (a tensor, or tuples / lists / dicts of them) is finite."""
    if isinstance(x, Tensor):
        return not x.is_floating_point() or bool(torch.isfinite(x).all())
    if isinstance(x, dict):
        x = list(x.values())
    return not isinstance(x, (tuple, list)) or all(_all_finite(v) for v in x)


def _names(names: list[str]) -> str:
    """At most the last three (the nearest the output, where a bad gradient enters first)."""
    shown = ", ".join(names[-3:])
    return shown if len(names) <= 3 else f"{shown} and {len(names) - 3} more"


class StepGuard:
    """Finds the non-finite numbers of a step, and undoes what that step changed in place.

    A healthy step costs a copy of the model's (small) buffers and one host sync after
    backward; which layer went wrong is worked out only on a bad step."""

    def __init__(self, model: torch.nn.Module, comm: distributed.FP4State | None = None):
        self.model, self.comm = model, comm
        self.counters = nonfinite_gradients(model)
        # What a step changes in place besides parameters and optimizer: the buffers (BN
        # running statistics and num_batches_tracked, PACT signedness, the layers' generator
        # states) and PACT's alpha (set from the first batch). Not GradScale: it must back off.
        modules = list(model.modules())
        self.state = [b for m in modules if not isinstance(m, GradScale) for b in m.buffers(recurse=False)]
        self.state += [m.alpha for m in modules if isinstance(m, PACT)]
        self.params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def snapshot(self) -> tuple:
        # the FP4 exchange's error-feedback residuals, which backward replaces (not mutates)
        residuals = None if self.comm is None else _copy_residuals(self.comm.residuals)
        return [t.detach().clone() for t in self.state], torch.get_rng_state(), residuals

    def restore(self, snapshot: tuple) -> None:
        tensors, rng, residuals = snapshot
        with torch.no_grad():
            for t, saved in zip(self.state, tensors, strict=True):
                t.copy_(saved)
        torch.set_rng_state(rng)
        if self.comm is not None:  # (its byte counts stay: those bytes were sent)
            self.comm.residuals = _copy_residuals(residuals)

    def counts(self) -> Tensor:
        """Every layer's non-finite gradient count, as one tensor (no host sync)."""
        if not self.counters:  # e.g. a model with no quantized layer
            return torch.zeros(0, dtype=torch.int64)
        return torch.stack(list(self.counters.values()))

    def bad_gradients(self, counts_before: Tensor) -> str | None:
        """None when every gradient of the backward pass was finite; else where it was not."""
        grads = [p.grad for _, p in self.params if p.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        new = self.counts() - counts_before
        if bool(finite & (new == 0).all()):  # the one host sync
            return None
        layers = [name for name, d in zip(self.counters, new.tolist(), strict=True) if d]
        if layers:
            return f"non-finite gradient entering the quantizer of {_names(layers)}"
        bad = [
            name for name, p in self.params if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        return f"non-finite gradient of {_names(bad)}"


def _copy_residuals(residuals: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    return {kind: dict(by_name) for kind, by_name in residuals.items()}


def _on_any_rank(why: str | None) -> str | None:
    """A step is skipped on every rank when one rank must skip it (the others would wait for
    it in backward, or step without it): the first such rank's reason, or None."""
    if distributed.world_size() == 1:
        return why
    if not distributed.reduce_floats({"bad": float(why is not None)}, "sum")["bad"]:
        return None
    rank, why = next((r, w) for r, w in enumerate(distributed.gather(why)) if w is not None)
    return f"rank {rank}: {why}"


def first_nonfinite_output(model: torch.nn.Module, task: tasks.Task, batch) -> str:
    """Run the forward again with hooks: the first module whose output is not finite."""
    found: list[str] = []

    def hook(name: str):
        def check(module, args, output):
            if not found and not _all_finite(output):
                note = "" if _all_finite(args) else " (its input was not finite either)"
                found.append(f"{name or 'the model'}{note}")

        return check

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()]
    try:
        with torch.no_grad():
            task.loss(model, batch)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else "no module (the loss computation itself)"


def train_step(model, opt, sched, task: tasks.Task, batch, guard: StepGuard) -> tuple[float, int, str | None]:
    """One optimizer step on `batch`: (loss, examples, None), or (loss, examples, why) when
    the loss or a gradient was not finite and the step was skipped: parameters, optimizer,
    scheduler, buffers (BN statistics), PACT α and the random states stay as they were;
    only the GradScales that saw the bad gradient backed off. `model` is what the forward
    runs through: the model itself, or on several ranks its DDP wrapper (every rank skips
    when one must)."""
    before = guard.snapshot()
    loss, n = task.loss(model, batch)
    value = loss.item()  # checked before backward: a bad loss would back off every GradScale
    why = None
    if not math.isfinite(value):
        guard.restore(before)  # so the rerun sees exactly this step's forward
        where = first_nonfinite_output(guard.model, task, batch)  # (not through DDP: no collectives)
        why = f"loss is {value}; the first non-finite output of the forward pass: {where}"
    why = _on_any_rank(why)
    if why is not None:
        guard.restore(before)
        return value, n, why
    counts = guard.counts()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    why = _on_any_rank(guard.bad_gradients(counts))
    if why is not None:
        guard.restore(before)
        return value, n, why
    opt.step()
    sched.step()
    return value, n, None


class _StopSignals:
    """SIGINT / SIGTERM ask the loop to stop at the next step boundary (`signum` is set);
    a second SIGINT acts as it would have without us (a second SIGTERM may be the same stop
    sent to every process and passed on by `distributed.launch` too)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> _StopSignals:
        self.signum: int | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # signal() works there only
            for s in self.SIGNALS:
                previous = signal.signal(s, self._handle)
                self.previous[s] = signal.SIG_DFL if previous is None else previous  # None: set in C
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signum, self.previous[signum])

    def on_any_rank(self) -> int | None:
        """The signal that arrived here or at another rank (every rank asks at the same step)."""
        if distributed.world_size() == 1:
            return self.signum
        arrived = distributed.reduce_floats({s.name: float(self.signum == s) for s in self.SIGNALS}, "sum")
        return next((s for s in self.SIGNALS if arrived[s.name]), None)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train, evaluate each epoch, checkpoint each epoch (and every `checkpoint_every` steps);
    returns (and writes) summary.json. Raises RunStopped when stopped early.

    With cfg.nproc > 1: on every rank of a process group of that size (torchrun's), or,
    called outside one, on that many new processes."""
    world = distributed.world_size()
    if world == 1 and cfg.nproc > 1:
        return _launch(cfg, Path(out), resume, progress)
    if world != cfg.nproc:
        raise ValueError(f"nproc is {cfg.nproc}, but this process group has {world} processes")
    run = _Run(cfg, Path(out), progress, resume)
    with _StopSignals() as signals:
        while run.pos.epoch < run.cfg.epochs:
            signum = signals.on_any_rank()  # one that arrived during the evaluation
            if signum is not None:
                raise run.interrupted(None, signum)
            run.train_epoch(signals)
            run.end_epoch()
    return run.write_summary()


def _launch(cfg: RunConfig, out: Path, resume: bool, progress: bool) -> dict:
    """`train` on cfg.nproc new processes: rank 0's summary, or the error that ended them."""
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():  # refused here, before starting the processes
        check_same_run(load_checkpoint(ckpt_path), cfg.resolved(tasks.get(cfg.task)), ckpt_path)
    result = distributed.launch(cfg.nproc, _train_on_a_rank, cfg, out, resume, progress)[0]
    if isinstance(result, Exception):
        raise result
    return result


def _train_on_a_rank(cfg: RunConfig, out: Path, resume: bool, progress: bool) -> dict | Exception:
    """One process of `_launch`. The errors the CLI reports are returned, not raised: so they
    reach the launching process whole (with RunStopped's exit status), not as a traceback."""
    try:
        return train(cfg, out, resume, progress)
    except (ValueError, DataError, RunStopped) as e:
        return e


def run_data(task: tasks.Task, cfg: RunConfig) -> tuple[Dataset, DataLoader]:
    """The run's training set and test batches (`cfg` resolved); a clear error when the
    task's data is not installed."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    status = task.data_status(data_dir)
    if status is not None:
        raise ValueError(status)
    train_set = task.dataset("train", data_dir, cfg.train_limit, cfg.seed)
    test_set = task.dataset("test", data_dir, cfg.test_limit, cfg.seed)
    return train_set, DataLoader(test_set, batch_size=cfg.batch_size, collate_fn=task.collate)


def run_model(
    task: tasks.Task, cfg: RunConfig, train_set: Dataset, policy: dict | None = None, verbose: bool = False
) -> nn.Module:
    """The run's model before training: built under seed `cfg.seed` and converted to
    `cfg.recipe` (and convert's `policy`), the first training examples as the example input."""
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    example = task.collate([train_set[i] for i in range(min(2, len(train_set)))])
    convert(
        model, cfg.recipe, policy, example_input=task.model_inputs(example), seed=cfg.seed, verbose=verbose
    )
    return model


class _Run:
    """One run (this rank's part of it): its data, model, optimizer, where it is, and its history."""

    def __init__(self, cfg: RunConfig, out: Path, progress: bool, resume: bool = False):
        self.commit = source_commit()  # now, before the checkout can move on under a long run
        task = tasks.get(cfg.task)
        self.cfg = cfg = cfg.resolved(task)
        self.rank, world = distributed.rank(), distributed.world_size()
        if cfg.batch_size % world:
            raise ValueError(f"batch size {cfg.batch_size} does not split evenly between {world} processes")
        self.batch_size = cfg.batch_size // world  # this rank's
        self.task, self.out, self.progress = task, out, progress and distributed.is_main()
        self.ckpt_path = out / "checkpoint.pt"
        self.train_set, self.test_loader = run_data(task, cfg)
        self.steps_per_epoch = math.ceil(len(self.train_set) // world / self.batch_size)  # of a shard

        self.model = run_model(task, cfg, self.train_set, verbose=self.progress)  # the same on every rank
        self.opt, self.sched = _optimizer(task, self.model, cfg, cfg.epochs * self.steps_per_epoch)
        self.history: list[dict] = []
        self.pos, self.augment_rng, self.wall_before = Progress(), None, 0.0
        self.t_start = time.perf_counter()
        mine = self.resume() if resume and self.ckpt_path.exists() else None
        # `net` is what training runs through; `model` keeps rank 0's buffers, the run's state
        self.net, self.comm = distributed.wrap(self.model, cfg.grad_comm) if world > 1 else (self.model, None)
        if self.comm is not None and mine is not None:
            self.comm.load_state_dict(mine["grad_comm"])
        self.guard = StepGuard(self.model, self.comm)

    def resume(self) -> dict:
        """Load the checkpoint (before DDP wraps the model); this rank's part of it."""
        ckpt = load_checkpoint(self.ckpt_path)
        check_same_run(ckpt, self.cfg, self.ckpt_path)
        mine = ckpt["ranks"][self.rank]
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(mine["torch_rng"])
        self.history, self.wall_before = ckpt["history"], ckpt["wall_time_s"]
        self.pos, self.augment_rng = Progress(**ckpt["progress"]), mine["augment_rng"]
        return mine

    def save_checkpoint(self, aug: torch.Generator | None) -> None:
        """`aug`: the epoch's augmentation generator, when saving in the middle of an epoch.
        Every rank calls it; rank 0 writes."""
        ranks = distributed.gather(
            {
                "torch_rng": torch.get_rng_state(),
                "augment_rng": aug.get_state() if aug is not None else None,
                "grad_comm": self.comm.state_dict() if self.comm is not None else None,
            }
        )
        if not distributed.is_main():
            return
        checkpoint = {
            "format": "fourbit-checkpoint",
            "version": CHECKPOINT_VERSION,
            "config": dataclasses.asdict(self.cfg),
            "progress": dataclasses.asdict(self.pos),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "ranks": ranks,  # what differs between ranks
            "history": self.history,
            "wall_time_s": self.wall_before + time.perf_counter() - self.t_start,
        }
        atomic_write(self.ckpt_path, lambda tmp: torch.save(checkpoint, tmp))

    def stop(self, aug: torch.Generator | None, what: str, advice: str, exit_code: int) -> RunStopped:
        """Checkpoint, and the exception that ends the run."""
        self.save_checkpoint(aug)
        where = f"epoch {self.pos.epoch + 1}, step {self.pos.step}/{self.steps_per_epoch}"
        return RunStopped(f"{what} at {where}; checkpoint saved to {self.ckpt_path}: {advice}", exit_code)

    def interrupted(self, aug: torch.Generator | None, signum: int) -> RunStopped:
        name = signal.Signals(signum).name
        advice = "to continue, run the same command with --resume"
        return self.stop(aug, f"stopped by {name}", advice, 128 + signum)  # as a shell reports a kill

    def diverged(self, aug: torch.Generator, why: str) -> RunStopped:
        advice = (
            "it holds the last good state (a skipped step changes no parameter, optimizer or BN "
            "statistic); --resume retries from it, or start again in a new --out with a lower --lr "
            "or another recipe"
        )
        return self.stop(
            aug, f"{self.pos.in_a_row} steps in a row skipped (the last: {why})", advice, EXIT_DIVERGED
        )

    def next_batches(self) -> tuple[DataLoader, torch.Generator]:
        """The batches of epoch `pos.epoch` from step `pos.step` on, and the generator that
        augments them (the order and augmentation a fresh or a resumed run draws alike)."""
        cfg, pos, epoch = self.cfg, self.pos, self.pos.epoch
        order = torch.randperm(len(self.train_set), generator=_epoch_generator(cfg.seed, epoch, 0)).tolist()
        aug = _epoch_generator(cfg.seed, epoch, 1 + self.rank)  # each rank its own augmentation
        if pos.step:  # resumed mid-epoch: skip the batches done, augment from where it was
            aug.set_state(self.augment_rng)
        sampler = distributed.shard(order)[pos.step * self.batch_size :]
        return DataLoader(self.train_set, self.batch_size, sampler=sampler, collate_fn=self.task.collate), aug

    def train_epoch(self, signals: _StopSignals) -> None:
        """The steps of epoch `pos.epoch` from step `pos.step` on."""
        cfg, pos, epoch = self.cfg, self.pos, self.pos.epoch
        loader, aug = self.next_batches()
        self.net.train()
        t0 = time.perf_counter() - pos.train_time
        desc = f"{cfg.task} {cfg.recipe} epoch {epoch + 1}/{cfg.epochs}"
        bar = tqdm(loader, desc, initial=pos.step, total=self.steps_per_epoch, disable=not self.progress)
        for batch in bar:
            batch = self.task.augment(batch, aug)
            loss, n, why = train_step(self.net, self.opt, self.sched, self.task, batch, self.guard)
            pos.step += 1
            pos.train_time = time.perf_counter() - t0
            finite = math.isfinite(loss)
            done = {"seen": n, "loss_sum": loss * n if finite else 0.0, "loss_seen": n if finite else 0}
            done = distributed.reduce_floats(done, "sum")  # the same totals on every rank
            pos.seen += int(done["seen"])
            pos.loss_sum += done["loss_sum"]
            pos.loss_seen += int(done["loss_seen"])
            pos.in_a_row = 0 if why is None else pos.in_a_row + 1  # (every rank skipped it, or none)
            if why is not None:
                pos.skipped += 1
                if distributed.is_main():
                    tqdm.write(f"epoch {epoch + 1}, step {pos.step}: skipped: {why}", file=sys.stderr)
            postfix = {"loss": f"{loss:.3f}", "samples_s": f"{pos.seen / pos.train_time:.0f}"}
            bar.set_postfix(postfix | ({"skipped": pos.skipped} if pos.skipped else {}))
            if pos.in_a_row >= cfg.max_skipped_steps:
                raise self.diverged(aug, why)
            signum = signals.on_any_rank()
            if signum is not None:
                raise self.interrupted(aug, signum)
            every = cfg.checkpoint_every
            if (
                every
                and (epoch * self.steps_per_epoch + pos.step) % every == 0
                and pos.step < self.steps_per_epoch
            ):
                self.save_checkpoint(aug)  # (the last step's is the epoch checkpoint)

    def end_epoch(self) -> None:
        """Evaluate (rank 0, on its model: its buffers are the run's), log, write
        metrics.jsonl and the epoch checkpoint."""
        pos, task = self.pos, self.task
        record = None
        if distributed.is_main():
            self.model.eval()
            with torch.no_grad():
                metrics, counts = task.evaluate_examples(self.model, self.test_loader)
            # the last evaluation's per-example counts: what `fourbit compare` bootstraps
            test_counts = {"epoch": pos.epoch + 1, "counts": counts}
            atomic_write(self.out / TEST_COUNTS, lambda tmp: torch.save(test_counts, tmp))
            record = {
                "epoch": pos.epoch + 1,
                "train_loss": pos.loss_sum / max(pos.loss_seen, 1),
                **metrics,
                "lr": self.sched.get_last_lr()[0],
                "skipped_steps": pos.skipped,
                "train_examples": pos.seen,  # on every rank together
                "epoch_time_s": pos.train_time,
                "samples_per_s": pos.seen / pos.train_time,
                "torch_threads": torch.get_num_threads(),
                "commit": self.commit,
                **self.grad_bytes(),
            }
            if self.progress:
                value, loss = metrics[task.metric_name], record["train_loss"]
                tqdm.write(f"epoch {pos.epoch + 1}: {task.metric_name} {value:.3f}, train loss {loss:.4f}")
        self.history.append(distributed.from_main(record))
        if distributed.is_main():
            _write_json_lines(self.out / "metrics.jsonl", self.history)
        self.pos = pos.next_epoch()
        self.save_checkpoint(None)

    def grad_bytes(self) -> dict:
        """With the FP4 exchange: the bytes one rank sent since the run began, and their
        ratio to what DDP's fp32 all-reduce would have sent."""
        if self.comm is None:
            return {}
        return {"grad_bytes_sent_per_rank": self.comm.bytes_sent, "grad_bytes_ratio": self.comm.ratio}

    def write_summary(self) -> dict:
        """summary.json (rank 0 writes it, every rank returns it) and curves.png."""
        cfg, task, history = self.cfg, self.task, self.history
        final = history[-1] if history else {}
        summary = {
            "task": cfg.task,
            "recipe": cfg.recipe,
            "seed": cfg.seed,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "optimizer": cfg.optimizer_name(task),
            "train_limit": cfg.train_limit,
            "test_limit": cfg.test_limit,
            "nproc": cfg.nproc,
            "grad_comm": cfg.grad_comm,
            "metric_name": task.metric_name,
            "metric": final.get(task.metric_name),
            "higher_is_better": task.higher_is_better,
            "wall_time_s": self.wall_before + time.perf_counter() - self.t_start,
            "samples_per_s": sum(h["samples_per_s"] for h in history) / max(len(history), 1),
            "epoch_time_s": sum(h["epoch_time_s"] for h in history) / max(len(history), 1),
            "skipped_steps": sum(h["skipped_steps"] for h in history),
            "peak_rss_mb": _peak_rss_mb(),
            # every epoch's, in order, as metrics.jsonl has them (null: not recorded, before 002650c)
            "commits": list(dict.fromkeys(h.get("commit") for h in history)),
            "torch_threads": list(dict.fromkeys(h.get("torch_threads") for h in history)),
            **self.grad_bytes(),
            "final": final,
        }
        if not distributed.is_main():
            return summary
        atomic_write(
            self.out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n")
        )
        from fourbit.plots import plot_curves

        plot_curves({cfg.recipe: history}, task.metric_name, self.out / "curves.png")
        return summary


def _write_json_lines(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))
