"""scripts/benchmark_summary.py: draws side by side, and the learned rows against every training-free method at no
more FLOPs (trainers/inference/benchmark_report.py matched_margins) on hand-made results."""

from __future__ import annotations

import csv

import pytest

from scripts import benchmark_summary
from trainers.inference.benchmark_report import learned_family, matched_margins, read_results

FIELDS = ["budget", "kept", "method", "accuracy", "flops", "flops_ratio", "accuracy/count", "accuracy/row_of"]


def write_draw(folder, rows, questions=2000):
    """results.csv with (budget, method, accuracy, flops) rows, the unpruned one first at 1000 FLOPs."""
    folder.mkdir()
    with (folder / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for budget, method, accuracy, flops in [(None, "unpruned", 0.8, 1000), *rows]:
            writer.writerow({"budget": "" if budget is None else budget, "kept": 1, "method": method,
                             "accuracy": accuracy, "flops": flops, "flops_ratio": flops / 1000,
                             "accuracy/count": accuracy, "accuracy/row_of": 0.5})
    if questions:
        (folder / "results.md").write_text(f"backbones/x, float32, {questions} eval questions (synthetic)\n")
    return folder


ROWS = [(0.5, "learned (tome FLOPs)", 0.79, 500), (0.5, "learned (fastv FLOPs)", 0.80, 600),
        (0.5, "learned, no labels (tome FLOPs)", 0.70, 500),
        (0.5, "fastv", 0.78, 600), (0.5, "tome", 0.785, 505), (0.5, "visionzip", 0.795, 499),
        (0.25, "learned (tome FLOPs)", 0.75, 300), (0.25, "tome", 0.70, 300)]


def test_each_training_free_row_meets_the_best_learned_row_at_no_more_flops(tmp_path):
    rows, questions = read_results(write_draw(tmp_path / "d", ROWS))
    assert questions == 2000 and rows[0]["budget"] is None and learned_family(rows[3]["method"]) == "learned, no labels"
    found = {(m["budget"], m["rival"]["method"]): m for m in matched_margins(rows, "learned")}
    # FastV spends 600: both learned rows qualify and the better (fastv FLOPs, 0.80) is its match
    assert found[0.5, "fastv"]["learned"]["method"] == "learned (fastv FLOPs)"
    assert found[0.5, "fastv"]["margin"] == pytest.approx(0.02)
    # ToMe spends 505: only the row at 500 qualifies
    assert found[0.5, "tome"]["learned"]["method"] == "learned (tome FLOPs)"
    assert found[0.5, "tome"]["margin"] == pytest.approx(0.005)
    # VisionZip spends 499, less than every learned row: no match, however accurate the learned rows are
    assert found[0.5, "visionzip"]["learned"] is None and found[0.5, "visionzip"]["margin"] is None
    assert found[0.25, "tome"]["margin"] == pytest.approx(0.05)  # equal FLOPs count as no more
    assert {m["rival"]["method"] for m in matched_margins(rows, "learned, no labels")} == {"fastv", "tome", "visionzip"}


def test_the_script_puts_draws_side_by_side_with_margins_in_questions(tmp_path, capsys):
    one = write_draw(tmp_path / "seed0", ROWS)
    two = write_draw(tmp_path / "seed1", [(0.5, "fastv", 0.60, 600), (0.5, "tome", 0.6, 505)], questions=None)
    assert benchmark_summary.main([str(one), str(two)]) == 0
    out = capsys.readouterr().out
    assert "| fastv | 0.780 / 0.600 | — / — |" in out
    assert "| learned (tome FLOPs) | 0.790 / — | 0.750 / — |" in out
    # the smallest margin of "learned" at 50% is ToMe's (+10 questions of 2000); VisionZip is cheaper than every row;
    # the second draw has no learned rows
    assert "| 50% | learned | +10 (tome) / — | visionzip (49.9%) |" in out
    assert "| 50% | learned, no labels | -170 (tome; count -0.085) / — | visionzip (49.9%) |" in out
    assert "| 25% | learned | +100 (tome) / — | — |" in out and "| 25% | learned, no labels" not in out
    benchmark_summary.main([str(one), "--value", "retained", "--budgets", "0.25"])
    assert "| learned (tome FLOPs) | 93.8% |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        benchmark_summary.main([str(one), str(tmp_path / "nothing")])
    assert "no results.csv in" in capsys.readouterr().err
