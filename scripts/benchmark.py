"""Learned pruning against FastV, PyramidDrop, VisionZip, ToMe, random and pooling at equal token budgets.

    python scripts/benchmark.py --train-missing           # tiny default: train what is missing, then benchmark
    python scripts/benchmark.py                           # the same, once the learned checkpoints exist
    python scripts/benchmark.py --budgets 0.5 0.25 --methods learned fastv tome

A budget is the fraction of the N vision tokens left after the last stage (models/baselines
explains what that means for each method). For every budget and method, in one process and
through the same hard-pruned forward, cached greedy generation and answer scoring: accuracy on
the config's eval split and the accuracy retained against the unpruned model, LLM prefill FLOPs
per sample (models/flops.py, all tokens, the selection modules' own cost included), the
measured prefill time (median of repeats on one batch), and the vision tokens entering the LLM
and each pruning stage, counted from the tensors. Writes results.csv, results.md and
accuracy_vs_flops.png to --out.

The learned method is compared at equal FLOPs: at budget K, for each method M of ``--match-flops``
(default ToMe, the cheapest strong baseline, and FastV), one run of ``main.py`` in
``<learned-root>/learned_<pct>_<M>`` (its final step) whose schedule spends at most M's measured
prefill FLOPs at K (``matched_schedule``): each pruning stage keeps 3/4 of what enters it (``--stage-keep``;
more pruning only where needed to end at K at most), and the merger keeps the most tokens that fit (when it
keeps all N and FLOPs are left, the stages keep more, up to the FLOPs).
The command that trains a missing run is printed; ``--train-missing`` runs it (about 2 minutes
per run on 2 CPU cores for the tiny default). ``--variant LABEL KEY=VALUE ...`` also trains and reports the
learned method with other settings, each at the same FLOPs, in ``learned_<pct>_<M>_<label>``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import itertools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

from configs.schema import (Config, ConfigError, check_against_backbone, config_from_dict, config_to_dict,  # noqa: E402
                            load_config)
from data.build import batches, build_datasets  # noqa: E402
from data.collator import VQACollator  # noqa: E402
from data.scoring import accuracy_by_type  # noqa: E402
from models.backbones import load_backbone, read_backbone_shape  # noqa: E402
from models.baselines import build_baseline, check_baseline, kept_tokens  # noqa: E402
from models.layer_pruner import geometric_ratios, stage_budgets  # noqa: E402
from models.llava_backbone import BackboneNotFoundError, BackboneShape, LlavaBackbone  # noqa: E402
from models.pruned_llava import PrunedLlava  # noqa: E402
from trainers.checkpoint import Checkpointer, load  # noqa: E402
from trainers.inference.build import build_pruned_model  # noqa: E402
from trainers.inference.evaluation import generate_pruned, prefill_flops, sample_flops, stage_counts  # noqa: E402
from trainers.inference.pruned_model import load_pruned  # noqa: E402
from trainers.inference.timing import machine, timed_interleaved  # noqa: E402
from trainers.training.trainer import planned_steps  # noqa: E402
from trainers.training.world import resolve_device  # noqa: E402

METHODS = ("learned", "fastv", "pyramiddrop", "visionzip", "tome", "tome_pa", "pooling", "random")
FINGERPRINT = "fingerprint.txt"  # backbone weights and training data of a run the benchmark trained


class BenchmarkError(ValueError):
    """Bad input: every problem found, each with its fix."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(f"  - {p}" for p in problems))
        self.problems = problems


# ---------------------------------------------------------------------------------------- the learned method's runs
STAGE_KEEP = 0.75  # default share of the tokens entering it that each pruning stage of a learned row keeps


def stage_ratios(merged: int, num_keep: int, stages: int, stage_keep: float = STAGE_KEEP) -> list[float]:
    """The learned rows' rule: each stage keeps ``stage_keep`` of what enters it, or, where that would leave more than
    ``num_keep`` after the last stage, the equal ratios that end at exactly ``num_keep``."""
    if stages == 0 or stage_budgets(merged, [stage_keep] * stages)[-1] <= num_keep:
        return [stage_keep] * stages
    return geometric_ratios(merged, num_keep, stages)


