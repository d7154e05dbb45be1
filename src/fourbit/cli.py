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


def _run_config(args, recipe: str):
    from fourbit import distributed
    from fourbit.train import RunConfig

    nproc = vars(args).get("nproc") or 1  # bn-drift has no --nproc
    if distributed.world_size() > 1:  # started by torchrun (main joined its process group)
        if vars(args).get("nproc") not in (None, distributed.world_size()):
            raise ValueError(f"--nproc {nproc}, but torchrun started {distributed.world_size()} processes")
        nproc = distributed.world_size()
    return RunConfig(
        task=args.task,
        recipe=recipe,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        data_dir=str(args.data_dir) if args.data_dir else None,
        checkpoint_every=args.checkpoint_every,
        max_skipped_steps=args.max_skipped_steps,
        nproc=nproc,
        grad_comm=vars(args).get("grad_comm", "fp32"),
        optimizer=args.optimizer,
    )


def cmd_train(args) -> int:
    from fourbit import distributed
    from fourbit.train import train

    out = args.out or Path("runs") / f"{args.task}-{args.recipe}"
    s = train(_run_config(args, args.recipe), out, resume=args.resume, progress=not args.quiet)
    if distributed.is_main():  # (torchrun's other ranks)
        print(f"{s['task']} {s['recipe']}: {s['metric_name']} {s['metric']:.3f} ({out})")
    return 0


def compare_table(summaries: list[dict], times: bool = True, intervals: list[dict] | None = None) -> str:
    """Markdown in the paper's style: recipe, metric, Δ vs the first recipe, Δ vs fp16 (when
    fp16 is among them and not first), time per epoch relative to the first (unless not
    `times`: runs timed under different loads or thread counts do not compare). `intervals`:
    one `tasks.bootstrap` result per summary (after the first, paired with the first's),
    written after the metric and its Δ vs the first recipe."""
    base = summaries[0]
    name = base["metric_name"]
    fp16 = next((s for s in summaries[1:] if s["recipe"] == "fp16"), None)
    refs = [base] + ([fp16] if fp16 else [])
    deltas = " | ".join(f"Δ vs {r['recipe']}" for r in refs)
    time_column = f" time per epoch vs {base['recipe']} |" if times else ""
    lines = [f"| recipe | {name} | {deltas} |{time_column}", "|---|---|" + "---|" * (len(refs) + times)]
    for i, s in enumerate(summaries):
        metric = f"{s['metric']:.2f}"
        delta = [f"{s['metric'] - r['metric']:+.2f}" for r in refs]
        if intervals is not None:
            b = intervals[i]
            metric += f" [{b['low']:.2f}, {b['high']:.2f}]"
            if "delta" in b:
                delta[0] += f" [{b['delta_low']:+.2f}, {b['delta_high']:+.2f}]"
        ratio = f" {s['epoch_time_s'] / base['epoch_time_s']:.2f}× |" if times else ""
        lines.append(f"| {s['recipe']} | {metric} | {' | '.join(delta)} |{ratio}")
    return "\n".join(lines) + "\n"


def compare_intervals(task_name: str, out: Path, summaries: list[dict]) -> list[dict] | None:
    """Bootstrap intervals for `compare_table` from the runs' kept test counts (paired with the
    first run's: a compare scores every recipe on the same examples); None when a run has none."""
    from fourbit import tasks
    from fourbit.train import load_test_counts

    counts = [load_test_counts(out / s["recipe"], s["epochs"]) for s in summaries]
    if any(c is None for c in counts) or len({tuple(c.shape) for c in counts}) != 1:
        return None
    task = tasks.get(task_name)
    return [tasks.bootstrap(task, c, None if i == 0 else counts[0]) for i, c in enumerate(counts)]


