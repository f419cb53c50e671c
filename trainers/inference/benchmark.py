"""The benchmark behind scripts/benchmark.py: learned pruning against the training-free methods at equal budgets.

What it owns: the checks of a request before any weights load (``check_request``); the learned method's runs, one
``main.py`` run per budget and FLOPs-matched method (``LearnedRun``, schedules from trainers/inference/flops_match.py),
per ``--variant`` and per searched schedule (``SearchedRun``: main.py's Optuna mode), found, checked against the
backbone and data they were trained on (``fingerprint``), or trained in a subprocess; and the table's rows, every
setting scored by the one evaluator (trainers/inference/evaluation.py, hard mode) and its prefill timed interleaved
with the others. ``args`` is scripts/benchmark.py's parsed command line. The outputs are written by
trainers/inference/benchmark_report.py.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from configs.schema import (Config, ConfigError, check_against_backbone, config_differences, config_from_dict,
                            config_to_dict, load_config)
from data.build import batches, build_datasets, build_test_set, planned_steps
from data.collator import VQACollator
from models.backbones import read_backbone_shape
from models.baselines import build_baseline, check_baseline, kept_tokens
from models.clip_relevance import clip_folder_of
from models.layer_pruner import stage_budgets
from models.llava_backbone import BackboneShape, LlavaBackbone
from models.pruned_llava import PrunedLlava
from trainers.checkpoint import STATE, Checkpointer, load
from trainers.inference.build import build_pruned_model
from trainers.inference.evaluation import pruned_results, stage_counts, summarize_pruned, vision_tokens_per_layer
from trainers.inference.flops_match import flops_ratio, matched_schedule
from trainers.inference.pruned_model import load_pruned
from trainers.inference.timing import machine, timed_interleaved

ROOT = Path(__file__).resolve().parents[2]  # where main.py is: the learned runs train through it
METHODS = ("learned", "fastv", "pyramiddrop", "visionzip", "tome", "tome_pa", "cdpruner", "divpruner", "vispruner",
           "dart", "pooling", "random")
BUDGETS = (0.5, 0.25, 0.11, 0.05)  # the default budgets: fractions of the vision tokens left after the last stage
FINGERPRINT = "fingerprint.txt"  # backbone weights and training data of a run the benchmark trained
SEARCHED = "learned (searched)"


class BenchmarkError(ValueError):
    """Bad input: every problem found, each with its fix."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(f"  - {p}" for p in problems))
        self.problems = problems


def budget_name(budget: float) -> str:
    return f"{budget * 100:g}"


# ---------------------------------------------------------------------------------------- the learned method's runs
@dataclass(frozen=True)
class Variant:
    """``--variant LABEL KEY=VALUE ...``: the learned method trained with these settings too, beside the config's own
    (rows "learned, LABEL (<method> FLOPs)", runs in ``<learned-root>/learned_<pct>_<method>_<slug>``)."""

    label: str
    overrides: tuple[str, ...]

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "_", self.label.lower()).strip("_")


def parse_variant(words: list[str]) -> Variant:
    label, *overrides = words
    bad = [o for o in overrides if "=" not in o]
    if not overrides or bad or "=" in label:
        raise ConfigError([f"--variant {' '.join(words)!r}: expected a label, then dotted.key=value settings "
                           "(--variant 'no labels' method_settings.relevance_weight=0)"], "command line")
    return Variant(label, tuple(overrides))


@dataclass
class LearnedRun:
    """The learned method at one budget, trained to spend at most the FLOPs of the training-free method ``match``
    at that budget (trainers/inference/flops_match.py ``matched_schedule``): one main.py run in ``folder``."""

    budget: float
    match: str
    folder: Path
    merged: int
    ratios: list[float]
    variant: Variant | None = None  # None: the config's own method

    @property
    def name(self) -> str:
        label = "" if self.variant is None else f", {self.variant.label}"
        return f"learned{label} ({self.match} FLOPs)"

    def overrides(self, num_tokens: int) -> list[str]:
        return [*(self.variant.overrides if self.variant else []), f"manager_settings.output_dir={self.folder}",
                "method_settings.merge_budget=fixed",
                f"method_settings.target_merge_tokens={self.merged}",
                f"method_settings.merge_ratio={round(self.merged / num_tokens, 6)}",
                f"method_settings.pruner_keep_ratios=[{', '.join(f'{r:g}' for r in self.ratios)}]"]

    def command(self, config_path: str, user_overrides: list[str], num_tokens: int) -> list[str]:
        sets = [*user_overrides, *self.overrides(num_tokens)]
        return [sys.executable, "main.py", "--config", config_path, *(a for s in sets for a in ("--set", s))]

    def latest(self) -> Path | None:
        return reported_state(self.folder / "checkpoints", best=False)

    def reported(self, best: bool) -> Path | None:
        return reported_state(self.folder / "checkpoints", best)


