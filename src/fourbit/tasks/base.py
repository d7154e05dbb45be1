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

    @abstractmethod
    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        """Metrics over the batches (model in eval mode, no grad); includes `metric_name`."""
