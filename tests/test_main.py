"""End to end: main.py on a tiny config, its log lines, files and errors."""

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main as entry
from tests.helpers import main_args

SEED_INFO_LINES = [
    "[INFO] Preloading backbone and dataset...",
    "[INFO] Freezing backbone parameters...",
    "[INFO] Creating Trainer...",
    "[INFO] Creating Token Merger...",
    "[INFO] Creating Layer-Specific Pruners...",
    "[INFO] Creating Discriminator...",
    "[INFO] Starting training...",
    "[INFO] Token Merger type: question_aware",  # configs/tiny.yaml's
    "[INFO] Merge Ratio: 0.5",
    "[INFO] Pruning Layers: [1, 2, 3]",
    "[INFO] Temperature: 1.0 → 0.1",
]


def args_for(tmp_path, folder, *extra):
    """The tiny run with a schedule whose counts the assertions below name: 144 -> 72 -> 50 -> 38 -> 25."""
    return main_args(tmp_path, folder, *extra, **{
        "method_settings.merge_ratio": 0.5, "method_settings.target_merge_tokens": 72,
        "method_settings.pruner_keep_ratios": "[0.7,0.75,0.67]", "data_settings.synthetic_train_size": 16})


def test_main_trains_logs_and_writes_the_seed_outputs(tmp_path, tiny_folder, capsys):
    args, out = args_for(tmp_path, tiny_folder)
    assert entry.main(args) == 0
    printed = capsys.readouterr().out
    positions = [printed.index(line) for line in SEED_INFO_LINES]
    assert positions == sorted(positions), "the start-up lines come in the seed guide's order"
    for block in ["[Step 2] Losses:\n  token_merger:\n    - merge_sparsity_loss: ",
                  "  layer_pruners:\n    - adv_loss: ", "    - task_loss: ",
                  "  discriminator:\n    - real_loss: ", "    - fake_loss: ",
                  "[Step 4] Temperature: 0.10", "[INFO] disc_prob_real: ", "[INFO] disc_prob_fake: ",
                  "[Step 2] Throughput: ", " samples/s, ", " tokens/s, ", " s/step (teacher ", ", ETA 0:00:",
                  "[Eval Step 4]\n  - accuracy_baseline: ", "  - accuracy_soft: ", "  - accuracy_hard: ",
                  "  - keep_ratio_merge: 0.500", "  - avg_original_tokens: 144", "  - avg_merged_tokens: 72",
                  "  - tokens_after_layer_3: 25", "  - flops_reduction: ", "  - prefill_ms_per_sample: ", "[Summary] targets of the quick-start guide"]:
        assert block in printed, block
    assert (out / "logs" / "training.log").read_text() == printed  # mirrored
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert resolved["trainer_settings"]["max_steps"] == 4
    names = {p.name for p in (out / "checkpoints").iterdir()}
    assert {"token_merger_step_4.pt", "layer_pruners_step_4.pt", "discriminator_step_4.pt",
            "training_state_step_4.pt", "token_merger_best.pt"} <= names

    events = EventAccumulator(str(out / "logs" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/token_merger/merge_sparsity_loss", "loss/layer_pruners/task_loss", "loss/layer_pruners/adv_loss",
            "loss/discriminator/real_loss", "loss/discriminator/fake_loss", "temperature",
            "discriminator/disc_prob_real", "discriminator/disc_prob_fake", "eval/accuracy_baseline",
            "eval/accuracy_soft", "eval/accuracy_hard", "eval/keep_ratio_merge", "eval/avg_merged_tokens",
            "eval/tokens_after_layer_1", "eval/flops_reduction", "eval/prefill_ms_per_sample", "throughput/samples_per_s",
            "throughput/tokens_per_s", "throughput/teacher_s", "throughput/optimizer_s"} <= tags
    lr = resolved["trainer_settings"]["dl_settings"]["optimizers"]
    for group in ("token_merger", "layer_pruners", "discriminator"):  # constant schedules: the configured rate
        assert [e.value for e in events.Scalars(f"lr/{group}")] == pytest.approx([lr[group]["lr"]] * 2)
    assert {"final/accuracy_hard", "final/flops_reduction"} <= tags  # beside the run's hyper-parameters:
    assert events.PluginTagToContent("hparams")  # TensorBoard's HPARAMS tab
    assert set(events.Tags()["images"]) == {f"kept_tokens/{i}" for i in range(4)}  # 4 of the 6 eval samples
    picture = events.Images("kept_tokens/0")[-1]
    # the image, what each patch merged into, the merger's output and 3 stages, 2 px apart
    assert picture.step == 4 and (picture.height, picture.width) == (96, 96 * 6 + 2 * 5)

    # A second run into the same folder refuses instead of overwriting; --resume auto continues.
    assert entry.main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    args_more, _ = args_for(tmp_path, tiny_folder, "--resume", "auto", "--set", "trainer_settings.max_steps=6",
                            "--set", "data_settings.synthetic_train_size=24")
    assert entry.main(args_more) == 0
    assert "[INFO] Resumed from" in capsys.readouterr().out and (out / "checkpoints" / "training_state_step_6.pt").exists()


def test_config_problems_stop_before_any_model_loads(tmp_path, capsys):
    args = ["--config", "configs/tiny.yaml", "--set", "method_settings.pruning_layers=[2,4,9]",
            "--set", "method_settings.merge_ration=0.4"]
    assert entry.main(args) == 2
    err = capsys.readouterr().err
    assert "merge_ration: unknown key; did you mean 'method_settings.merge_ratio'?" in err
    assert entry.main(["--config", "configs/tiny.yaml", "--set", "method_settings.pruning_layers=[2,4,9]"]) == 2
    assert "layer(s) [9] outside 1..7 for a backbone with 8 decoder layers" in capsys.readouterr().err


def test_missing_backbone_says_how_to_run_the_cpu_default(capsys):
    assert entry.main(["--set", "backbone_settings.name_or_path=/nonexistent/llava"]) == 2
    err = capsys.readouterr().err
    assert "no such backbone folder" in err and "python main.py --config configs/tiny.yaml" in err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        entry.main(["--help"])
    text = capsys.readouterr().out
    assert "--config" in text and "--set" in text and "--resume" in text


def test_eval_mode_keeps_the_run_config_and_measures_a_new_eval_set_s_baseline(tmp_path, tiny_folder, capsys,
                                                                               monkeypatch):
    import trainers.training.trainer as trainer_module

    args, out = args_for(tmp_path, tiny_folder)
    assert entry.main(args) == 0
    resolved = (out / "resolved_config.yaml").read_text()
    calls = []
    original = trainer_module.generate_baseline_answers
    monkeypatch.setattr(trainer_module, "generate_baseline_answers", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    capsys.readouterr()
    same, _ = args_for(tmp_path, tiny_folder, "--resume", "auto", "--set", "manager_settings.mode=eval")
    assert entry.main(same) == 0
    assert not calls, "the same eval set: the checkpoint's baseline is reused"
    other, _ = args_for(tmp_path, tiny_folder, "--resume", "auto", "--set", "manager_settings.mode=eval",
                        "--set", "data_settings.synthetic_eval_size=9")
    assert entry.main(other) == 0
    assert calls, "another eval set: the baseline is measured again"
    assert (out / "resolved_config.yaml").read_text() == resolved
    assert yaml.safe_load((out / "eval_config.yaml").read_text())["data_settings"]["synthetic_eval_size"] == 9
    # the random backbone answers no better than the most frequent answer: no accuracy target can be judged
    assert "accuracy drop: not measured, the unpruned model scores" in capsys.readouterr().out


def test_eval_mode_can_skip_the_soft_and_baseline_evaluations(tmp_path, tiny_folder, capsys, monkeypatch):
    import trainers.inference.evaluation as evaluation_module
    import trainers.training.trainer as trainer_module

    args, out = args_for(tmp_path, tiny_folder)
    assert entry.main(args) == 0
    modes = []
    original = evaluation_module.generate_pruned
    monkeypatch.setattr(evaluation_module, "generate_pruned", lambda m, b, mode, *a: (modes.append(mode),
                                                                                       original(m, b, mode, *a))[1])
    monkeypatch.setattr(trainer_module, "generate_baseline_answers", lambda *a, **k: pytest.fail("baseline measured"))
    capsys.readouterr()
    skip, _ = args_for(tmp_path, tiny_folder, "--resume", "auto", "--set", "manager_settings.mode=eval",
                       "--set", "data_settings.synthetic_eval_size=9", "--set", "trainer_settings.eval_soft=false",
                       "--set", "trainer_settings.eval_baseline=false")
    assert entry.main(skip) == 0
    printed = capsys.readouterr().out
    assert modes and set(modes) == {"hard"}
    assert "  - accuracy_hard: " in printed and "accuracy_soft" not in printed
    assert "accuracy_baseline" not in printed
    assert "accuracy drop: not measured (trainer_settings.eval_baseline: false)" in printed


def test_eval_mode_takes_a_saved_pruned_model_or_a_run_folder(tmp_path, tiny_folder, capsys):
    args, out = args_for(tmp_path, tiny_folder)
    assert entry.main(args) == 0
    trained = capsys.readouterr().out.split("[Eval Step 4]")[-1]
    hard = trained.split("  - accuracy_hard: ")[1].split("\n")[0]
    for source in (out / "pruned_final", out):
        elsewhere = tmp_path / f"eval-{source.name}"
        again, _ = args_for(tmp_path, tiny_folder, "--resume", str(source), "--set", "manager_settings.mode=eval",
                            "--set", f"manager_settings.output_dir={elsewhere}")
        assert entry.main(again) == 0
        printed = capsys.readouterr().out
        assert f"  - accuracy_hard: {hard}\n" in printed, source  # the trained modules, evaluated again
        loaded = (f"Loaded the pruned model saved in {source}" if source.name == "pruned_final" else
                  f"Resumed from {out / 'checkpoints' / 'training_state_step_4.pt'} at step 4")
        assert loaded in printed and "[Eval Step 4]" in printed
        assert (elsewhere / "eval_config.yaml").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    bad, _ = args_for(tmp_path, tiny_folder, "--resume", str(empty), "--set", "manager_settings.mode=eval",
                      "--set", f"manager_settings.output_dir={tmp_path / 'eval-empty'}")
    assert entry.main(bad) == 2
    assert "holds no saved pruned model (pruning_config.json) and no checkpoints/" in capsys.readouterr().err