def reported_state(checkpoints: Path, best: bool) -> Path | None:
    """The training state a benchmark reports: the run's best evaluation (``best``: its eval questions are apart from
    the benchmark's), else its last (None before its first save)."""
    chosen = checkpoints / f"{STATE}_best.pt"
    return chosen if best and chosen.exists() else Checkpointer(checkpoints, keep_last=1).latest()


@dataclass
class SearchedRun:
    """The learned method with a schedule the project's Optuna search chose for one budget.

    ``search/``: the study (trials train on a validation draw of the data, ``data_settings.seed`` + 1, and
    are infeasible above the FLOPs cap); ``run/``: the best trial's config trained again on the benchmark's
    own training data, the run the table reports.
    """

    budget: float
    folder: Path

    @property
    def study(self) -> str:
        return f"schedule_{budget_name(self.budget)}"

    @property
    def best_config(self) -> Path:
        return self.folder / "search" / "optuna" / self.study / "best_config.yaml"

    def latest(self) -> Path | None:
        return reported_state(self.folder / "run" / "checkpoints", best=False)

    def reported(self, best: bool) -> Path | None:
        return reported_state(self.folder / "run" / "checkpoints", best)


def run_steps(config: Config) -> int:
    """The steps main.py runs for ``config`` in one process (the trainer's own count)."""
    return planned_steps(config, len(build_datasets(config.data_settings)[0]))[1]


def shown(command: list[str]) -> str:
    return shlex.join(["python", *command[1:]])


def _run_or_exit(command: list[str], what: str, folder: Path) -> None:
    result = subprocess.run(command, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"error: {what} failed (exit {result.returncode}); its logs are in {folder}")


# ---------------------------------------------------------------------------------------- checks before any weights load
def check_request(args) -> tuple[Config, BackboneShape, dict[float, int], list[SearchedRun]]:
    """The config, the backbone's shape, the kept tokens per budget and the searched runs asked for, every setting
    checked against the backbone's config.json; raises ConfigError, BackboneNotFoundError or BenchmarkError.
    Sets ``args.variants`` (parsed) and ``args.variant_methods`` (each variant's method settings)."""
    config = load_config(args.config, args.overrides)
    args.variants = [parse_variant(words) for words in args.variants]
    # every variant's settings checked before any weights load; its modules cost their own FLOPs (learned_runs)
    args.variant_methods = {v: load_config(args.config, [*args.overrides, *v.overrides]).method_settings
                            for v in args.variants}
    if len({v.slug for v in args.variants}) < len(args.variants) or "" in {v.slug for v in args.variants}:
        raise ConfigError([f"--variant labels {[v.label for v in args.variants]}: each needs its own name of "
                           "letters or digits (it names the runs' folders)"], "command line")
    shape = read_backbone_shape(config.backbone_settings.name_or_path, config.data_settings.max_vision_tokens,
                                config.data_settings.image_max_size)
    problems = check_against_backbone(config, shape.num_layers, shape.num_vision_tokens, shape.image_size)
    if problems:
        raise ConfigError(problems, args.config)
    kept = plan(args, config, shape)
    searched = [SearchedRun(budget, args.learned_root / f"searched_{budget_name(budget)}")
                for budget in kept if (args.search > 0 or args.schedules_from) and "learned" in args.methods]
    missing = [str(args.schedules_from / run.folder.name / "best_schedule.yaml") for run in searched
               if args.schedules_from is not None and run.latest() is None
               and not (args.schedules_from / run.folder.name / "best_schedule.yaml").is_file()]
    if missing:
        raise BenchmarkError([f"--schedules-from: no searched schedule {path}; run the search there first "
                              "(--search N)" for path in missing])
    return config, shape, kept, searched


