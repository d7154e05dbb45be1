"""Markdown tables of the finished runs under results/ (what `scripts/results.sh collect` copied),
for docs/RESULTS.md: one table per experiment, recipes in the presets' order; and each
experiment's curves of every finished run, results/NAME/curves.png.

    python scripts/results_tables.py [results/r20-headline ...]    (default: every experiment)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fourbit import recipes
from fourbit.cli import compare_table
from fourbit.plots import plot_curves


def _order(recipe: str) -> int:
    names = recipes.names()
    return names.index(recipe) if recipe in names else len(names)


def _summaries(experiment: Path) -> list[dict]:
    summaries = [json.loads(p.read_text()) for p in experiment.glob("*/summary.json")]
    return sorted(summaries, key=lambda s: _order(s["recipe"]))


def curves(experiment: Path) -> Path | None:
    """results/NAME/curves.png: every finished run's test metric and loss by epoch."""
    summaries = _summaries(experiment)
    if not summaries:
        return None
    histories = {
        s["recipe"]: [
            json.loads(line) for line in (experiment / s["recipe"] / "metrics.jsonl").read_text().splitlines()
        ]
        for s in summaries
    }
    return plot_curves(histories, summaries[0]["metric_name"], experiment / "curves.png")


def table(experiment: Path) -> str:
    summaries = _summaries(experiment)
    if not summaries:
        return f"(no finished run in {experiment})\n"
    first = summaries[0]
    lines = [
        f"**{experiment.name}** — task {first['task']}, seed {first['seed']}, {first['epochs']} epochs, "
        f"train limit {first['train_limit']}, test limit {first['test_limit']}, lr {first['lr']:g}"
        # summaries before commit cab5461 lack the optimizer: it was always the task's
        f"{', optimizer ' + first['optimizer'] if 'optimizer' in first else ''}\n",
        compare_table(summaries, times=False),  # runs shared the machine: cost is in the bench table
        "| recipe | wall time | mean epoch time | threads | skipped steps | commit |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        commit = ", ".join((c or "unrecorded")[:12] for c in s.get("commits", [None]))
        threads = ", ".join(str(t or "unrecorded") for t in s.get("torch_threads", [None]))
        lines.append(
            f"| {s['recipe']} | {s['wall_time_s'] / 60:.0f} min | {s['epoch_time_s']:.0f} s | {threads} "
            f"| {s['skipped_steps']} | {commit} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    experiments = [Path(a) for a in argv] or sorted(p for p in Path("results").iterdir() if p.is_dir())
    print("\n".join(table(e) for e in experiments))
    for e in experiments:
        curves(e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
