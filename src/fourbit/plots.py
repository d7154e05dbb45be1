"""Pictures: the 4-bit grids and the 4-bit pixels (matplotlib, no screen needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fourbit import formats  # noqa: E402
from fourbit.io import atomic_write  # noqa: E402

FOUR_BIT_GRIDS = ("int4", "uint4", "fp4_radix4", "fp4_radix2", "fp4_radix8", "fp4_e2m1")


def save(fig, path: str | Path) -> Path:
    """Save and close `fig`, atomically, in the format the suffix names."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return out


def plot_grids(path: str | Path) -> Path:
    """Every 4-bit grid's positive values on one log2 axis (radix-4 FP4 in both phases)."""
    rows = []
    for name in FOUR_BIT_GRIDS:
        fmt = formats.get(name)
        for phase in fmt.phases:
            label = name if len(fmt.phases) == 1 else f"{name}, phase {phase}"
            v = fmt.values(phase=phase)
            rows.append((label, torch.log2(v[v > 0]).tolist()))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    for i, (_, exps) in enumerate(rows):
        ax.scatter(exps, [i] * len(exps), s=28)
        ax.hlines(i, min(exps), max(exps), lw=0.6, alpha=0.4)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("log2 of the positive representable values (scale 1)")
    ax.set_title("fourbit: every 4-bit grid (each format also has 0 and the negatives)")
    ax.grid(axis="x", alpha=0.3)
    return save(fig, path)


def plot_pixels(images: torch.Tensor, titles: list[str], path: str | Path) -> Path:
    """Each image (uint8 [N, H, W]) as 256, 16 (the 4-bit input -8 ... 7), 8 and 4 levels."""
    p = images.float() / 255
    columns = [
        ("original: 256 levels", p),
        ("4-bit input: 16 levels, codes -8 ... 7", (formats.pixels_to_int4(p).float() + 8) / 15),
        ("3-bit: 8 levels", torch.round(p * 7) / 7),
        ("2-bit: 4 levels", torch.round(p * 3) / 3),
    ]
    n = len(images)
    fig, axes = plt.subplots(n, len(columns), figsize=(2.6 * len(columns), 2.6 * n), squeeze=False)
    for r in range(n):
        for c, (label, img) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(img[r].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
            if c == 0:
                ax.set_ylabel(titles[r], fontsize=9)
    fig.suptitle("Fashion-MNIST as a 4-bit computer sees it (pixel p -> round(15p - 8))")
    return save(fig, path)


def plot_curves(histories: dict[str, list[dict]], metric: str, path: str | Path) -> Path:
    """Test metric and training loss per epoch, one line per run (recipe)."""
    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    for label, history in histories.items():
        epochs = [h["epoch"] for h in history]
        ax_m.plot(epochs, [h[metric] for h in history], marker="o", ms=3, label=label)
        ax_l.plot(epochs, [h["train_loss"] for h in history], marker="o", ms=3, label=label)
    ax_m.set_title(f"test {metric}")
    ax_l.set_title("training loss")
    ax_l.set_yscale("log")
    for ax in (ax_m, ax_l):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)
