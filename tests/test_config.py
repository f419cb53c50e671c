import textwrap
from pathlib import Path

import pytest

from configs.schema import (ConfigError, tracker_problems, apply_overrides, apply_search_params, check_against_backbone, check_devices,
                            load_config)


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path, overrides=()):
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    return err.value.problems


@pytest.mark.parametrize("name, layers, tokens, size", [("configs/vision_token_pruning.yaml", 32, 576, 336),
                                                          ("configs/tiny.yaml", 8, 144, 96)])
def test_shipped_configs_fit_their_backbones(name, layers, tokens, size):
    """Each shipped config loads and passes the checks against its backbone's shape, search space included."""
    config = load_config(name, ["search_settings.enable=true"])
    assert check_against_backbone(config, num_layers=layers, num_vision_tokens=tokens, image_size=size) == []


def test_seed_values_and_string_numbers(tmp_path):
    path = write(tmp_path, """
        trainer_settings:
          dl_settings:
            optimizers:
              token_merger: {lr: "2e-05"}
              layer_pruners: {lr: 1e-4}
        method_settings:
          merge_sparsity_weight: 1e-4
    """)
    config = load_config(path)
    optimizers = config.trainer_settings.dl_settings.optimizers
    assert optimizers.token_merger.lr == 2e-5 and isinstance(optimizers.token_merger.lr, float)
    assert optimizers.layer_pruners.lr == 1e-4  # PyYAML reads bare 1e-4 as the string "1e-4"
    assert config.method_settings.merge_sparsity_weight == 1e-4
    assert load_config("configs/vision_token_pruning.yaml").method_settings.pruning_layers == [10, 20, 31]


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    problems = problems_of(write(tmp_path, "method_settings:\n  merge_ration: 0.4\n"))
    assert problems == ["method_settings.merge_ration: unknown key; did you mean 'method_settings.merge_ratio'?"]


def assert_exactly_these_problems(problems: list[str], expected: list[str]) -> None:
    """Every expected message prefix is reported, and nothing else."""
    for prefix in expected:
        assert any(p.startswith(prefix) for p in problems), (prefix, problems)
    assert len(problems) == len(expected)


def test_every_problem_reported_at_once_with_dotted_paths(tmp_path):
    path = write(tmp_path, """
        trainer_settings:
          dl_settings:
            batch_size: twelve
            optimizers:
              discriminator: {lr: -1}
        method_settings:
          merge_ratio: 1.5
          merger_type: clever
          temperature: 0.05
          temperature_min: 0.1
        search_settings: {enable: "yes"}
    """)
    problems = problems_of(path)
    expected = [
        "trainer_settings.dl_settings.batch_size: expected an integer",
        "trainer_settings.dl_settings.optimizers.discriminator.lr: -1.0 is out of range, must be > 0",
        "method_settings.merge_ratio: 1.5 is out of range, must be <= 1",
        "method_settings.merger_type: 'clever' is not one of ['simple', 'question_aware']",
        "search_settings.enable: expected true/false",
        "method_settings.temperature_min (0.1) is above method_settings.temperature (0.05)",
    ]
    assert_exactly_these_problems(problems, expected)


@pytest.mark.parametrize("layers, message", [([10, 10, 31], "strictly increasing"), ([20, 10], "strictly increasing"),
                                             ([-1, 5], "negative")])
def test_pruning_layer_contradictions(tmp_path, layers, message):
    problems = problems_of(write(tmp_path, f"method_settings:\n  pruning_layers: {layers}\n"))
    assert any(message in p for p in problems)


def test_llava_json_needs_its_paths(tmp_path):
    problems = problems_of(write(tmp_path, "data_settings:\n  source: llava_json\n"))
    assert sorted(p.split(" ")[0] for p in problems) == ["data_settings.eval_json", "data_settings.image_folder",
                                                        "data_settings.train_json"]