def matched_schedule(num_tokens: int, num_keep: int, stages: int, flops_of, target: float,
                     stage_keep: float = STAGE_KEEP) -> tuple[int, list[float]]:
    """(merger tokens, pruner keep ratios) of the learned row that spends at most ``target`` prefill FLOPs.

    The FLOPs go to the early layers first. The merger keeps the most tokens m in [K, N] whose schedule
    (:func:`stage_ratios`: m tokens, then the stages down to at most K) costs ``flops_of(m, ratios)`` <= ``target``;
    the cost grows with m, so m is found by bisection. When even m = N leaves FLOPs over, the stages keep more:
    the largest share in [``stage_keep``, 1], in steps of 1/200, that still fits. Raises ValueError when even
    m = K costs more.
    """
    def fits(m: int, keep: float = stage_keep) -> bool:
        return flops_of(m, stage_ratios(m, num_keep, stages, keep)) <= target

    if not fits(num_keep):
        raise ValueError(f"no learned schedule keeping at most {num_keep} tokens fits {target:.1%} of the unpruned "
                         f"FLOPs (the merger keeping {num_keep} already costs more)")
    merged = largest_fitting(num_keep, num_tokens, fits)
    keep = stage_keep
    if merged == num_tokens and stages:
        steps = [stage_keep + (1 - stage_keep) * i / 200 for i in range(201)]
        keep = round(steps[largest_fitting(0, 200, lambda i: fits(num_tokens, steps[i]))], 6)
    return merged, stage_ratios(merged, num_keep, stages, keep)


