"""Pictures: the 4-bit grids and pixels, training curves, and the analysis plots of
`fourbit inspect` / `fourbit bn-drift` (matplotlib, no screen needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

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


def _line_style(k: int) -> dict:
    """The k-th line's colour and dash: matplotlib's 10 colours, then the same colours dashed,
    dotted, ... so that no two of a plot's lines look alike."""
    return {"color": f"C{k % 10}", "ls": ("-", "--", ":", "-.")[k // 10 % 4]}


def plot_curves(histories: dict[str, list[dict]], metric: str, path: str | Path) -> Path:
    """Test metric and training loss per epoch, one line per run (recipe); one legend, to the
    right of both panels, so that it covers no line."""
    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    for k, (label, history) in enumerate(histories.items()):
        epochs = [h["epoch"] for h in history]
        style = {"marker": "o", "ms": 3, **_line_style(k)}
        ax_m.plot(epochs, [h[metric] for h in history], label=label, **style)
        ax_l.plot(epochs, [h["train_loss"] for h in history], **style)
    ax_m.set_title(f"test {metric}")
    ax_l.set_title("training loss")
    ax_l.set_yscale("log")
    for ax in (ax_m, ax_l):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    return save(fig, path)


# grids drawn over a gradient histogram: (label, format, phase, scale putting its top where)
GRADIENT_GRIDS = (
    ("radix-4 FP4, phase 0 (dW)", "fp4_radix4", 0, 1.0),
    ("radix-4 FP4, phase 1 (dX)", "fp4_radix4", 1, 1.0),
    ("radix-2 FP4", "fp4_radix2", 0, 1.0),
    ("fp4 e2m1, top at 1", "fp4_e2m1", 0, 1 / 6),
)


def plot_gradient_histogram(layer: dict, title: str, path: str | Path) -> Path:
    """log2 |s·dY| of one layer (its `grad_hist` from fourbit inspect), every 4-bit gradient
    grid's positive values drawn under it (at scale 1, where GradScale aims the gradient)."""
    h = layer["grad_hist"]
    counts = torch.tensor(h["counts"], dtype=torch.float64)
    edges = h["log2_low"] + h["width"] * torch.arange(len(counts) + 1, dtype=torch.float64)
    total = counts.sum() + h["zero"] + h["below"] + h["above"]
    fig, (ax, ax_g) = plt.subplots(
        2, 1, figsize=(9, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
    )
    ax.stairs((counts / max(float(total), 1)).tolist(), edges.tolist(), fill=True, alpha=0.6, color="C0")
    ax.set_ylabel("fraction of elements")
    ax.set_title(f"{title}\nzero: {h['zero'] / max(float(total), 1):.1%} of the elements", fontsize=10)
    ax.grid(alpha=0.3)
    for i, (_, name, phase, scale) in enumerate(GRADIENT_GRIDS):
        v = formats.get(name).values(scale, phase)
        exps = torch.log2(v[v > 0]).tolist()
        ax_g.scatter(exps, [i] * len(exps), s=24, color=f"C{i + 1}")
        ax_g.hlines(i, min(exps), max(exps), lw=0.6, alpha=0.4, color=f"C{i + 1}")
        for e in exps:
            ax.axvline(e, color=f"C{i + 1}", lw=0.5, alpha=0.35)
    seen = edges[:-1][counts > 0]
    if len(seen):
        ax.set_xlim(min(float(seen[0]), -13.0) - 1, max(float(seen[-1]), 1.0) + 1.5)
    ax_g.set_yticks(range(len(GRADIENT_GRIDS)), [g[0] for g in GRADIENT_GRIDS], fontsize=8)
    ax_g.invert_yaxis()
    ax_g.set_xlabel("log2 |s·dY|  (s: the layer's GradScale value)")
    ax_g.grid(axis="x", alpha=0.3)
    return save(fig, path)


def _grouped_bars(ax, series: dict[str, dict[str, float | None]], names: list[str]) -> None:
    """Bars of series[label][name] at x = index of name, one bar per label side by side
    (None: no bar)."""
    width = 0.8 / max(len(series), 1)
    for k, (label, values) in enumerate(series.items()):
        xs, ys = [], []
        for i, name in enumerate(names):
            v = values.get(name)
            if v is not None:
                xs.append(i + (k - (len(series) - 1) / 2) * width)
                ys.append(v)
        ax.bar(xs, ys, width, label=label)


def _bar_figure(names: list[str], panels: int, bars: int):
    size = (min(20, max(8, 0.08 * len(names) * bars + 4)), 2.3 * panels + 1.5)
    fig, axes = plt.subplots(panels, 1, figsize=size, sharex=True, squeeze=False)
    return fig, axes[:, 0]


def _finish_bars(fig, axes, names: list[str], bars: int, title: str, path: str | Path) -> Path:
    axes[0].legend(fontsize=8, ncol=min(bars, 6), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    axes[-1].set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    return save(fig, path)


def plot_sqnr_bars(result: dict, path: str | Path) -> Path:
    """Per-layer SQNR (dB) of each operand from fourbit inspect, one bar per recipe."""
    runs = result["recipes"]
    names: list[str] = []
    for r in runs.values():
        names += [layer["name"] for layer in r["layers"] if layer["name"] not in names]
    points = [p for p in ("W", "B", "A", "G_dx", "G_dw") if any(
        p in layer["operands"] for r in runs.values() for layer in r["layers"])]  # fmt: skip
    fig, axes = _bar_figure(names, len(points), len(runs))
    for ax, point in zip(axes, points, strict=True):
        series = {
            recipe: {layer["name"]: layer["operands"].get(point, {}).get("sqnr_db") for layer in r["layers"]}
            for recipe, r in runs.items()
        }
        _grouped_bars(ax, series, names)
        ax.set_ylabel(f"{point} SQNR (dB)")
    return _finish_bars(
        fig, axes, names, len(runs), f"{result['task']}: SQNR of each GEMM operand, per layer", path
    )


def plot_gradient_fidelity(result: dict, path: str | Path) -> Path:
    """From fourbit inspect: each weight matrix's (or kernel's) gradient against the
    reference's (fp32's, or the recipe's own forward's with float32 gradients) on the same
    batch and weights, SQNR (dB) and cosine, one bar per recipe; in model order, so the
    backward pass runs right to left."""
    runs = result["recipes"]
    names: list[str] = []
    for r in runs.values():
        names += [g["name"] for g in r["gradients"] if g["ndim"] >= 2 and g["name"] not in names]
    fig, axes = _bar_figure(names, 2, len(runs))
    for ax, key, label in zip(axes, ("sqnr_db", "cosine"), ("gradient SQNR (dB)", "cosine"), strict=True):
        series = {recipe: {g["name"]: g[key] for g in r["gradients"]} for recipe, r in runs.items()}
        _grouped_bars(ax, series, names)
        ax.set_ylabel(label)
    own = result.get("gradient_reference") == "own-forward"
    against = "each recipe's own forward with float32 gradients" if own else "fp32"
    title = f"{result['task']}: weight gradients against {against} (same batch, same weights)"
    return _finish_bars(fig, axes, names, len(runs), title, path)


def plot_bn_drift(result: dict, path: str | Path) -> Path:
    """BatchNorm running-statistics drift against the fp32 shadow, over training steps:
    the mean over BN layers (solid) and the largest layer (dashed), per recipe."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, (recipe, r) in enumerate(result["recipes"].items()):
        steps = [rec["step"] for rec in r["records"]]
        for ax, key in zip(axes, ("mean_drift", "var_drift"), strict=True):
            per_layer = [list(rec[key].values()) for rec in r["records"]]
            ax.plot(steps, [sum(v) / len(v) for v in per_layer], color=f"C{k}", label=f"{recipe}, mean")
            peak = [max(v) for v in per_layer]
            ax.plot(steps, peak, color=f"C{k}", ls="--", lw=0.8, label=f"{recipe}, max")
    titles = ("running mean: RMS (μ - μ_fp32) / σ_fp32", "running var: RMS (σ² - σ²_fp32) / σ²_fp32")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['task']}: BatchNorm drift against an fp32 shadow of the same weights", fontsize=11)
    return save(fig, path)
