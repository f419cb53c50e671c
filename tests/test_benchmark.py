"""trainers/inference/benchmark.py through scripts/benchmark.py: bad input, and end-to-end runs on the random tiny
backbone (the learned runs trained, searched and reported)."""

import csv

import pytest
import yaml

from models.llava_backbone import LlavaBackbone
from scripts import benchmark
from trainers.checkpoint import Checkpointer
from trainers.inference.benchmark import METHODS, SEARCHED, reported_state

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


def test_a_learned_run_is_reported_at_its_best_evaluation_unless_final_is_asked(tmp_path):
    run = Checkpointer(tmp_path / "run", keep_last=1)
    run.save(2, {}, {"step": 2}, tag="best")
    run.save(4, {}, {"step": 4})
    assert reported_state(run.folder, best=True).name == "training_state_best.pt"
    assert reported_state(run.folder, best=False).name == "training_state_step_4.pt"
    never_evaluated = Checkpointer(tmp_path / "other", keep_last=1)
    never_evaluated.save(4, {}, {"step": 4})
    assert reported_state(never_evaluated.folder, best=True).name == "training_state_step_4.pt"


def test_bad_budgets_are_named_with_their_fix_before_any_weights_load(tmp_path, tiny_folder, capsys, monkeypatch):
    monkeypatch.setattr(LlavaBackbone, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    assert benchmark.main(bench_args(tmp_path, tiny_folder, "--budgets", "0.25", "0.001", "0.2",
                                     "--stage-keep", "1.5")) == 2
    err = capsys.readouterr().err
    assert "--stage-keep 1.5: a stage keeps a share of its tokens in (0, 1]" in err
    assert "budget 0.001 keeps 0 of 144 vision tokens; the smallest budget that keeps one is 0.0069" in err
    assert "pooling at budget 0.2: spatial pooling cannot keep 29 tokens" in err and "28 or 30" in err
    assert not (tmp_path / "bench" / "results.csv").exists()  # nothing ran


@pytest.mark.slow
def test_missing_learned_runs_are_named_with_the_command_that_trains_them(tmp_path, tiny_folder, capsys):
    assert benchmark.main(bench_args(tmp_path, tiny_folder, "--budgets", "0.25", "--methods", "learned")) == 2
    err = capsys.readouterr().err
    for match in ("tome", "fastv"):
        assert (f"no learned checkpoint for the 25% budget at {match}'s FLOPs in "
                f"{tmp_path / 'bench' / f'learned_25_{match}'}/checkpoints") in err
    assert "--set method_settings.merge_budget=fixed --set method_settings.target_merge_tokens=" in err
    assert "--train-missing" in err
    assert not (tmp_path / "bench" / "results.csv").exists()


def test_fastv_layer_outside_the_backbone_is_refused(tmp_path, tiny_folder, capsys):
    assert benchmark.main(bench_args(tmp_path, tiny_folder, "--methods", "fastv", "--fastv-layer", "4")) == 2
    assert "FastV's layer K=4 is outside 1..3" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_trains_the_missing_runs_within_their_flops_and_writes_table_and_plot(tmp_path, tiny_folder, capsys):
    args = bench_args(tmp_path, tiny_folder, "--budgets", "0.25", "--train-missing")
    assert benchmark.main(args) == 0
    out = tmp_path / "bench"
    assert (out / "learned_25_tome" / "checkpoints" / "training_state_step_2.pt").exists()
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    learned = ["learned (tome FLOPs)", "learned (fastv FLOPs)"]
    assert [r["method"] for r in rows] == ["unpruned", *learned, *METHODS[1:]]
    assert [int(r["kept"]) for r in rows[3:]] == [36] * (len(METHODS) - 1)
    by_method = {r["method"]: r for r in rows}
    for match in ("tome", "fastv"):  # each learned run spends at most its method's FLOPs, and keeps at most K
        assert float(by_method[f"learned ({match} FLOPs)"]["flops"]) <= float(by_method[match]["flops"])
        assert int(by_method[f"learned ({match} FLOPs)"]["kept"]) <= 36
    # more FLOPs to spend buy more tokens in the early layers
    assert float(by_method["learned (fastv FLOPs)"]["mean_vision_tokens"]) > float(by_method["learned (tome FLOPs)"]["mean_vision_tokens"])
    assert by_method["fastv"]["stages"] == "144 → 36 (L2)"
    assert by_method["pyramiddrop"]["stages"] == "144 → 91 → 57 → 36 (L1, L2, L3)"
    assert by_method["tome"]["stages"] == "36"
    assert float(by_method["unpruned"]["flops_ratio"]) == 1.0
    assert all(0 < float(r["flops_ratio"]) < 1 for r in rows[1:])
    assert (out / "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    stages = by_method["learned (tome FLOPs)"]["stages"]
    assert f"| learned (tome FLOPs) | {stages} |" in (out / "results.md").read_text()

    # a second run uses the checkpoint, unless the training data (or the backbone) changed since
    capsys.readouterr()
    again = bench_args(tmp_path, tiny_folder, "--budgets", "0.25", "--methods", "learned", "--limit", "3")  # same schedules
    assert benchmark.main(again) == 0
    assert "learned (<method> FLOPs): the checkpoints of their best evaluation" in (out / "results.md").read_text()
    assert benchmark.main([*again, "--checkpoint", "final"]) == 0
    assert "learned (<method> FLOPs): the final checkpoints" in (out / "results.md").read_text()
    assert benchmark.main([*again, "--set", "data_settings.seed=1"]) == 2
    assert "trained on other backbone weights or other training data" in capsys.readouterr().err
    # nor when the method or the optimizers it would train with now differ (a default or a --set changed since)
    assert benchmark.main([*again, "--set", "method_settings.merge_spread_weight=0.5"]) == 2
    err = capsys.readouterr().err
    assert "trained with other settings" in err and "method_settings.merge_spread_weight:" in err
    assert "-> 0.5" in err and "--train-missing" in err
    cosine = "trainer_settings.dl_settings.optimizers.layer_pruners.scheduler"
    assert benchmark.main([*again, "--set", f"{cosine}=cosine"]) == 2
    assert f"{cosine}: 'constant' -> 'cosine'" in capsys.readouterr().err
    assert benchmark.main([*again, "--set", "trainer_settings.eval_every=1"]) == 2  # it chooses the reported checkpoint
    assert "trainer_settings.eval_every: 2 -> 1" in capsys.readouterr().err


@pytest.mark.slow
def test_searched_schedule_stays_under_tomes_flops_and_is_reported(tmp_path, tiny_folder, capsys):
    args = bench_args(tmp_path, tiny_folder, "--budgets", "0.5", "--methods", "learned", "tome", "--train-missing",
                      "--match-flops", "tome", "--search", "3", "--set", "manager_settings.cpu_workers=1")
    assert benchmark.main(args) == 0
    folder = tmp_path / "bench" / "searched_50"
    best = folder / "search" / "optuna" / "schedule_50" / "best_config.yaml"
    assert best.exists() and (folder / "run" / "checkpoints").is_dir()
    with (tmp_path / "bench" / "results.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"unpruned", "learned (tome FLOPs)", SEARCHED, "tome"}
    cap = yaml.safe_load((folder / "search_config.yaml").read_text())["search_settings"]["flops_budget"]
    assert float(rows[SEARCHED]["flops_ratio"]) <= float(rows["tome"]["flops_ratio"]) + 0.01
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


@pytest.mark.slow
def test_a_variant_is_trained_within_the_same_flops_and_reported_beside_the_default(tmp_path, tiny_folder, capsys):
    variant = ["--variant", "no labels", "method_settings.relevance_weight=0", "method_settings.merger_type=simple"]
    args = bench_args(tmp_path, tiny_folder, "--budgets", "0.25", "--methods", "learned", "tome", "--match-flops", "tome",
                      "--train-missing", *variant)
    assert benchmark.main(args) == 0
    out = tmp_path / "bench"
    with (out / "results.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    name = "learned, no labels (tome FLOPs)"
    assert list(rows) == ["unpruned", "learned (tome FLOPs)", name, "tome"]
    for row in (rows[name], rows["learned (tome FLOPs)"]):  # each schedule counts its own merger's cost
        assert float(row["flops"]) <= float(rows["tome"]["flops"]) and int(row["kept"]) <= 36
    trained = yaml.safe_load((out / "learned_25_tome_no_labels" / "resolved_config.yaml").read_text())
    assert trained["method_settings"]["relevance_weight"] == 0
    assert trained["method_settings"]["merger_type"] == "simple"
    default = yaml.safe_load((out / "learned_25_tome" / "resolved_config.yaml").read_text())
    assert default["method_settings"]["relevance_weight"] == 1  # configs/tiny.yaml's
    assert default["method_settings"]["merger_type"] == "question_aware"
    assert "method_settings.relevance_weight=0 method_settings.merger_type=simple" in (out / "results.md").read_text()


@pytest.mark.parametrize("variant, message", [
    (["labels"], "expected a label, then dotted.key=value settings"),
    (["labels", "relevance_weight"], "expected a label, then dotted.key=value settings"),
    (["labels", "method_settings.relevance_weigth=1"], "did you mean 'method_settings.relevance_weight'"),
    (["!!", "method_settings.relevance_weight=1"], "each needs its own name of letters or digits"),
])
def test_bad_variants_are_refused_before_any_weights_load(tmp_path, tiny_folder, capsys, monkeypatch, variant, message):
    monkeypatch.setattr(LlavaBackbone, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    assert benchmark.main(bench_args(tmp_path, tiny_folder, "--variant", *variant)) == 2
    assert message in capsys.readouterr().err
