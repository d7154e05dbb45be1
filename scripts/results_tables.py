"""Markdown tables of the finished runs under results/ (what `scripts/results.sh collect` copied),
for docs/RESULTS.md: one table per experiment, recipes in the presets' order.

    python scripts/results_tables.py [results/r20-headline ...]    (default: every experiment)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fourbit import recipes
from fourbit.cli import compare_table


def _order(recipe: str) -> int:
    names = recipes.names()
    return names.index(recipe) if recipe in names else len(names)


def table(experiment: Path) -> str:
    summaries = [json.loads(p.read_text()) for p in experiment.glob("*/summary.json")]
    if not summaries:
        return f"(no finished run in {experiment})\n"
    summaries.sort(key=lambda s: _order(s["recipe"]))
    first = summaries[0]
    lines = [
        f"**{experiment.name}** — task {first['task']}, seed {first['seed']}, {first['epochs']} epochs, "
        f"train limit {first['train_limit']}, test limit {first['test_limit']}\n",
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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