def cmd_compare(args) -> int:
    import json

    from fourbit import distributed
    from fourbit.io import atomic_write
    from fourbit.plots import plot_curves
    from fourbit.train import train

    names = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not names:
        raise ValueError("--recipes needs at least one recipe name, e.g. fp32,ibm4")
    configs = [_run_config(args, r) for r in names]  # validates every name before training
    out = args.out or Path("runs") / f"compare-{args.task}"
    summaries, histories = [], {}
    for cfg in configs:
        summaries.append(train(cfg, out / cfg.recipe, resume=args.resume, progress=not args.quiet))
        lines = (out / cfg.recipe / "metrics.jsonl").read_text().splitlines()
        histories[cfg.recipe] = [json.loads(line) for line in lines]
    if not distributed.is_main():  # (torchrun's other ranks)
        return 0
    intervals = compare_intervals(args.task, out, summaries)
    table = compare_table(summaries, intervals=intervals)
    header = (
        f"# {args.task}: {', '.join(names)}\n\nSame seed ({args.seed}) and data order for every recipe; "
        f"{summaries[0]['epochs']} epochs, train limit {summaries[0]['train_limit']}."
    )
    if intervals is not None:
        header += (
            f" In brackets: 95 % bootstrap intervals over the test examples ({intervals[0]['resamples']} "
            f"draws); the Δ vs {names[0]}'s are paired."
        )
    header += "\n\n"
    atomic_write(out / "compare.md", lambda tmp: tmp.write_text(header + table))
    plot = plot_curves(histories, summaries[0]["metric_name"], out / "compare.png")
    print(table)
    print(f"wrote {out / 'compare.md'} and {plot}")
    return 0


def cmd_tasks(args) -> int:
    from fourbit import tasks

    for name in tasks.names():
        task = tasks.get(name)
        status = task.data_status(args.data_dir)
        print(f"{name:<24}{task.metric_name:<20}{'data installed' if status is None else status}")
    return 0


def cmd_bench(args) -> int:
    import json

    from fourbit import bench
    from fourbit.io import atomic_write

    recipes_ = [r.strip() for r in args.recipes.split(",") if r.strip()]
    task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    result = bench.run(task_names, recipes_, args.steps, args.numel)
    print(bench.format_report(result))
    if args.json:
        atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
        print(f"wrote {args.json}")
    return 0


def _recipe_names(text: str) -> list[str]:
    names = [r.strip() for r in text.split(",") if r.strip()]
    if not names:
        raise ValueError("name at least one recipe, e.g. fp32,ibm4")
    return names


def _task_names() -> list[str]:
    from fourbit import tasks

    return tasks.names()


def cmd_evaluate(args) -> int:
    import json

    from fourbit import telemetry
    from fourbit.io import atomic_write

    forwards = args.forwards or ["own", "fp32"]
    result = telemetry.evaluate_as(args.run, forwards, True, args.recalibrate, args.baseline, args.bootstrap)
    if args.json:
        atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
        print(f"wrote {args.json}")
    return 0