def plan(args, config: Config, shape: BackboneShape) -> dict[float, int]:
    """Kept tokens per budget, every budget and baseline checked; every problem in one BenchmarkError."""
    problems, kept = [], {}
    n, layers = shape.num_vision_tokens, list(config.method_settings.pruning_layers)
    if not 0 < args.stage_keep <= 1:
        problems.append(f"--stage-keep {args.stage_keep:g}: a stage keeps a share of its tokens in (0, 1]")
    baselines = [m for m in args.methods if m != "learned"]
    baselines += [m for m in args.match_flops if "learned" in args.methods and m not in baselines]
    for budget in args.budgets:
        try:
            kept[budget] = kept_tokens(n, budget)
        except ValueError as err:
            problems.append(f"--budgets {budget:g}: {err}")
            continue
        for method in baselines:
            try:
                check_baseline(method, n, shape.num_layers, kept[budget], layers, args.fastv_layer)
            except ValueError as err:
                problems.append(f"{method} at budget {budget:g}: {err}")
    if problems:
        raise BenchmarkError(problems)
    return kept


# ---------------------------------------------------------------------------------------- the learned runs' schedules
def learned_runs(args, config: Config, backbone: LlavaBackbone, kept: dict[float, int],
                 eval_batches: list[dict]) -> tuple[list[LearnedRun], list[LearnedRun], dict[tuple[float, str], float]]:
    """The learned runs (one per budget and matched method), those to train, and the matched methods' FLOPs ratios.

    A run missing or unfinished is to train with ``--train-missing`` and a BenchmarkError with its command otherwise.
    """
    n, layers = backbone.num_vision_tokens, list(config.method_settings.pruning_layers)
    targets = {(budget, match): flops_ratio(build_baseline(match, backbone, k, layers, args.fastv_layer, args.seed,
                                                           args.clip), eval_batches)
               for budget, k in kept.items() for match in (args.match_flops if "learned" in args.methods else [])}
    methods = {None: config.method_settings, **args.variant_methods}

    def flops_of(variant: Variant | None, merged: int, ratios: list[float]) -> float:
        method = dataclasses.replace(methods[variant], merge_budget="fixed", target_merge_tokens=merged,
                                     merge_ratio=merged / n, pruner_keep_ratios=ratios)
        return flops_ratio(build_pruned_model(method, backbone).eval(), eval_batches)

    runs, to_train, problems = [], [], []
    for ((budget, match), target), variant in itertools.product(targets.items(), methods):
        try:
            merged, ratios = matched_schedule(n, kept[budget], len(layers), functools.partial(flops_of, variant),
                                              target, args.stage_keep)
        except ValueError as err:
            problems.append(f"the learned method at budget {budget:g} matched to {match}: {err}")
            continue
        folder = f"learned_{budget_name(budget)}_{match}" + (f"_{variant.slug}" if variant else "")
        run = LearnedRun(budget, match, args.learned_root / folder, merged, ratios, variant)
        runs.append(run)
        latest = run.latest()
        command = shown(run.command(args.config, args.overrides, n))
        if latest is None:
            if args.train_missing:
                to_train.append(run)
            else:
                problems.append(f"no learned checkpoint for the {budget_name(budget)}% budget at {match}'s FLOPs in "
                                f"{run.folder}/checkpoints. Train it with:\n      {command}\n    or rerun with "
                                "--train-missing, or leave the learned method out (--methods without learned)")
            continue
        step = int(latest.stem.rsplit("_", 1)[1])
        planned = run_steps(config_from_dict(load(latest)["config"]))
        if step < planned:
            if args.train_missing:
                to_train.append(run)
            else:
                problems.append(f"the run in {run.folder} stopped at step {step} of {planned}. Finish it with:\n"
                                f"      {command} --resume auto\n    or rerun with --train-missing")
    if problems:
        raise BenchmarkError(problems)
    return runs, to_train, targets


def train(runs: list[LearnedRun], args, num_tokens: int) -> None:
    for i, run in enumerate(runs, 1):
        command = run.command(args.config, args.overrides, num_tokens)
        if run.latest() is not None:
            command.append("--resume=auto")
        print(f"\n[benchmark] training {run.name} for the {budget_name(run.budget)}% budget ({i}/{len(runs)}), "
              f"into {run.folder}:\n  {shown(command)}", flush=True)
        result = subprocess.run(command, cwd=ROOT)
        if result.returncode != 0:
            raise SystemExit(f"error: training for the {budget_name(run.budget)}% budget failed (exit {result.returncode}); "
                             f"its log is in {run.folder}/logs/training.log")
        (run.folder / FINGERPRINT).write_text(args.fingerprint + "\n")


