"""What a task is: data + model + loss + metric, behind one small interface.

The training loop (`fourbit.train`) knows nothing else about a task. A task's data comes
from Debian packages (or a user's `--data-dir`), never from a download at run time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

OPTIMIZERS = ("sgd", "adam")  # SGD with Nesterov momentum 0.9; AdamW


@dataclass(frozen=True)
class Defaults:
    """A task's default training setup (what `fourbit train` uses unless told otherwise)."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"  # one of OPTIMIZERS
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" or "constant"
    warmup: float = 0.0  # fraction of all steps with a linear learning-rate warm-up


class Task(ABC):
    """One benchmark. Subclasses set the class attributes and implement the methods."""

    name: str
    metric_name: str
    higher_is_better: bool
    packages: tuple[str, ...] = ()  # Debian packages the default data comes from
    defaults: Defaults

    @abstractmethod
    def data_status(self, data_dir: Path | None) -> str | None:
        """None when the data is there; otherwise one line saying how to get it."""

    @abstractmethod
    def dataset(self, split: str, data_dir: Path | None, limit: int | None, seed: int) -> Dataset:
        """The `train` or `test` split (the first `limit` examples of a fixed shuffle when given)."""

    def collate(self, examples: list):
        """Batch a list of dataset items (default: torch's default_collate)."""
        return torch.utils.data.default_collate(examples)

    def augment(self, batch, generator: torch.Generator):
        """Training-time augmentation of a collated batch, drawing only from `generator`."""
        return batch

    def synthetic_batch(self, batch_size: int, length: int | None, generator: torch.Generator):
        """A collated batch of random data in the task's real shapes (for `fourbit bench`);
        `length`: frames or tokens per sequence, where the task has sequences."""
        raise NotImplementedError(f"{self.name} has no synthetic batch")

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh float32 model (call under a seeded torch RNG for reproducible weights)."""

    @abstractmethod
    def model_inputs(self, batch) -> tuple:
        """The positional arguments the model is called with for this batch."""

    @abstractmethod
    def loss(self, model: nn.Module, batch) -> tuple[Tensor, int]:
        """(mean training loss of the batch, number of examples in it)."""

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        """Metrics over the batches (model in eval mode, no grad); includes `metric_name`."""
        return self.evaluate_examples(model, batches)[0]

    @abstractmethod
    def evaluate_examples(self, model: nn.Module, batches) -> tuple[dict[str, float], Tensor]:
        """`evaluate`'s metrics, and each example's counts behind `metric_name`: one float64
        row per example, in the batches' order, whose column sums `metric_from_counts` turns
        into the metric (what `bootstrap` resamples)."""

    @abstractmethod
    def metric_from_counts(self, totals: Tensor) -> float:
        """`metric_name` from per-example counts summed over a set of examples."""


def percentage(totals: Tensor) -> float:
    """100 × the first summed count over the second (right/images, errors/reference digits)."""
    return 100.0 * float(totals[0]) / max(float(totals[1]), 1.0)


def bootstrap(
    task: Task,
    counts: Tensor,
    reference: Tensor | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Percentile bootstrap over the test examples: `resamples` draws of as many examples with
    replacement, each scored by `task.metric_from_counts` (`counts`: `evaluate_examples`'s).
    Gives the metric (`value`) and its interval at `level` (`low`, `high`); with `reference`,
    the same examples in the same order under another model or forward, also `delta`, the
    metric minus the reference's, and its interval over the same draws (the paired bootstrap
    of Koehn 2004). It measures what the choice of test examples moves a number by, not what
    another training seed would. The draws come from a generator seeded with `seed`."""
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise ValueError(f"counts must be one row per example, at least one; got shape {tuple(counts.shape)}")
    if reference is not None and reference.shape != counts.shape:
        raise ValueError(
            f"the reference's counts must be for the same examples: shape {tuple(reference.shape)} "
            f"against {tuple(counts.shape)}"
        )
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer; got {resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1; got {level!r}")
    sides = [counts.double()] + ([] if reference is None else [reference.double()])
    n = counts.shape[0]
    generator = torch.Generator().manual_seed(seed)
    scores: list[list[float]] = [[] for _ in sides]
    for start in range(0, resamples, 256):  # (a chunk of weights at a time: n can be 10,000)
        draws = torch.randint(n, (min(256, resamples - start), n), generator=generator)
        weights = torch.zeros(draws.shape, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones(draws.shape, dtype=torch.float64)
        )
        for side, score in zip(sides, scores, strict=True):
            score += [task.metric_from_counts(totals) for totals in weights @ side]
    quantiles = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    values = torch.tensor(scores, dtype=torch.float64)
    low, high = torch.quantile(values[0], quantiles).tolist()
    result = {"value": task.metric_from_counts(sides[0].sum(0)), "low": low, "high": high,
              "level": level, "resamples": resamples}  # fmt: skip
    if reference is not None:
        result["delta"] = result["value"] - task.metric_from_counts(sides[1].sum(0))
        result["delta_low"], result["delta_high"] = torch.quantile(values[0] - values[1], quantiles).tolist()
    return result