def cmd_inspect(args) -> int:
    import json

    from fourbit import telemetry
    from fourbit.io import atomic_write
    from fourbit.plots import plot_gradient_fidelity, plot_gradient_histogram, plot_sqnr_bars

    names = _recipe_names(args.recipes or args.recipe)
    out = args.out or Path("runs") / f"inspect-{args.task}"
    data_dir = str(args.data_dir) if args.data_dir else None
    run_settings = {"--seed": args.seed, "--batch-size": args.batch_size, "--train-limit": args.train_limit,
                    "--data-dir": data_dir}  # fmt: skip
    given = [flag for flag, v in run_settings.items() if v is not None]
    if args.runs is not None and given:
        raise ValueError(f"--from takes each run's settings from its checkpoint; drop {', '.join(given)}")
    result = telemetry.inspect(
        args.task, names, args.steps, args.seed or 0, args.batch_size, args.train_limit, data_dir, out,
        progress=not args.quiet, runs=args.runs, reference=args.gradient_reference,
    )  # fmt: skip
    print(telemetry.format_report(result))
    atomic_write(out / "inspect.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    written = [out / "inspect.json", plot_sqnr_bars(result, out / "sqnr.png")]
    written.append(plot_gradient_fidelity(result, out / "gradients.png"))
    # the gradient histogram: of the first recipe that quantizes gradients (fp32 does not)
    for recipe, r in result["recipes"].items():
        with_grads = [layer for layer in r["layers"] if "grad_hist" in layer]
        if not with_grads:
            continue
        pick = [la for la in with_grads if la["name"] == args.layer] if args.layer else []
        if args.layer and not pick:
            raise ValueError(f"--layer {args.layer!r} is not a quantized layer of {recipe}")
        layer = pick[0] if pick else with_grads[len(with_grads) // 2]
        title = f"{args.task} / {recipe}: gradient of {layer['name']}, {r['steps']} steps"
        written.append(plot_gradient_histogram(layer, title, out / "grad_hist.png"))
        break
    print("wrote " + ", ".join(map(str, written)))
    return 0


def cmd_bn_drift(args) -> int:
    import json

    from fourbit import telemetry
    from fourbit.io import atomic_write
    from fourbit.plots import plot_bn_drift

    if args.resume:
        raise ValueError("bn-drift starts afresh: its fp32 shadow is not in a checkpoint (drop --resume)")
    configs = [_run_config(args, r) for r in _recipe_names(args.recipes)]
    out = args.out or Path("runs") / f"bn-drift-{args.task}"
    result = telemetry.bn_drift(configs, out, args.every, progress=not args.quiet)
    atomic_write(out / "bn_drift.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    for recipe, r in result["recipes"].items():
        last = r["records"][-1]
        mean = sum(last["mean_drift"].values()) / len(last["mean_drift"])
        var = sum(last["var_drift"].values()) / len(last["var_drift"])
        print(
            f"{recipe}: after {last['step']} steps, mean drift {mean:.4f}, var drift {var:.4f} "
            f"(averaged over BN layers); {r['metric_name']} {r['metric']:.2f}"
        )
    print(f"wrote {out / 'bn_drift.json'} and {plot_bn_drift(result, out / 'bn_drift.png')}")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    from fourbit import tasks

    p.add_argument("--task", required=True, choices=tasks.names())
    p.add_argument("--epochs", type=int, help="default: the task's")
    p.add_argument("--batch-size", type=int, help="default: the task's")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the task's)")
    p.add_argument(
        "--optimizer",
        choices=tasks.OPTIMIZERS,
        help="sgd (Nesterov momentum 0.9) or adam (AdamW); default: the task's. Another than the "
        "task's needs --lr",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, metavar="N", help="train on the first N of a fixed shuffle")
    p.add_argument("--test-limit", type=int, metavar="N", help="evaluate on the first N of a fixed shuffle")
    p.add_argument(
        "--data-dir", type=Path, help="a directory with the task's data (default: Debian packages)"
    )
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="N",
        help="also checkpoint every N steps (default: each epoch)",
    )
    p.add_argument(
        "--max-skipped-steps",
        type=int,
        default=20,
        metavar="K",
        help="stop after K steps in a row skipped for a non-finite loss or gradient (default: 20)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_distributed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N processes with DistributedDataParallel, --batch-size split between them "
        "(default 1; under torchrun, its number of processes)",
    )
    p.add_argument(
        "--grad-comm",
        choices=("fp32", "fp4"),
        default="fp32",
        help="how the processes exchange gradients: DDP's fp32 all-reduce, or radix-4 FP4 codes "
        "with error feedback (about 1/8 of the bytes)",
    )


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

    p = sub.add_parser("train", help="train one task under one recipe")
    p.add_argument("--recipe", required=True, help="a recipe name (fourbit.recipes.names())")
    _add_run_options(p)
    _add_distributed_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="train one task under several recipes, same seed and data order")
    p.add_argument("--recipes", required=True, help="comma-separated recipe names, the first is the baseline")
    _add_run_options(p)
    _add_distributed_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="step time, quantizer bandwidth and saved bytes vs fp32")
    p.add_argument("--tasks", default="fashion-resnet20,speech-bilstm,translate-transformer")
    p.add_argument("--recipes", default="ibm4,luq4,mxfp4,nvfp4", help="compared with fp32")
    p.add_argument("--steps", type=int, default=10, help="timed steps per recipe (after 2 warm-up)")
    p.add_argument("--numel", type=int, default=16 * 2**20, help="elements of the quantizer tensor")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("inspect", help="per-layer, per-operand quantization telemetry over a few steps")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--recipe", help="a recipe name")
    which.add_argument("--recipes", help="comma-separated recipe names, compared side by side")
    p.add_argument("--task", required=True, choices=_task_names())
    p.add_argument("--steps", type=int, default=10, help="training steps recorded (default: 10)")
    p.add_argument("--batch-size", type=int, help="default: the task's")
    p.add_argument("--seed", type=int, help="default: 0")
    p.add_argument("--train-limit", type=int, metavar="N", help="train on the first N of a fixed shuffle")
    p.add_argument("--data-dir", type=Path, help="a directory with the task's data")
    p.add_argument(
        "--from", dest="runs", type=Path, metavar="DIR",
        help="a `fourbit compare --out` folder: record each recipe's next steps from "
        "DIR/RECIPE/checkpoint.pt (its weights, optimizer and place in the data), not the first ones",
    )  # fmt: skip
    p.add_argument(
        "--gradient-reference", choices=["fp32", "own-forward"], default="fp32",
        help="what the weight gradients are compared against: an fp32 copy of the model "
        "(default), or the recipe's own forward with float32 gradients (the gradient "
        "quantizers' error alone, as wanted near convergence)",
    )  # fmt: skip
    p.add_argument("--layer", help="the layer whose gradient histogram is drawn (default: a middle one)")
    p.add_argument("--out", type=Path, help="output directory (default: runs/inspect-TASK)")
    p.add_argument("--quiet", action="store_true", help="no per-step lines")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("evaluate", help="a trained run's test metrics under other recipes' forwards")
    p.add_argument(
        "run", type=Path,
        help="the run's folder, holding checkpoint.pt (a `fourbit train --out`, or DIR/RECIPE "
        "of a `fourbit compare --out DIR`)",
    )  # fmt: skip
    p.add_argument(
        "--as", dest="forwards", action="append", metavar="FORWARD",
        help="a recipe, or RECIPE:GLOB=RECIPE[,GLOB=RECIPE...] giving the layers whose names match "
        "GLOB another recipe ('own': the run's recipe); repeat for several (default: own and fp32)",
    )  # fmt: skip
    p.add_argument(
        "--recalibrate", type=int, default=0, metavar="N",
        help="re-estimate every BatchNorm's running statistics under each forward over the first "
        "N training batches before scoring (the run's were gathered under its own forward)",
    )  # fmt: skip
    p.add_argument(
        "--baseline", type=Path, metavar="RUN",
        help="another run of the task (say the fp32 one), scored under its own recipe on the same "
        "test examples; every forward's difference is then taken to it, not to the first forward",
    )  # fmt: skip
    p.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N",
        help="bootstrap draws of the test examples for each metric's 95%% interval and each "
        "difference's paired one (0: none)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bn-drift", help="BatchNorm running statistics against an fp32 shadow, over training")
    p.add_argument("--recipes", default="ibm4,ibm4-notpr", help="comma-separated recipe names")
    p.add_argument("--every", type=int, default=10, help="record the drift every N steps (default: 10)")
    _add_run_options(p)
    p.set_defaults(func=cmd_bn_drift)

    p = sub.add_parser("tasks", help="list the tasks and whether their data is installed")
    p.add_argument("--data-dir", type=Path)
    p.set_defaults(func=cmd_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad arguments or data, 3 too many non-finite steps in a row,
    130 / 143 stopped by SIGINT / SIGTERM (a checkpoint to --resume from is saved)."""
    args = build_parser().parse_args(argv)
    from fourbit import distributed
    from fourbit.tasks.idx import DataError
    from fourbit.train import RunStopped

    joined = args.command in ("train", "compare") and distributed.from_torchrun()
    if joined:  # `torchrun ... -m fourbit train`: this process is one rank
        distributed.init()
    try:
        return args.func(args)
    except (ValueError, DataError) as e:
        print(f"fourbit: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"fourbit: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if joined:
            import torch.distributed

            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
