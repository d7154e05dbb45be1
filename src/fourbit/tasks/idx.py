"""IDX image/label files (MNIST, Fashion-MNIST), read without any download."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(RuntimeError):
    """Missing or unreadable data; the message says what to install or where to look."""


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (optionally gzip-compressed) as a numpy array of its stated shape."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) != header + dtype.itemsize * int(np.prod(shape)):
        raise DataError(f"{path} is truncated or corrupt: its header says shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def load_idx_split(data_dir: Path | None, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the `train` or `test` split.

    `data_dir` defaults to the Debian Fashion-MNIST package; any directory holding the
    standard `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` files works (MNIST too).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    directory = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    stem = "train" if split == "train" else "t10k"
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [directory / f"{stem}-{kind}-ubyte{ext}" for ext in (".gz", "")]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            hint = (
                f"install it with: sudo apt-get install {FASHION_MNIST_PACKAGE}"
                if data_dir is None
                else "point --data-dir at a directory holding the IDX files"
            )
            raise DataError(f"no {candidates[0].name} in {directory}; {hint}")
        arrays.append(read_idx(found))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{directory}: images {images.shape} and labels {labels.shape} do not match")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
