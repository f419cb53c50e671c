"""The benchmark's outputs: results.csv, results.md and accuracy_vs_flops.png from its rows.

A row (trainers/inference/benchmark.py ``measure_rows``) holds one method at one budget: accuracy overall and per
question type, prefill FLOPs per sample, the measured prefill seconds and the vision tokens per stage, and, against the
unpruned model's row (the first), the accuracy retained, the FLOPs ratio and the speed-up.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D


def write_csv(rows: list[dict], path: Path) -> None:
    types = sorted({t for row in rows for t in row["accuracy_by_type"]})
    fields = ["budget", "kept", "method", "accuracy", "retained", "flops", "flops_ratio", "prefill_ms", "speedup",
              "mean_vision_tokens", "stages", *(f"accuracy/{t}" for t in types)]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({"budget": "" if row["budget"] is None else row["budget"], "kept": f"{row['kept']:g}",
                             "method": row["method"], "accuracy": f"{row['accuracy']:.4f}",
                             "retained": f"{row['retained']:.4f}", "flops": f"{row['flops']:.0f}",
                             "flops_ratio": f"{row['flops_ratio']:.4f}", "prefill_ms": f"{row['prefill_s'] * 1e3:.2f}",
                             "speedup": f"{row['speedup']:.3f}", "mean_vision_tokens": f"{row['mean_vision_tokens']:.2f}",
                             "stages": row["stages"],
                             **{f"accuracy/{t}": f"{row['accuracy_by_type'].get(t, float('nan')):.4f}" for t in types}})


def markdown_table(rows: list[dict], num_tokens: int) -> str:
    lines = ["| budget | method | vision tokens: LLM input → after each pruning layer | mean vision tokens per layer "
             "| accuracy | retained | prefill FLOPs vs unpruned | prefill ms | prefill speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        budget = "—" if row["budget"] is None else f"{row['kept']:g} / {num_tokens} ({row['budget']:.0%})"
        lines.append(f"| {budget} | {row['method']} | {row['stages']} | {row['mean_vision_tokens']:.1f} "
                     f"| {row['accuracy']:.3f} | {row['retained']:.1%} | {row['flops_ratio']:.1%} "
                     f"| {row['prefill_s'] * 1e3:.1f} | {row['speedup']:.2f}x |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy against FLOPs and against measured prefill time: one line per method, one marker per budget."""
    budgets = sorted({row["budget"] for row in rows[1:]}, reverse=True)
    markers = dict(zip(budgets, "osD^v<>ph"))
    fig = Figure(figsize=(12, 4.8))  # no pyplot: no global figure state, no display backend
    axes = fig.subplots(1, 2, sharey=True)
    base = rows[0]
    for ax, key, scale, label in ((axes[0], "flops_ratio", 100, "LLM prefill FLOPs, % of unpruned"),
                                  (axes[1], "prefill_s", 1e3, "measured prefill time, ms (median)")):
        for method in dict.fromkeys(row["method"] for row in rows[1:]):
            points = sorted((row[key] * scale, row["accuracy"], row["budget"]) for row in rows if row["method"] == method)
            style = dict(linestyle="--", color="grey") if method == "random" else {}
            line, = ax.plot([p[0] for p in points], [p[1] for p in points], label=method,
                            linewidth=2.5 if method.startswith("learned") else 1.2, **style)
            for x, y, budget in points:
                ax.plot(x, y, marker=markers[budget], color=line.get_color(), linestyle="none")
        ax.plot([base[key] * scale], [base["accuracy"]], marker="*", markersize=14, color="black", linestyle="none",
                label="unpruned")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (eval split)")
    budget_keys = [Line2D([], [], marker=markers[b], color="black", linestyle="none", label=f"keep {b:.0%}")
                   for b in budgets]
    axes[0].legend(handles=budget_keys, loc="lower right", fontsize=8, title="budget", title_fontsize=8)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def write_report(rows: list[dict], out: Path, num_tokens: int, header: str, notes: str, plot_title: str) -> str:
    """results.md (``header``, the table, ``notes``), results.csv and accuracy_vs_flops.png in ``out``; returns the
    markdown."""
    out.mkdir(parents=True, exist_ok=True)
    markdown = f"{header}\n\n{markdown_table(rows, num_tokens)}\n{notes}"
    (out / "results.md").write_text(markdown)
    write_csv(rows, out / "results.csv")
    plot(rows, out / "accuracy_vs_flops.png", plot_title)
    return markdown


# ------------------------------------------------------------------------------------- reading results back, compared
def read_results(out: Path) -> tuple[list[dict], int | None]:
    """The rows of ``out/results.csv`` (budget None for the unpruned row; FLOPs and every accuracy column, overall
    and per question type, as floats) and the number of eval questions its results.md names in the header
    trainers/inference/benchmark.header writes (None when it names none)."""
    numbers = ("flops", "flops_ratio")
    with (out / "results.csv").open(newline="") as f:
        rows = [{**row, "budget": float(row["budget"]) if row["budget"] else None,
                 **{k: float(v) for k, v in row.items() if k in numbers or k.startswith("accuracy")}}
                for row in csv.DictReader(f)]
    report = out / "results.md"
    found = re.search(r"(\d+) eval questions", report.read_text()) if report.exists() else None
    return rows, int(found.group(1)) if found else None


def learned_family(method: str) -> str | None:
    """'learned, no labels (tome FLOPs)' -> 'learned, no labels' (the row names of trainers/inference/benchmark.py
    LearnedRun.name); None for a training-free method."""
    return re.sub(r" \(\w+ FLOPs\)$", "", method) if method.startswith("learned") else None


def matched_margins(rows: list[dict], family: str) -> list[dict]:
    """For each training-free row at each budget: the most accurate row of the learned ``family`` at that budget that
    spends no more prefill FLOPs, and its margin (accuracy difference; None where every row of the family spends
    more, ``learned`` then None)."""
    found = []
    for rival in rows:
        if rival["budget"] is None or learned_family(rival["method"]) is not None:
            continue
        mine = [r for r in rows if r["budget"] == rival["budget"] and learned_family(r["method"]) == family
                and r["flops"] <= rival["flops"]]
        best = max(mine, key=lambda r: r["accuracy"], default=None)
        found.append({"budget": rival["budget"], "rival": rival, "learned": best,
                      "margin": None if best is None else best["accuracy"] - rival["accuracy"]})
    return found