# ---------------------------------------------------------------------------------------- searched schedules
def schedule_search_space(config: Config, budget: float) -> dict:
    """What the schedule search varies at one budget: the merger's share, the pruners' keep ratios and layers,
    and the importance-loss weights."""
    layers = list(config.method_settings.pruning_layers)
    earlier = [layer - 1 for layer in layers]
    layer_choices = [layers] + ([earlier] if earlier[0] >= 1 else [])  # a pruner needs a layer before it
    stages = len(layers)
    return {
        "method_settings.merge_ratio": {"type": "float", "low": budget, "high": min(1.0, 2 * budget)},
        "method_settings.pruner_keep_ratios": {"type": "categorical",
                                               "choices": [[r] * stages for r in (0.8, 0.6, 0.4)]},
        "method_settings.pruning_layers": {"type": "categorical", "choices": layer_choices},
        "method_settings.merge_importance_weight": {"type": "float", "low": 1.0, "high": 10.0, "log": True},
        "method_settings.pruner_importance_weight": {"type": "float", "low": 1.0, "high": 10.0, "log": True},
    }


def train_searched(searched: list[SearchedRun], args, config: Config, backbone: LlavaBackbone, kept: dict[float, int],
                   targets: dict[tuple[float, str], float], flops_batches: list[dict]) -> None:
    """Every searched run without a checkpoint: its schedule from ``--schedules-from``, or searched here under
    ToMe's FLOPs, then trained on this run's data."""
    for run in searched:
        if run.latest() is not None:
            continue
        if args.schedules_from is not None:  # a schedule searched before (on other data), trained on this data
            source = args.schedules_from / run.folder.name / "best_schedule.yaml"
            train_schedule(run, config, yaml.safe_load(source.read_text())["method_settings"], args.fingerprint)
        else:
            cap = targets.get((run.budget, "tome"))  # measured already when the learned rows match ToMe
            if cap is None:
                layers = list(config.method_settings.pruning_layers)
                cap = flops_ratio(build_baseline("tome", backbone, kept[run.budget], layers), flops_batches)
            search_schedule(run, config, args.search, cap, args.fingerprint)


def search_schedule(run: SearchedRun, config: Config, trials: int, flops_cap: float, fingerprint_text: str) -> None:
    """Run the Optuna search for ``run.budget`` under ``flops_cap`` (main.py's optuna mode), then train its best config.

    A trial is a shortened run (60% of the steps, one evaluation at the end on at most 300 questions) on a
    validation draw of the data (``data_settings.seed`` + 1), so the benchmark's eval split never picks the winner.
    """
    data = config_to_dict(config)
    data["manager_settings"].update(mode="optuna", output_dir=str(run.folder / "search"))
    data["method_settings"]["merge_budget"] = "fixed"  # an equal budget for every image, as the other rows
    data["data_settings"]["seed"] = config.data_settings.seed + 1
    data["data_settings"]["synthetic_eval_size"] = min(300, config.data_settings.synthetic_eval_size)
    steps = max(1, round(0.6 * run_steps(config)))
    data["trainer_settings"].update(max_steps=steps, eval_every=steps, save_every=steps)
    data["search_settings"].update(enable=True, n_trials=trials, study_name=run.study, flops_budget=round(flops_cap, 4),
                                   objectives=[{"metric": "accuracy_hard", "direction": "maximize"}],
                                   search_space=schedule_search_space(config, run.budget))
    search_config = run.folder / "search_config.yaml"
    search_config.parent.mkdir(parents=True, exist_ok=True)
    search_config.write_text(yaml.safe_dump(data, sort_keys=False))
    search = [sys.executable, "main.py", "--config", str(search_config)]
    print(f"\n[benchmark] searching the schedule for the {budget_name(run.budget)}% budget ({trials} trials, FLOPs at most "
          f"{flops_cap:.1%} of unpruned):\n  {shown(search)}", flush=True)
    _run_or_exit(search, f"the schedule search for the {budget_name(run.budget)}% budget", run.folder / "search")
    if not run.best_config.exists():
        raise SystemExit(f"error: no trial of the {budget_name(run.budget)}% search fitted the FLOPs cap "
                         f"{flops_cap:.1%}; rerun with more trials (--search N), its study resumes in {run.folder}/search")
    train_schedule(run, config, yaml.safe_load(run.best_config.read_text())["method_settings"], fingerprint_text)


