"""scripts/benchmark.py: schedules, bad input, and one end-to-end run on the random tiny backbone."""

import csv

import pytest
import yaml

from models.layer_pruner import stage_budgets
from scripts import benchmark

TINY = {
    "method_settings.pruning_layers": "[1,2,3]", "method_settings.pruner_d_internal": 16,
    "method_settings.merger_d_internal": 16, "method_settings.discriminator_hidden": 16,
    "trainer_settings.dl_settings.batch_size": 4, "trainer_settings.eval_every": 2,
    "trainer_settings.save_every": 2, "trainer_settings.max_steps": 2,
    "data_settings.synthetic_train_size": 8, "data_settings.synthetic_eval_size": 6,
    "data_settings.eval_batch_size": 3, "data_settings.max_new_tokens": 2,
}


def bench_args(tmp_path, folder, *extra):
    args = ["--config", "configs/tiny.yaml", "--out", str(tmp_path / "bench"), "--learned-root", str(tmp_path / "bench"),
            "--repeats", "1", "--timing-batch", "2"]
    for key, value in {**TINY, "backbone_settings.name_or_path": folder}.items():
        args += ["--set", f"{key}={value}"]
    return [*args, *extra]


@pytest.mark.parametrize("keep, stages, merged", [(36, 3, 72), (72, 3, 144), (16, 3, 32), (29, 3, 58), (36, 1, 72)])
def test_learned_schedule_ends_at_the_budget(keep, stages, merged):
    got_merged, ratios = benchmark.learned_schedule(144, keep, stages)
    assert got_merged == merged and len(ratios) == stages
    assert stage_budgets(merged, ratios)[-1] == keep
    assert benchmark.learned_schedule(144, keep, 0) == (keep, [])


def test_missing_checkpoints_and_bad_budgets_are_named_with_their_fix(tmp_path, tiny_folder, capsys):
    assert benchmark.main(bench_args(tmp_path, tiny_folder, "--budgets", "0.25", "0.001", "0.2")) == 2
    err = capsys.readouterr().err
    assert "budget 0.001 keeps 0 of 144 vision tokens; the smallest budget that keeps one is 0.0069" in err
    assert "pooling at budget 0.2: spatial pooling cannot keep 29 tokens" in err and "28 or 30" in err
    assert f"no learned checkpoint for the 25% budget in {tmp_path / 'bench' / 'learned_25'}/checkpoints" in err
    assert ("--set method_settings.merge_budget=fixed --set method_settings.target_merge_tokens=72 "
            "--set method_settings.merge_ratio=0.5") in err
    assert "--train-missing" in err
    assert not (tmp_path / "bench" / "results.csv").exists()  # nothing ran


def test_fastv_layer_outside_the_backbone_is_refused(tmp_path, tiny_folder, capsys):
    assert benchmark.main(bench_args(tmp_path, tiny_folder, "--methods", "fastv", "--fastv-layer", "4")) == 2
    assert "FastV's layer K=4 is outside 1..3" in capsys.readouterr().err


def test_benchmark_trains_the_missing_run_and_writes_table_and_plot(tmp_path, tiny_folder, capsys):
    args = bench_args(tmp_path, tiny_folder, "--budgets", "0.25", "--train-missing")
    assert benchmark.main(args) == 0
    out = tmp_path / "bench"
    assert (out / "learned_25" / "checkpoints" / "training_state_step_2.pt").exists()
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["unpruned", *benchmark.METHODS]
    assert [int(r["kept"]) for r in rows] == [144] + [36] * len(benchmark.METHODS)
    by_method = {r["method"]: r for r in rows}
    assert by_method["learned"]["stages"] == "72 → 57 → 45 → 36 (L1, L2, L3)"
    assert by_method["fastv"]["stages"] == "144 → 36 (L2)"
    assert by_method["pyramiddrop"]["stages"] == "144 → 91 → 57 → 36 (L1, L2, L3)"
    assert by_method["tome"]["stages"] == "36"
    assert float(by_method["unpruned"]["flops_ratio"]) == 1.0
    assert all(0 < float(r["flops_ratio"]) < 1 for r in rows[1:])
    assert (out / "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 36 / 144 (25%) | learned | 72 → 57 → 45 → 36 (L1, L2, L3) |" in (out / "results.md").read_text()

    # a second run uses the checkpoint, unless the training data (or the backbone) changed since
    capsys.readouterr()
    again = bench_args(tmp_path, tiny_folder, "--budgets", "0.25", "--methods", "learned", "--limit", "3")
    assert benchmark.main(again) == 0
    assert benchmark.main([*again, "--set", "data_settings.seed=1"]) == 2
    assert "trained on other backbone weights or other training data" in capsys.readouterr().err


def test_searched_schedule_stays_under_tomes_flops_and_is_reported(tmp_path, tiny_folder, capsys):
    args = bench_args(tmp_path, tiny_folder, "--budgets", "0.5", "--methods", "learned", "tome", "--train-missing",
                      "--search", "3", "--set", "manager_settings.cpu_workers=1")
    assert benchmark.main(args) == 0
    folder = tmp_path / "bench" / "searched_50"
    best = folder / "search" / "optuna" / "schedule_50" / "best_config.yaml"
    assert best.exists() and (folder / "run" / "checkpoints").is_dir()
    with (tmp_path / "bench" / "results.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"unpruned", "learned", benchmark.SEARCHED, "tome"}
    cap = yaml.safe_load((folder / "search_config.yaml").read_text())["search_settings"]["flops_budget"]
    assert float(rows[benchmark.SEARCHED]["flops_ratio"]) <= float(rows["tome"]["flops_ratio"]) + 0.01
    assert cap == pytest.approx(float(rows["tome"]["flops_ratio"]), abs=0.01)

    # the schedule found here, trained on another draw of the data without searching again
    other = tmp_path / "seed1"
    again = [a if a != str(tmp_path / "bench") else str(other) for a in args]
    again = [a for a in again if a not in ("--search", "3")] + ["--schedules-from", str(tmp_path / "bench"),
                                                                "--set", "data_settings.seed=1"]
    assert benchmark.main(again) == 0
    assert not (other / "searched_50" / "search").exists()
    schedule = yaml.safe_load((other / "searched_50" / "best_schedule.yaml").read_text())
    assert schedule["method_settings"] == yaml.safe_load((folder / "best_schedule.yaml").read_text())["method_settings"]
    assert schedule["data_settings"]["seed"] == 1
    capsys.readouterr()
    fresh = [a if a != str(other) else str(tmp_path / "fresh") for a in again[:-4]]
    assert benchmark.main([*fresh, "--schedules-from", str(tmp_path / "nowhere")]) == 2
    assert "--schedules-from: no searched schedule" in capsys.readouterr().err
