"""The `fourbit` command line."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fourbit import formats
from fourbit.formats import BlockFormat, LogFormat


def format_rows() -> list[dict]:
    """One row per named format: what `fourbit formats` prints."""
    rows = []
    for name in formats.names():
        fmt = formats.get(name)
        lo, hi = fmt.min_positive(), fmt.max_value()
        bits = f"{fmt.bits}"
        note = ""
        if isinstance(fmt, BlockFormat):
            bits = f"{fmt.bits + 8 / fmt.block_size:g}"
            note = f"e2m1 x {fmt.scale_format} scale per {fmt.block_size}; range is per block"
        elif isinstance(fmt, LogFormat):
            note = f"radix {fmt.radix}; phase 1 = grid x 2"
        rows.append(
            {
                "name": name,
                "bits": bits,
                "values": len(fmt.values()),
                "min_positive": lo,
                "max": hi,
                "binades": math.log2(hi / lo),
                "note": note,
            }
        )
    return rows


def cmd_formats(args) -> int:
    header = f"{'format':<12}{'bits':>6}{'values':>8}{'min positive':>14}{'max':>12}{'binades':>9}  note"
    print(header)
    print("-" * len(header))
    for r in format_rows():
        print(
            f"{r['name']:<12}{r['bits']:>6}{r['values']:>8}{r['min_positive']:>14.4g}"
            f"{r['max']:>12.4g}{r['binades']:>9.1f}  {r['note']}"
        )
    if args.plot:
        from fourbit.plots import plot_grids

        print(f"wrote {plot_grids(args.plot)}")
    return 0


def cmd_pixels(args) -> int:
    import torch

    from fourbit.plots import plot_pixels
    from fourbit.tasks.idx import FASHION_MNIST_CLASSES, load_idx_split

    images, labels = load_idx_split(args.data_dir, "test")
    if not 0 <= args.index < len(images):
        raise ValueError(f"--index must be in 0 ... {len(images) - 1}; got {args.index}")
    picks = [args.index + i for i in range(args.count) if args.index + i < len(images)]
    titles = [FASHION_MNIST_CLASSES[int(labels[i])] for i in picks]
    out = plot_pixels(images[torch.tensor(picks)], titles, args.out)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fourbit", description="Train neural networks with 4-bit numbers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("formats", help="table of every number format (and a plot of the 4-bit grids)")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="draw every 4-bit grid on a log axis")
    p.set_defaults(func=cmd_formats)

    p = sub.add_parser("pixels", help="Fashion-MNIST images beside their 4-bit versions")
    p.add_argument("--out", type=Path, default=Path("pixels.png"), metavar="FILE.png")
    p.add_argument("--index", type=int, default=0, help="first test image to draw")
    p.add_argument("--count", type=int, default=3, help="how many images (rows)")
    p.add_argument("--data-dir", type=Path, default=None, help="directory with the IDX files")
    p.set_defaults(func=cmd_pixels)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fourbit.tasks.idx import DataError

    try:
        return args.func(args)
    except (ValueError, DataError) as e:
        print(f"fourbit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