def train_schedule(run: SearchedRun, config: Config, method_settings: dict, fingerprint_text: str) -> None:
    """Train ``method_settings`` (a searched schedule) with the rest of ``config`` into ``run.folder / "run"``."""
    best = config_to_dict(config)
    best["method_settings"] = method_settings
    best["manager_settings"].update(mode="train", output_dir=str(run.folder / "run"))
    best["search_settings"]["enable"] = False
    final_config = run.folder / "best_schedule.yaml"
    final_config.parent.mkdir(parents=True, exist_ok=True)
    final_config.write_text(yaml.safe_dump(best, sort_keys=False))
    train_best = [sys.executable, "main.py", "--config", str(final_config)]
    if run.latest() is not None:
        train_best.append("--resume=auto")
    print(f"[benchmark] training the searched schedule on the benchmark's data:\n  {shown(train_best)}", flush=True)
    _run_or_exit(train_best, f"training the searched schedule for the {budget_name(run.budget)}% budget", run.folder / "run")
    (run.folder / FINGERPRINT).write_text(fingerprint_text + "\n")


# ---------------------------------------------------------------------------------------- trained models
def fingerprint(backbone: LlavaBackbone, train_set, eval_set, samples: int = 64) -> str:
    """A hash of the projector's and output layer's weights and of the first training and eval questions and answers
    (the eval set chooses the run's reported checkpoint): it changes when the backbone is retrained or the data
    generator changes."""
    digest = hashlib.sha256()
    for tensor in (*backbone.projector.state_dict().values(), backbone.lm_head.weight):
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    for data in (train_set, eval_set):
        for i in range(min(samples, len(data))):
            digest.update(f"{data[i].question}\t{data[i].answer}\n".encode())
    return digest.hexdigest()[:16]


def load_run(path: Path, backbone: LlavaBackbone) -> tuple[PrunedLlava, Config, dict]:
    """The pruned model of a training-state file (trainers/inference/pruned_model.py loads it), its config and its state."""
    pruned = load_pruned(path, backbone=backbone)
    return pruned.model, pruned.config, load(path)


def fingerprint_problem(folder: Path, expected: str) -> list[str]:
    marker = folder / FINGERPRINT
    if marker.exists() and marker.read_text().strip() != expected:
        return [f"{folder} was trained on other backbone weights or other training data than this run's "
                f"(fingerprint {marker.read_text().strip()} vs {expected}); move it away and rerun"]
    return []


# what a learned run's command trains with, beside the data and the backbone (its fingerprint): a run trained with
# other values of these is not today's method
RECIPE_KEYS = ("method_settings", "trainer_settings.dl_settings.epochs", "trainer_settings.dl_settings.batch_size",
               "trainer_settings.dl_settings.optimizers", "manager_settings.seed", "trainer_settings.eval_every",
               "trainer_settings.best_metric", "trainer_settings.best_mode")


def load_learned(run: LearnedRun, backbone: LlavaBackbone, expected_fingerprint: str,
                 expected: Config | None = None, best: bool = True) -> tuple[PrunedLlava, float, int]:
    """The run's reported modules (``best``: those of its best evaluation, else its last), the temperature they were
    evaluated at, and the step; checked against the budget and, given ``expected`` (the config its command trains
    with now), against the method, optimizers, batch, torch seed and checkpoint choice it was trained with
    (RECIPE_KEYS): a run trained before a default changed is not reported as today's method."""
    path = run.reported(best)
    model, config, state = load_run(path, backbone)
    budgets = [run.merged, *stage_budgets(run.merged, run.ratios)]
    got = [model.merged_tokens, *model.stage_budgets]
    problems = []
    changed = [] if expected is None else config_differences(config_to_dict(config), expected, RECIPE_KEYS)
    if changed:
        problems.append(f"{path} was trained with other settings than its command sets now (there -> now: "
                        + ", ".join(changed) + f"); move {run.folder} away and rerun with --train-missing")
    if got != budgets or list(config.method_settings.pruning_layers) != sorted(model.stage_of_layer):
        problems.append(f"{path} was trained for vision tokens {' → '.join(map(str, got))}, the "
                        f"{budget_name(run.budget)}% budget needs {' → '.join(map(str, budgets))}; move {run.folder} "
                        "away and rerun with --train-missing")
    problems += fingerprint_problem(run.folder, expected_fingerprint)
    if problems:
        raise BenchmarkError(problems)
    return model, float(state["temperature"]), int(state["step"])