def largest_fitting(low: int, high: int, fits) -> int:
    """The largest i in [low, high] with ``fits(i)``, for a ``fits`` that holds at ``low`` and, once false, stays
    false (bisection)."""
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def budget_name(budget: float) -> str:
    return f"{budget * 100:g}"


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
    at that budget (:func:`matched_schedule`): one main.py run in ``folder``."""

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
        return Checkpointer(self.folder / "checkpoints", keep_last=1).latest()


SEARCHED = "learned (searched)"


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
        return Checkpointer(self.folder / "run" / "checkpoints", keep_last=1).latest()


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


def _run_or_exit(command: list[str], what: str, folder: Path) -> None:
    result = subprocess.run(command, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"error: {what} failed (exit {result.returncode}); its logs are in {folder}")


def run_steps(config: Config) -> int:
    """The steps main.py runs for ``config`` in one process (the trainer's own count)."""
    return planned_steps(config, len(build_datasets(config.data_settings)[0]))[1]


def shown(command: list[str]) -> str:
    return shlex.join(["python", *command[1:]])


# ---------------------------------------------------------------------------------------- checks before any weights load
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
    targets = {(budget, match): flops_ratio(build_baseline(match, backbone, k, layers, args.fastv_layer, args.seed),
                                            eval_batches)
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


# ---------------------------------------------------------------------------------------- models
def fingerprint(backbone: LlavaBackbone, train_set, samples: int = 64) -> str:
    """A hash of the projector's and output layer's weights and of the first training questions and answers:
    it changes when the backbone is retrained or the data generator changes."""
    digest = hashlib.sha256()
    for tensor in (*backbone.projector.state_dict().values(), backbone.lm_head.weight):
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    for i in range(min(samples, len(train_set))):
        digest.update(f"{train_set[i].question}\t{train_set[i].answer}\n".encode())
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


def load_learned(run: LearnedRun, backbone: LlavaBackbone, expected_fingerprint: str,
                 expected_method: dict | None = None) -> tuple[PrunedLlava, float, int]:
    """The run's final modules, the temperature they were evaluated at, and the step; checked against the budget
    and, given ``expected_method`` (the method_settings its command trains with now), against the method settings
    it was trained with: a run trained before a default changed is not reported as today's method."""
    path = run.latest()
    model, config, state = load_run(path, backbone)
    expected = [run.merged, *stage_budgets(run.merged, run.ratios)]
    got = [model.merged_tokens, *model.stage_budgets]
    problems = []
    trained = config_to_dict(config)["method_settings"]
    changed = sorted(k for k in (expected_method or {}) if trained.get(k) != expected_method[k])
    if changed:
        problems.append(f"{path} was trained with other method settings than its command sets now ("
                        + ", ".join(f"{k}: {trained.get(k)!r} there, {expected_method[k]!r} now" for k in changed)
                        + f"); move {run.folder} away and rerun with --train-missing")
    if got != expected or list(config.method_settings.pruning_layers) != sorted(model.stage_of_layer):
        problems.append(f"{path} was trained for vision tokens {' → '.join(map(str, got))}, the "
                        f"{budget_name(run.budget)}% budget needs {' → '.join(map(str, expected))}; move {run.folder} "
                        "away and rerun with --train-missing")
    problems += fingerprint_problem(run.folder, expected_fingerprint)
    if problems:
        raise BenchmarkError(problems)
    return model, float(state["temperature"]), int(state["step"])


def run_method_settings(run: LearnedRun, args, num_tokens: int) -> dict:
    """The method_settings the run's command trains with: the config, the user's --set, the run's schedule."""
    return config_to_dict(load_config(args.config, [*args.overrides, *run.overrides(num_tokens)]))["method_settings"]


def load_searched(run: SearchedRun, backbone: LlavaBackbone, expected_fingerprint: str) -> tuple[PrunedLlava, float, int]:
    """The searched schedule's retrained run: its final modules, temperature and step."""
    problems = fingerprint_problem(run.folder, expected_fingerprint)
    if problems:
        raise BenchmarkError(problems)
    model, _, state = load_run(run.latest(), backbone)
    return model, float(state["temperature"]), int(state["step"])


def flops_ratio(model: PrunedLlava, eval_batches: list[dict]) -> float:
    """``model``'s hard-mode prefill FLOPs over the unpruned model's on the eval batches (models/flops.py, the
    selection modules' own cost included), as the table reports them.

    Token counts do not depend on trained weights, and a sample's FLOPs depend only on its real length (the prompt
    around the question is fixed), so one sample of each length runs, weighted by how many samples have it.
    """
    bb = model.backbone
    seen: dict[int, int] = {}  # real length -> samples of that length
    picked = []  # (batch, rows): the first sample of each length
    for batch in eval_batches:
        rows = []
        for i, n in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
            if n not in seen:
                seen[n] = 0
                rows.append(i)
            seen[n] += 1
        if rows:
            picked.append((batch, rows))
    pruned = base = 0.0
    with torch.no_grad():
        for batch, rows in picked:
            ids, mask = batch["input_ids"][rows].to(bb.device), batch["attention_mask"][rows].to(bb.device)
            pixels = batch["pixel_values"][rows].to(bb.device, bb.dtype)
            f_base_all, f_pruned_all = sample_flops(model, model(ids, pixels, mask, mode="hard"), mask)
            for n, f_pruned, f_base in zip(mask.sum(dim=1).tolist(), f_pruned_all, f_base_all):
                pruned, base = pruned + seen[n] * f_pruned, base + seen[n] * f_base
    return pruned / base


# ---------------------------------------------------------------------------------------- measuring
def evaluate(model: PrunedLlava, eval_batches: list[dict], tau: float, max_new_tokens: int, desc: str) -> dict:
    """Hard-mode accuracy (overall and per type), mean prefill FLOPs per sample and vision tokens per layer."""
    predictions, references, types = [], [], []
    flops = {"flops_pruned": 0.0, "flops_baseline": 0.0}
    per_layer = None
    for batch in tqdm(eval_batches, desc=desc, leave=False):
        answers, prefill = generate_pruned(model, batch, "hard", tau, max_new_tokens)
        predictions += answers
        references += batch["answers"]
        types += batch["question_types"]
        measured = prefill_flops(model, prefill, batch["attention_mask"].to(model.backbone.device))
        for key in flops:
            flops[key] += measured[key] * len(answers)
        per_layer = prefill.vision_tokens_per_layer
    accuracy = accuracy_by_type(predictions, references, types)
    return {"accuracy": accuracy, "flops": flops["flops_pruned"] / len(predictions),
            "flops_baseline": flops["flops_baseline"] / len(predictions), "vision_tokens_per_layer": per_layer}


def measure(name: str, budget: float | None, model: PrunedLlava, tau: float, eval_batches: list[dict],
            max_new_tokens: int) -> dict:
    """One row of the table, all but the time (measured afterwards for every setting at once)."""
    result = evaluate(model, eval_batches, tau, max_new_tokens, desc=name)
    per_layer = result["vision_tokens_per_layer"]
    return {"budget": budget, "kept": per_layer[-1], "method": name, "accuracy": result["accuracy"]["overall"],
            "accuracy_by_type": {k: v for k, v in result["accuracy"].items() if k != "overall"},
            "flops": result["flops"], "flops_baseline": result["flops_baseline"],
            "stages": stage_counts(model, per_layer), "mean_vision_tokens": sum(per_layer) / len(per_layer)}


def time_prefills(settings: list[tuple[PrunedLlava, float]], batch: dict, repeats: int) -> list[float]:
    """Median hard-mode prefill seconds of every (model, tau) on ``batch``, the settings interleaved round by round."""
    device = settings[0][0].backbone.device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    pixels = batch["pixel_values"].to(device, settings[0][0].backbone.dtype)
    prefills = [lambda model=model, tau=tau: model(ids, pixels, mask, mode="hard", tau=tau) for model, tau in settings]
    with torch.no_grad():
        return timed_interleaved(prefills, repeats, device)


# ---------------------------------------------------------------------------------------- writing
def finish_rows(rows: list[dict]) -> None:
    """Accuracy retained, FLOPs and time relative to the unpruned row (the first)."""
    base = rows[0]
    for row in rows:
        row["retained"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else float("nan")
        row["flops_ratio"] = row["flops"] / base["flops"]
        row["speedup"] = base["prefill_s"] / row["prefill_s"]


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    budgets = sorted({row["budget"] for row in rows[1:]}, reverse=True)
    markers = dict(zip(budgets, "osD^v<>ph"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
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
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml", help="the run's config: backbone, eval data, pruning layers")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="dotted.key=value",
                        help="override a config key (also passed to main.py when training the learned method)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.11],
                        help="fractions of the vision tokens left after the last stage")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--match-flops", nargs="+", default=["tome", "fastv"], choices=[m for m in METHODS if m != "learned"],
                        metavar="METHOD", help="train one learned run per budget and METHOD, spending at most METHOD's "
                                               "prefill FLOPs at that budget (default: tome fastv)")
    parser.add_argument("--stage-keep", type=float, default=STAGE_KEEP, metavar="R",
                        help="share of the tokens entering it that each pruning stage of a learned row keeps "
                             f"(less only where needed to end at the budget; default {STAGE_KEEP})")
    parser.add_argument("--fastv-layer", type=int, default=2, help="FastV's K: prune before decoder layer K")
    parser.add_argument("--learned-root", type=Path, default=Path("outputs/benchmark"),
                        help="holds learned_<pct>_<method>/, one main.py run per budget and --match-flops method "
                             "(and learned_<pct>_<method>_<label>/ per --variant)")
    parser.add_argument("--variant", dest="variants", action="append", nargs="+", default=[], metavar="WORD",
                        help="LABEL dotted.key=value ...: also train and report the learned method with these settings "
                             "(repeatable), e.g. --variant 'no labels' method_settings.relevance_weight=0 "
                             "method_settings.merger_type=simple")
    parser.add_argument("--train-missing", action="store_true", help="train (or finish) missing learned runs with main.py")
    parser.add_argument("--schedules-from", type=Path, metavar="ROOT",
                        help="report 'learned (searched)' with the schedules a search under ROOT found (its "
                             "searched_<pct>/best_schedule.yaml), trained on this run's data: no new search")
    parser.add_argument("--search", type=int, default=0, metavar="N",
                        help="also report the learned method with a schedule found by an N-trial Optuna search per "
                             "budget under ToMe's FLOPs (run when missing; 0: off)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark"))
    parser.add_argument("--eval-size", type=int, metavar="N",
                        help="synthetic data: draw N eval questions for the table (default: the config's "
                             "synthetic_eval_size; the learned runs' own evaluations keep the config's)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N eval questions")
    parser.add_argument("--timing-batch", type=int, default=8, help="batch size of the timed prefill")
    parser.add_argument("--repeats", type=int, default=20, help="timed prefills per setting (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="the random baseline's draw")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
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
        problems = check_against_backbone(config, shape.num_layers, shape.num_vision_tokens, shape.image_size,
                                          shape.one_patch_grid)
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
    except (ConfigError, BackboneNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BenchmarkError as err:
        print(f"error: the benchmark cannot run as asked:\n{err}", file=sys.stderr)
        return 2

    settings = config.backbone_settings
    backbone = load_backbone(settings.name_or_path, settings.dtype, settings.attn_implementation,
                                             resolve_device(settings.device))
    args.fingerprint = fingerprint(backbone, build_datasets(config.data_settings)[0])
    eval_data = config.data_settings
    if args.eval_size is not None:
        eval_data = dataclasses.replace(eval_data, synthetic_eval_size=args.eval_size)
    eval_set = build_datasets(eval_data)[1]
    size = min(len(eval_set), args.limit or len(eval_set))
    prompts = VQACollator(backbone.processor, with_answers=False)
    eval_batches = list(batches(torch.utils.data.Subset(eval_set, range(size)), prompts, config.data_settings.eval_batch_size))
    # FLOPs targets on the whole eval split, whatever --limit says: a run's schedule does not depend on it
    flops_batches = eval_batches if size == len(eval_set) else list(batches(eval_set, prompts, config.data_settings.eval_batch_size))
    timing_batch = prompts([eval_set[i] for i in range(min(args.timing_batch, len(eval_set)))])
    max_new = config.data_settings.max_new_tokens
    layers = list(config.method_settings.pruning_layers)

    try:
        runs, to_train, targets = learned_runs(args, config, backbone, kept, flops_batches)
    except BenchmarkError as err:
        print(f"error: the benchmark cannot run as asked:\n{err}", file=sys.stderr)
        return 2
    if to_train:
        train(to_train, args, shape.num_vision_tokens)
    for run in searched:
        if run.latest() is not None:
            continue
        if args.schedules_from is not None:  # a schedule searched before (on other data), trained on this data
            source = args.schedules_from / run.folder.name / "best_schedule.yaml"
            train_schedule(run, config, yaml.safe_load(source.read_text())["method_settings"], args.fingerprint)
        else:
            cap = targets.get((run.budget, "tome"))  # measured already when the learned rows match ToMe
            if cap is None:
                cap = flops_ratio(build_baseline("tome", backbone, kept[run.budget], layers), flops_batches)
            search_schedule(run, config, args.search, cap, args.fingerprint)
    try:
        learned = {(run.budget, run.match, run.variant): (run, *load_learned(run, backbone, args.fingerprint,
                                                                 run_method_settings(run, args, shape.num_vision_tokens)))
                   for run in runs}
        learned_searched = {run.budget: load_searched(run, backbone, args.fingerprint) for run in searched}
    except BenchmarkError as err:
        print(f"error: the benchmark cannot run as asked:\n{err}", file=sys.stderr)
        return 2

    setups = [("unpruned", None, PrunedLlava(backbone).eval(), 1.0)]
    for budget in args.budgets:
        for method in args.methods:
            if method == "learned":
                setups += [(run.name, budget, model, tau) for (b, _, _), (run, model, tau, _) in learned.items() if b == budget]
                if budget in learned_searched:
                    setups.append((SEARCHED, budget, *learned_searched[budget][:2]))
            else:
                setups.append((method, budget, build_baseline(method, backbone, kept[budget], layers,
                                                              args.fastv_layer, args.seed), 1.0))
    rows = []
    for name, budget, model, tau in tqdm(setups, desc="benchmark: accuracy"):
        rows.append(measure(name, budget, model, tau, eval_batches, max_new))
    print(f"timing the prefill of {len(setups)} setups, {args.repeats} interleaved rounds...", flush=True)
    for row, seconds in zip(rows, time_prefills([(model, tau) for _, _, model, tau in setups], timing_batch,
                                                args.repeats)):
        row["prefill_s"] = seconds
    finish_rows(rows)

    args.out.mkdir(parents=True, exist_ok=True)
    n = shape.num_vision_tokens
    header = (f"{settings.name_or_path}, {settings.dtype}, {size} eval questions ({config.data_settings.source}), "
              f"pruning layers {layers}, FastV K={args.fastv_layer}; {machine()}; prefill timed on a batch of "
              f"{timing_batch['input_ids'].shape[0]}, median of {args.repeats}")
    steps = ", ".join(f"{budget_name(b)}% at {match}'s {targets[b, match]:.1%}"
                      + (f", {variant.label}" if variant else "") + f": step {step}"
                      for (b, match, variant), (_, _, _, step) in learned.items())
    table = markdown_table(rows, n)
    notes = (f"\nlearned (<method> FLOPs): final checkpoints of {args.learned_root}/learned_<pct>_<method>, each "
             f"trained to spend at most that method's prefill FLOPs ({steps})\n") if learned else "\n"
    for variant in args.variants:
        notes += (f"learned, {variant.label} (<method> FLOPs): the same, in {args.learned_root}/learned_<pct>_<method>_"
                  f"{variant.slug}, trained with {' '.join(variant.overrides)}\n")
    if learned_searched:
        origin = (f"the schedules searched in {args.schedules_from}" if args.schedules_from else
                  f"the best schedule of a {args.search}-trial search per budget under ToMe's FLOPs")
        notes += f"{SEARCHED}: {origin}, trained in {args.learned_root}/searched_<pct>/run\n"
    (args.out / "results.md").write_text(f"{header}\n\n{table}\n{notes}")
    write_csv(rows, args.out / "results.csv")
    plot(rows, args.out / "accuracy_vs_flops.png", f"{Path(settings.name_or_path).name}: accuracy against cost, "
                                                     f"{size} questions, {machine()}")
    print(f"\n{header}\n\n{table}\n{notes}\nwrote {args.out}/results.md, results.csv, accuracy_vs_flops.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