def test_overrides_are_typed_like_the_file(tmp_path):
    path = write(tmp_path, "method_settings:\n  merge_ratio: 0.5\n")
    config = load_config(path, ["method_settings.merge_ratio=0.4", "method_settings.pruning_layers=[5, 15, 25]",
                                "trainer_settings.dl_settings.optimizers.token_merger.lr=5e-05",
                                "method_settings.target_merge_tokens=null"])
    assert config.method_settings.merge_ratio == 0.4
    assert config.method_settings.pruning_layers == [5, 15, 25]
    assert config.trainer_settings.dl_settings.optimizers.token_merger.lr == 5e-5
    assert config.method_settings.target_merge_tokens is None
    assert problems_of(path, ["method_settings.merge_ratoi=0.4"]) == [
        "method_settings.merge_ratoi: unknown key; did you mean 'method_settings.merge_ratio'?"]
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(path, ["method_settings.merge_ratio"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_checks_against_the_backbone_shape():
    config = load_config("configs/vision_token_pruning.yaml")
    assert check_against_backbone(config, num_layers=32, num_vision_tokens=576, image_size=336) == []
    problems = check_against_backbone(config, num_layers=24, num_vision_tokens=576, image_size=336)
    assert len(problems) == 1 and "[31]" in problems[0] and "24 decoder layers" in problems[0]
    problems = check_against_backbone(config, num_layers=32, num_vision_tokens=144, image_size=336)
    assert len(problems) == 1 and "set it to 72 or to null" in problems[0]  # 288 != 0.5 x 144


def test_vision_bounds_are_checked_not_ignored(tmp_path):
    path = write(tmp_path, "data_settings:\n  max_vision_tokens: 500\n  image_max_size: 300\n")
    problems = check_against_backbone(load_config(path), num_layers=32, num_vision_tokens=576, image_size=336)
    assert any("max_vision_tokens (500)" in p for p in problems)
    assert any("image_max_size (300)" in p for p in problems)


def test_gpus_requested_without_cuda(tmp_path):
    path = write(tmp_path, "manager_settings:\n  available_gpus: [0, 1]\nbackbone_settings:\n  device: cuda\n")
    problems = check_devices(load_config(path), cuda_available=False)
    assert len(problems) == 2 and all("CUDA is not available" in p for p in problems)
    assert check_devices(load_config(path), cuda_available=True) == []


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n"))


@pytest.mark.parametrize("name", sorted(str(p) for p in Path("configs").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    assert load_config(name).backbone_settings.name_or_path


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing set yet\n", "{}\n"])
def test_a_config_without_settings_is_refused(tmp_path, text):
    """An empty file would run with every default (the 7B backbone) instead of saying what is wrong."""
    path = write(tmp_path, text)
    assert problems_of(path) == [f"{path} holds no settings (it is empty or only comments); write the sections to "
                                 "change, or start from a shipped config such as configs/tiny.yaml"]


def test_a_key_written_twice_is_refused_at_any_depth(tmp_path):
    path = write(tmp_path, """\
        trainer_settings:
          log_every: 5
        method_settings:
          merge_ratio: 0.4
          merge_ratio: 0.5
          optimizers_like: {lr: 1, lr: 2}
        trainer_settings:
          eval_every: 7
        """)
    repeats = "YAML would keep only the last; remove one or merge them"
    assert problems_of(path) == [f"key 'merge_ratio' is written twice in one mapping, at lines 4 and 5: {repeats}",
                                 f"key 'lr' is written twice in one mapping, at line 6: {repeats}",
                                 f"key 'trainer_settings' is written twice in one mapping, at lines 1 and 7: {repeats}"]
    assert problems_of(path, ["method_settings.merge_ratio=0.4"])[0].startswith("key 'merge_ratio'")


def test_a_merge_key_may_be_overridden(tmp_path):
    """'<<: *anchor' followed by a key it holds is YAML's way to override, not a key written twice."""
    path = write(tmp_path, """\
        backbone_settings: {name_or_path: backbones/tiny-llava, device: cpu}
        trainer_settings:
          dl_settings:
            optimizers:
              token_merger: &fast {lr: 0.005, weight_decay: 0.1}
              layer_pruners: {<<: *fast, lr: 0.001}
        """)
    optimizers = load_config(path).trainer_settings.dl_settings.optimizers
    assert (optimizers.layer_pruners.lr, optimizers.layer_pruners.weight_decay) == (0.001, 0.1)


@pytest.mark.parametrize("override, problem", [
    ("method_settings.pruning_layers=[2,4", "not a valid YAML value (expected ',' or ']', but got '<stream end>' at "
                                            "line 1, column 5); quote it or fix its brackets and quotes"),
    ("data_settings.train_json=\"a.json", "not a valid YAML value (found unexpected end of stream at line 1, "
                                          "column 8); quote it or fix its brackets and quotes"),
    ("method_settings={merge_ratio: 0.4, merge_ratio: 0.5}", "key 'merge_ratio' is written twice in the value; keep one"),
])
def test_a_malformed_override_is_one_line_naming_it(override, problem, capsys):
    import main as entry

    assert problems_of("configs/tiny.yaml", [override]) == [f"--set {override!r}: {problem}"]
    assert entry.main(["--config", "configs/tiny.yaml", "--set", override]) == 2
    err = capsys.readouterr().err
    assert err == f"error: command line: 1 problem(s):\n  - --set {override!r}: {problem}\n"


def test_no_pruning_layers_trains_the_merger_alone_only_without_keep_ratios():
    """pruning_layers [] means no pruners: a keep-ratio schedule then has no stage to apply to and is refused at
    load (the model would refuse it only after the weights load); with no ratios either, every stage list agrees."""
    from trainers.inference.build import stage_keep_ratios

    assert problems_of("configs/tiny.yaml", ["method_settings.pruning_layers=[]"]) == [
        "method_settings.pruning_layers is [] (no pruners) but pruner_keep_ratios is [0.5, 0.75, 0.67]; to train the "
        "token merger alone set pruner_keep_ratios: [] too, otherwise list the decoder layers that get a pruner"]
    alone = load_config("configs/tiny.yaml", ["method_settings.pruning_layers=[]", "method_settings.pruner_keep_ratios=[]"])
    assert alone.method_settings.pruning_layers == [] and stage_keep_ratios(alone.method_settings) == []
    assert check_against_backbone(alone, num_layers=8, num_vision_tokens=144, image_size=96) == []


def search_problems(tmp_path, search_yaml, manager="{mode: optuna}"):
    return problems_of(write(tmp_path, f"manager_settings: {manager}\nsearch_settings:\n" + textwrap.indent(
        textwrap.dedent(search_yaml), "  ")))


def test_search_settings_every_problem_at_once(tmp_path):
    problems = search_problems(tmp_path, """
        enable: true
        study_name: "my study"
        storage: "redis://localhost"
        heartbeat_interval: 60
        grace_period: 30
        objectives: [{metric: acuracy_hard}, {metric: flops_reduction, direction: up}]
        search_space:
          method_settings.merge_ration: {type: float, low: 0.4, high: 0.6}
          method_settings.merge_ratio: {type: float, low: 0.5, high: 1.5}
          method_settings.pruner_d_internal: {type: float, low: 16, high: 64}
          method_settings.merger_type: {type: int, low: 1, high: 2}
          method_settings.pruning_layers: {type: categorical, choices: [[10, 20, 31]], low: 3}
          method_settings.temperature: {low: 0.5, high: 1.0}
          method_settings.task_loss_weight: {type: float, low: 0, high: 10, log: true}
          method_settings.adv_loss_weight: {type: float, low: 2, high: 1}
          method_settings.distill_weight: {type: flaot, low: 0, high: 1}
    """)
    expected = [
        "search_settings.objectives[1].direction: 'up' is not one of ['maximize', 'minimize']",
        "search_settings.search_space[method_settings.distill_weight].type: 'flaot' is not one of",
        "search_settings.study_name 'my study': use letters, digits",
        "search_settings.storage: redis:// is not a supported database",
        "search_settings.grace_period (30 s) must be longer than heartbeat_interval (60 s)",
        "search_settings.objectives[0].metric: 'acuracy_hard' is not an evaluation metric; did you mean 'accuracy_hard'?",
        "search_settings.search_space[method_settings.merge_ration]: not a config key a search can set; "
        "did you mean 'method_settings.merge_ratio'?",
        "search_settings.search_space[method_settings.merge_ratio].high (1.5) makes the trial's config invalid: "
        "method_settings.merge_ratio: 1.5 is out of range, must be <= 1",
        "search_settings.search_space[method_settings.pruner_d_internal].type: the key holds integers; use type: int",
        "search_settings.search_space[method_settings.merger_type]: the key takes one of ['simple', 'question_aware'], "
        "which has no range; use type: categorical with choices",
        "search_settings.search_space[method_settings.pruning_layers]: categorical choices take no low",
        "search_settings.search_space[method_settings.temperature].type is required",
        "search_settings.search_space[method_settings.task_loss_weight]: a log scale needs low > 0",
        "search_settings.search_space[method_settings.adv_loss_weight]: low (2) must be below high (1)",
    ]
    assert_exactly_these_problems(problems, expected)


def test_search_space_values_are_tried_on_the_config_and_the_backbone(tmp_path):
    # Choices that contradict other keys fail at load, not in a trial hours later.
    problems = search_problems(tmp_path, """
        enable: true
        search_space:
          method_settings.pruning_layers: {type: categorical, choices: [[10, 20, 31], [20, 10]]}
    """)
    assert problems == ["search_settings.search_space[method_settings.pruning_layers].choices[1] ([20, 10]) makes "
                        "the trial's config invalid: method_settings.pruning_layers [20, 10] must be strictly increasing"]
    config = load_config("configs/vision_token_pruning.yaml", ["search_settings.enable=true"])
    assert check_against_backbone(config, num_layers=32, num_vision_tokens=576, image_size=336) == []
    problems = check_against_backbone(config, num_layers=24, num_vision_tokens=576, image_size=336)
    assert any(p.startswith("search_settings.search_space[method_settings.pruning_layers].choices[2] ([20, 25, 31]) "
                            "does not fit the backbone") for p in problems)
    tiny = load_config("configs/tiny.yaml", ["search_settings.enable=true", "manager_settings.mode=optuna"])
    assert check_against_backbone(tiny, num_layers=8, num_vision_tokens=144, image_size=96) == []


def test_searched_merge_ratio_frees_the_token_target():
    config = load_config("configs/tiny.yaml")
    trial = apply_search_params(config, {"method_settings.merge_ratio": 0.42, "method_settings.pruning_layers": [1, 3, 5]})
    assert trial.method_settings.merge_ratio == 0.42 and trial.method_settings.target_merge_tokens is None
    assert trial.method_settings.pruning_layers == [1, 3, 5] and config.method_settings.target_merge_tokens == 94


def test_optuna_mode_devices(tmp_path):
    problems = search_problems(tmp_path, "enable: true\n", manager="{mode: optuna, available_gpus: []}\n"
                               "backbone_settings: {device: cuda}")
    assert len(problems) == 1 and "the search's workers then run on the CPU" in problems[0]
    problems = search_problems(tmp_path, "enable: true\n", manager="{mode: optuna, available_gpus: [0, 1, 2], "
                               "gpus_per_subtask: 2}\nbackbone_settings: {device: 'cuda:1'}")
    assert len(problems) == 2 and "has 3 GPUs, not a multiple of gpus_per_subtask (2)" in problems[0]
    assert "each worker sees its own GPUs as cuda:0, cuda:1, ...; set device to 'auto'" in problems[1]
    path = write(tmp_path, "manager_settings: {available_gpus: [0, 4], gpus_per_subtask: 2}\n")
    problems = check_devices(load_config(path), cuda_available=True, device_count=2)
    assert len(problems) == 1 and "lists GPU(s) [4] but this machine shows 2" in problems[0]


@pytest.mark.parametrize("metric, hint", [("task_loss", "losses are not measured at evaluation"),
                                          ("acuracy_hard", "did you mean 'accuracy_hard'?")])
def test_best_metric_must_be_an_evaluation_metric(tmp_path, metric, hint):
    problems = problems_of(write(tmp_path, f"trainer_settings: {{best_metric: {metric}}}\n"))
    assert problems == [f"trainer_settings.best_metric {metric!r} is not an evaluation metric; " + problems[0].split("; ", 1)[1]]
    assert hint in problems[0]
    for fine in ("accuracy_hard/count", "tokens_after_layer_4", "flops_reduction"):
        load_config("configs/tiny.yaml", [f"trainer_settings.best_metric={fine}"])


@pytest.mark.parametrize("metric, key", [("accuracy_soft", "eval_soft"), ("accuracy_baseline", "eval_baseline")])
def test_best_metric_must_be_one_the_evaluation_measures(tmp_path, metric, key):
    problems = problems_of(write(tmp_path, f"trainer_settings: {{best_metric: {metric}, {key}: false}}\n"))
    assert problems == [f"trainer_settings.best_metric is {metric!r}, which trainer_settings.{key}: false does not "
                        "measure; choose another metric or measure it"]
    load_config("configs/tiny.yaml", [f"trainer_settings.{key}=false"])  # with accuracy_hard, fine


def test_a_disabled_search_does_not_hide_the_real_problem(tmp_path):
    path = write(tmp_path, "search_settings:\n  enable: false\n  search_space:\n"
                           "    method_settings.nonsense: {type: float, low: 1, high: 2}\n"
                           "method_settings: {temperature_min: 5.0}\n")
    problems = problems_of(path)
    assert len(problems) == 1 and problems[0].startswith("method_settings.temperature_min (5.0) is above")


def test_merge_ratio_set_alone_is_followed_and_both_in_a_file_must_agree(tmp_path):
    config = load_config("configs/tiny.yaml", ["method_settings.merge_ratio=0.6"])
    assert config.method_settings.target_merge_tokens is None
    assert check_against_backbone(config, num_layers=8, num_vision_tokens=144, image_size=96) == []
    both = load_config("configs/tiny.yaml", ["method_settings.merge_ratio=0.6", "method_settings.target_merge_tokens=96"])
    problems = check_against_backbone(both, num_layers=8, num_vision_tokens=144, image_size=96)
    assert problems and "disagrees with merge_ratio" in problems[0]


def test_more_pruning_layers_than_keep_ratios_spreads_the_schedule():
    from trainers.inference.build import stage_keep_ratios

    config = load_config("configs/vision_token_pruning.yaml",
                         ["method_settings.pruning_layers=[8, 12, 16, 20, 24, 28, 31]"])
    ratios = stage_keep_ratios(config.method_settings)
    assert len(ratios) == 7 and len(set(ratios)) == 1
    assert ratios[0] ** 7 == pytest.approx(0.7 * 0.75 * 0.67, rel=1e-4)
    assert check_against_backbone(config, num_layers=32, num_vision_tokens=576, image_size=336) == []


def test_relevance_labels_are_allowed_on_llava_json_data(tmp_path):
    # whether its records carry boxes is known once the file is read (trainers/training/preflight.load_data)
    problems = problems_of(write(tmp_path, """\
        method_settings:
          relevance_weight: 1.0
        data_settings:
          source: llava_json
          train_json: t.json
          eval_json: e.json
          image_folder: images
          synthetic_labelled_fraction: 1.5
        """))
    assert problems == ["data_settings.synthetic_labelled_fraction: 1.5 is out of range, must be <= 1"]
    assert load_config("configs/tiny.yaml", ["method_settings.relevance_weight=2"]).method_settings.relevance_weight == 2


def test_schedules_and_accumulation_are_checked():
    from configs.schema import batch_split_problem, config_from_dict, read_yaml

    group = "trainer_settings.dl_settings.optimizers.token_merger"
    with pytest.raises(ConfigError) as err:
        config_from_dict(apply_overrides(read_yaml("configs/tiny.yaml"), [
            f"{group}.warmup_steps=10", f"{group}.warmup_ratio=0.1", f"{group}.min_lr_ratio=0.1",
            "trainer_settings.dl_settings.optimizers.discriminator.scheduler=linear",
            "trainer_settings.dl_settings.gradient_accumulation_steps=0"]))
    problems = "\n".join(err.value.problems)
    assert f"{group}: warmup_steps (10) and warmup_ratio (0.1) are both set; give one of them" in problems
    assert f"{group}.min_lr_ratio (0.1) applies to scheduler: cosine only" in problems
    assert "discriminator.scheduler: 'linear' is not one of ['constant', 'cosine']" in problems
    assert "gradient_accumulation_steps: 0 is out of range, must be >= 1" in problems
    config = config_from_dict(apply_overrides(read_yaml("configs/tiny.yaml"), [
        "trainer_settings.dl_settings.batch_size=16", "trainer_settings.dl_settings.gradient_accumulation_steps=4"]))
    assert batch_split_problem(config, 4) is None
    assert "a multiple of 12 (e.g. 12 or 24)" in batch_split_problem(config, 3)


def test_report_to_names_trackers_that_are_known_and_installed():
    installed = {"tensorboard", "mlflow"}.__contains__
    assert tracker_problems(["tensorboard", "mlflow"], installed) == []
    assert tracker_problems(["tensorbord"], installed) == [
        "trainer_settings.report_to: unknown tracker(s) ['tensorbord']; choose among ['tensorboard', 'wandb', "
        "'mlflow', 'comet_ml', 'aim', 'clearml', 'dvclive', 'swanlab', 'trackio']"]
    assert tracker_problems(["comet_ml"], installed) == [
        "trainer_settings.report_to: 'comet_ml' is not installed (pip install comet-ml), or leave it out"]