def run_config(run: LearnedRun, args, num_tokens: int) -> Config:
    """The config the run's command trains with: the config, the user's --set, the run's schedule."""
    return load_config(args.config, [*args.overrides, *run.overrides(num_tokens)])


def load_searched(run: SearchedRun, backbone: LlavaBackbone, expected_fingerprint: str,
                  best: bool = True) -> tuple[PrunedLlava, float, int]:
    """The searched schedule's retrained run: its reported modules (as :func:`load_learned`), temperature and step."""
    problems = fingerprint_problem(run.folder, expected_fingerprint)
    if problems:
        raise BenchmarkError(problems)
    model, _, state = load_run(run.reported(best), backbone)
    return model, float(state["temperature"]), int(state["step"])


def load_trained(runs: list[LearnedRun], searched: list[SearchedRun], args,
                 backbone: LlavaBackbone) -> tuple[dict, dict]:
    """{(budget, match, variant): (run, model, tau, step)} of the learned runs and {budget: (model, tau, step)} of the
    searched ones, each checked (:func:`load_learned`, :func:`load_searched`)."""
    n, best = backbone.num_vision_tokens, args.best
    learned = {(run.budget, run.match, run.variant): (run, *load_learned(run, backbone, args.fingerprint,
                                                                          run_config(run, args, n), best))
               for run in runs}
    return learned, {run.budget: load_searched(run, backbone, args.fingerprint, best) for run in searched}


# ---------------------------------------------------------------------------------------- measuring
@dataclass
class EvalBatches:
    """The prompt-only batches the table scores (the first ``--limit`` questions), those the FLOPs targets are
    measured on (the whole eval split, whatever --limit says: a run's schedule does not depend on it), and the batch
    whose prefill is timed."""

    questions: int
    scored: list[dict]
    flops: list[dict]
    timing: dict


def benchmark_batches(args, config: Config, backbone: LlavaBackbone) -> EvalBatches:
    data = config.data_settings
    if args.eval_size is not None:
        data = dataclasses.replace(data, synthetic_eval_size=args.eval_size)
    eval_set = build_test_set(data)
    size = min(len(eval_set), args.limit or len(eval_set))
    prompts = VQACollator(backbone.processor, with_answers=False)
    batch_size = config.data_settings.eval_batch_size
    scored = list(batches(torch.utils.data.Subset(eval_set, range(size)), prompts, batch_size))
    flops = scored if size == len(eval_set) else list(batches(eval_set, prompts, batch_size))
    timing = prompts([eval_set[i] for i in range(min(args.timing_batch, len(eval_set)))])
    return EvalBatches(size, scored, flops, timing)


def build_setups(args, config: Config, backbone: LlavaBackbone, kept: dict[float, int], learned: dict,
                 learned_searched: dict) -> list[tuple[str, float | None, PrunedLlava, float]]:
    """(row name, budget, model, tau) of every row: the unpruned model, then per budget the asked methods in order."""
    layers = list(config.method_settings.pruning_layers)
    found = [("unpruned", None, PrunedLlava(backbone).eval(), 1.0)]
    for budget in args.budgets:
        for method in args.methods:
            if method == "learned":
                found += [(run.name, budget, model, tau) for (b, _, _), (run, model, tau, _) in learned.items()
                          if b == budget]
                if budget in learned_searched:
                    found.append((SEARCHED, budget, *learned_searched[budget][:2]))
            else:
                found.append((method, budget, build_baseline(method, backbone, kept[budget], layers,
                                                             args.fastv_layer, args.seed, args.clip), 1.0))
    return found


def measure(name: str, budget: float | None, model: PrunedLlava, tau: float, eval_batches: list[dict],
            max_new_tokens: int) -> dict:
    """One row of the table, all but the time (measured afterwards for every setting at once): hard-mode accuracy
    overall and per type, mean prefill FLOPs per sample and vision tokens per layer, from the evaluator."""
    results = pruned_results(model, eval_batches, tau, max_new_tokens, soft=False, desc=name)
    metrics = summarize_pruned(results)
    per_layer = vision_tokens_per_layer(results)
    by_type = {key.split("/", 1)[1]: value for key, value in metrics.items() if key.startswith("accuracy_hard/")}
    return {"budget": budget, "kept": per_layer[-1], "method": name, "accuracy": metrics["accuracy_hard"],
            "accuracy_by_type": by_type, "flops": metrics["flops_pruned"], "flops_baseline": metrics["flops_baseline"],
            "stages": stage_counts(model, per_layer), "mean_vision_tokens": sum(per_layer) / len(per_layer)}


