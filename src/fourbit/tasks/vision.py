"""Vision: Fashion-MNIST (Debian package), MNIST or CIFAR-10 (a user's directory);
CIFAR-style ResNet-20 and a small MobileNetV2; top-1 accuracy.

Images reach the model as pixels in [0, 1] (no mean/std normalization: the first layer's
BatchNorm absorbs it, and the `all4` recipe maps exactly these pixels onto 16 levels).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from fourbit.tasks.base import Defaults, Task, percentage
from fourbit.tasks.idx import FASHION_MNIST_DIR, FASHION_MNIST_PACKAGE, DataError, load_idx_split


def load_cifar10(directory: Path, split: str) -> tuple[Tensor, Tensor]:
    """(uint8 images [N, 3, 32, 32], int64 labels) from the standard python-pickle batches."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = Path(directory) / name
        if not path.exists():
            raise DataError(f"no {name} in {directory}; point --data-dir at the 'cifar-10-batches-py' folder")
        try:
            with path.open("rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            lab = np.asarray(batch[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise DataError(f"{path} is not a CIFAR-10 batch file ({type(e).__name__}: {e})") from None
        if len(data) != len(lab):
            raise DataError(f"{path}: {len(data)} images but {len(lab)} labels")
        images.append(data)
        labels.append(lab)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_images(data_dir: Path | None, split: str) -> tuple[Tensor, Tensor]:
    """uint8 [N, C, H, W] and labels: Fashion-MNIST by default, or MNIST / CIFAR-10 from a
    user directory (recognised by its files)."""
    if data_dir is not None and (Path(data_dir) / "test_batch").exists():
        return load_cifar10(Path(data_dir), split)
    images, labels = load_idx_split(data_dir, split)
    return images.unsqueeze(1), labels


def _subset(n: int, limit: int | None, seed: int) -> Tensor:
    """The first `limit` indices of a fixed shuffle (all, in order, without a limit)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


class _VisionTask(Task):
    metric_name = "accuracy"
    higher_is_better = True
    packages = (FASHION_MNIST_PACKAGE,)

    def __init__(self):
        self.in_channels = 1

    def data_status(self, data_dir):
        if data_dir is not None:
            path = Path(data_dir)
            return None if path.is_dir() else f"--data-dir {path} is not a directory"
        if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
            return None
        return f"Fashion-MNIST is missing: sudo apt-get install {FASHION_MNIST_PACKAGE}"

    def dataset(self, split, data_dir, limit, seed):
        images, labels = load_images(data_dir, split)
        self.in_channels = images.shape[1]
        keep = _subset(len(images), limit, seed)
        return TensorDataset(images[keep], labels[keep])

    def collate(self, examples):
        images, labels = torch.utils.data.default_collate(examples)
        return images.float() / 255, labels

    def augment(self, batch, generator: torch.Generator):
        """Random shifts of up to 2 pixels and horizontal flips (training only)."""
        images, labels = batch
        n, _, h, w = images.shape
        padded = F.pad(images, (2, 2, 2, 2))
        dy, dx = torch.randint(0, 5, (2, n), generator=generator)
        rows = (torch.arange(h).unsqueeze(0) + dy.unsqueeze(1)).reshape(n, 1, h, 1)
        cols = (torch.arange(w).unsqueeze(0) + dx.unsqueeze(1)).reshape(n, 1, 1, w)
        shifted = padded.gather(2, rows.expand(n, padded.shape[1], h, w + 4)).gather(
            3, cols.expand(n, padded.shape[1], h, w)
        )
        flip = torch.rand(n, generator=generator) < 0.5
        shifted[flip] = shifted[flip].flip(-1)
        return shifted, labels

    def synthetic_batch(self, batch_size, length, generator):
        images = torch.rand(batch_size, self.in_channels, 28, 28, generator=generator)
        return images, torch.randint(0, 10, (batch_size,), generator=generator)

    def model_inputs(self, batch):
        return (batch[0],)

    def loss(self, model, batch):
        images, labels = batch
        return F.cross_entropy(model(images), labels), len(labels)

    def evaluate_examples(self, model, batches):
        hits: list[Tensor] = []
        loss = 0.0
        for images, labels in batches:
            logits = model(images)
            loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            hits.append(logits.argmax(1) == labels)
        correct = torch.cat(hits).double() if hits else torch.zeros(0, dtype=torch.float64)
        counts = torch.stack([correct, torch.ones_like(correct)], 1)  # (right, 1) per image
        total = max(len(correct), 1)
        return {"accuracy": 100.0 * float(correct.sum()) / total, "test_loss": loss / total}, counts

    def metric_from_counts(self, totals):
        return percentage(totals)


# -- ResNet-20 (He et al. 2016, CIFAR variant) ---------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # projection shortcut: a 1×1 conv
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()  # a module, not F.relu, so convert can swap it (fourbit.nn.activation)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """3 stages of 3 basic blocks, widths 16/32/64, BatchNorm; ~0.27 M parameters."""

    def __init__(self, in_channels: int = 1, classes: int = 10, widths=(16, 32, 64), blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (b == 0 and i > 0) else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(x.mean((2, 3)))


# -- MobileNetV2 (Sandler et al. 2018), sized for 28×28 / 32×32 ---------------------------------


class InvertedResidual(nn.Module):
    """1×1 expand -> 3×3 depthwise -> 1×1 project (linear bottleneck); residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    """(expand, channels, repeats, stride) stages of inverted residuals; ~0.3 M parameters."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 3, 2), (6, 96, 2, 1))

    def __init__(self, in_channels: int = 1, classes: int = 10, head: int = 320):
        super().__init__()
        layers = [nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(head, classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class FashionResNet20(_VisionTask):
    name = "fashion-resnet20"
    defaults = Defaults(epochs=15, batch_size=128, lr=0.1)

    def build_model(self):
        return ResNet20(self.in_channels)


class FashionMobileNetV2(_VisionTask):
    name = "fashion-mobilenetv2"
    defaults = Defaults(epochs=15, batch_size=128, lr=0.05, weight_decay=4e-5)

    def build_model(self):
        return MobileNetV2(self.in_channels)
