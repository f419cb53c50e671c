"""Benchmark runs on several data draws, side by side: accuracy per method and budget, and the learned method against
every training-free method at no more prefill FLOPs.

    python scripts/benchmark_summary.py outputs/benchmark outputs/benchmark-seed1 outputs/benchmark-seed17
    python scripts/benchmark_summary.py outputs/benchmark outputs/benchmark-seed1 --value retained --budgets 0.05

Each folder is the ``--out`` of one scripts/benchmark.py run (its results.csv and results.md). Prints two markdown
tables: every method's accuracy (or retained accuracy) per budget, one figure per draw in the order given; then, per
budget and learned row family ("learned", "learned, no labels", each --variant), its smallest margin over the
training-free methods: for each training-free method, the most accurate row of the family at that budget that spends
no more FLOPs than it, minus that method's accuracy, in questions where results.md names how many (in accuracy
otherwise), and where it loses, the question types where the learned row is below (accuracy difference per type).
A method cheaper than every row of the family is listed apart: nothing learned was measured at its FLOPs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainers.inference.benchmark_report import learned_family, matched_margins, read_results


def pivot(draws: list[list[dict]], value: str, budgets: list[float]) -> str:
    base = [rows[0]["accuracy"] for rows in draws]
    methods = list(dict.fromkeys(row["method"] for rows in draws for row in rows[1:]))
    lines = [f"| method | {' | '.join(f'{b:.0%}' for b in budgets)} |", "|---|" + "---|" * len(budgets),
             f"| unpruned | {' / '.join(f'{b:.3f}' for b in base)} |" + " |" * (len(budgets) - 1)]
    for method in methods:
        cells = []
        for budget in budgets:
            figures = []
            for rows, unpruned in zip(draws, base):
                row = next((r for r in rows if r["method"] == method and r["budget"] == budget), None)
                figures.append("—" if row is None else f"{row['accuracy']:.3f}" if value == "accuracy"
                               else f"{row['accuracy'] / unpruned:.1%}")
            cells.append(" / ".join(figures))
        lines.append(f"| {method} | {' | '.join(cells)} |")
    return "\n".join(lines)


def type_differences(mine: dict, rival: dict) -> dict[str, float]:
    """Accuracy per question type, ``mine`` minus ``rival`` (results.csv's accuracy/<type> columns)."""
    return {key.split("/", 1)[1]: mine[key] - rival[key] for key in mine
            if key.startswith("accuracy/") and key in rival}


def margins(draws: list[tuple[list[dict], int | None]], budgets: list[float]) -> str:
    families = list(dict.fromkeys(learned_family(row["method"]) for rows, _ in draws for row in rows
                                  if learned_family(row["method"]) is not None))
    lines = ["| budget | learned rows | smallest margin over a training-free method at no more FLOPs, per draw "
             "| training-free methods cheaper than every learned row |", "|---|---|---|---|"]
    for budget in budgets:
        for family in families:
            worst, cheaper = [], set()
            for rows, questions in draws:
                if not any(learned_family(r["method"]) == family and r["budget"] == budget for r in rows):
                    worst.append("—")  # not measured on this draw
                    continue
                found = [m for m in matched_margins(rows, family) if m["budget"] == budget]
                cheaper |= {f"{m['rival']['method']} ({m['rival']['flops_ratio']:.1%})" for m in found
                            if m["margin"] is None}
                m = min((m for m in found if m["margin"] is not None), key=lambda m: m["margin"], default=None)
                if m is None:
                    worst.append("none at no more FLOPs")
                    continue
                size = f"{m['margin'] * questions:+.0f}" if questions else f"{m['margin']:+.4f}"
                below = [f"{t} {d:+.3f}" for t, d in type_differences(m["learned"], m["rival"]).items()
                         if d < 0 and m["margin"] < 0]  # where a loss comes from
                worst.append(f"{size} ({m['rival']['method']}{'; ' if below else ''}{', '.join(below)})")
            if any(w != "—" for w in worst):  # else the family was not trained for this budget
                rest = ", ".join(sorted(cheaper)) or "—"
                lines.append(f"| {budget:.0%} | {family} | {' / '.join(worst)} | {rest} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="scripts/benchmark.py --out folders, one per data draw")
    parser.add_argument("--value", choices=["accuracy", "retained"], default="accuracy",
                        help="what the first table shows (retained: accuracy over the unpruned model's, same draw)")
    parser.add_argument("--budgets", type=float, nargs="+", help="only these budgets (default: every one measured)")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not (f / "results.csv").is_file()]
    if missing:
        parser.error(f"no results.csv in {', '.join(missing)}: give the --out folders of scripts/benchmark.py runs")
    draws = [read_results(folder) for folder in args.folders]
    budgets = args.budgets or sorted({r["budget"] for rows, _ in draws for r in rows if r["budget"] is not None},
                                     reverse=True)
    print(f"draws: {', '.join(map(str, args.folders))}\n")
    print(pivot([rows for rows, _ in draws], args.value, budgets))
    print()
    print(margins(draws, budgets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