def time_prefills(settings: list[tuple[PrunedLlava, float]], batch: dict, repeats: int) -> list[float]:
    """Median hard-mode prefill seconds of every (model, tau) on ``batch``, the settings interleaved round by round."""
    device = settings[0][0].backbone.device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    pixels = batch["pixel_values"].to(device, settings[0][0].backbone.dtype)
    prefills = [lambda model=model, tau=tau: model(ids, pixels, mask, mode="hard", tau=tau) for model, tau in settings]
    with torch.no_grad():
        return timed_interleaved(prefills, repeats, device)


def measure_rows(setups: list[tuple[str, float | None, PrunedLlava, float]], data: EvalBatches, max_new_tokens: int,
                 repeats: int) -> list[dict]:
    """The table's rows of :func:`build_setups`' settings: each scored (:func:`measure`), then their prefills timed
    together (:func:`time_prefills`) and stated against the unpruned row (:func:`finish_rows`)."""
    rows = [measure(name, budget, model, tau, data.scored, max_new_tokens)
            for name, budget, model, tau in tqdm(setups, desc="benchmark: accuracy")]
    print(f"timing the prefill of {len(setups)} setups, {repeats} interleaved rounds...", flush=True)
    for row, seconds in zip(rows, time_prefills([(model, tau) for _, _, model, tau in setups], data.timing, repeats)):
        row["prefill_s"] = seconds
    finish_rows(rows)
    return rows


def finish_rows(rows: list[dict]) -> None:
    """Accuracy retained, FLOPs and time relative to the unpruned row (the first)."""
    base = rows[0]
    for row in rows:
        row["retained"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else float("nan")
        row["flops_ratio"] = row["flops"] / base["flops"]
        row["speedup"] = base["prefill_s"] / row["prefill_s"]


# ---------------------------------------------------------------------------------------- what the table says
def header(args, config: Config, data: EvalBatches) -> str:
    settings = config.backbone_settings
    return (f"{settings.name_or_path}, {settings.dtype}, {data.questions} eval questions "
            f"({config.data_settings.source}), pruning layers {list(config.method_settings.pruning_layers)}, FastV K={args.fastv_layer}; {machine()}; "
            f"prefill timed on a batch of {data.timing['input_ids'].shape[0]}, median of {args.repeats}"
            + (f"; CDPruner's relevance from {cdpruner_relevance(args.clip, settings.name_or_path)}"
               if "cdpruner" in args.methods else ""))


def cdpruner_relevance(clip: str | None, backbone: str) -> str:
    """Where CDPruner reads each token's relevance to the instruction (models/baselines.text_relevance)."""
    folder = clip if clip is not None else clip_folder_of(backbone)
    return f"the CLIP text tower in {folder}" if folder is not None else "the instruction's word embeddings"


def notes(args, learned: dict, learned_searched: dict, targets: dict[tuple[float, str], float]) -> str:
    """Where the learned rows come from: their folders, the FLOPs they match and their steps, the variants' settings,
    the searched schedules' origin."""
    steps = ", ".join(f"{budget_name(b)}% at {match}'s {targets[b, match]:.1%}"
                      + (f", {variant.label}" if variant else "") + f": step {step}"
                      for (b, match, variant), (_, _, _, step) in learned.items())
    chosen = ("the checkpoints of their best evaluation on their own eval questions" if args.best
              else "the final checkpoints")
    text = (f"\nlearned (<method> FLOPs): {chosen} of {args.learned_root}/learned_<pct>_<method>, each "
            f"trained to spend at most that method's prefill FLOPs ({steps})\n") if learned else "\n"
    for variant in args.variants:
        text += (f"learned, {variant.label} (<method> FLOPs): the same, in {args.learned_root}/learned_<pct>_<method>_"
                 f"{variant.slug}, trained with {' '.join(variant.overrides)}\n")
    if learned_searched:
        origin = (f"the schedules searched in {args.schedules_from}" if args.schedules_from else
                  f"the best schedule of a {args.search}-trial search per budget under ToMe's FLOPs")
        text += f"{SEARCHED}: {origin}, trained in {args.learned_root}/searched_<pct>/run\n"
    return text
