"""The run configuration: typed sections, validated at load, every problem reported at once.

A YAML file (the seed's sections plus ``backbone_settings`` and ``data_settings``) is merged
with ``--set dotted.key=value`` overrides, then turned into one frozen dataclass per section.
Loading collects every problem of the file, each with its dotted path: unknown keys (with
the closest valid key), wrong types, values out of range, and contradictions between keys.
Numbers written as strings (``"2e-05"``, or a bare ``1e-4``, which YAML 1.1 reads as a
string) become floats. Checks that need the backbone's shape (pruning layers within its
depth, the merge budget against its vision tokens) run on its ``config.json`` before any
weights are loaded: :func:`check_against_backbone`.

``search_settings`` declares the Optuna search: the objectives, an optional FLOPs budget, and
the search space as a mapping from dotted config keys to ranges or choices. Every bound and
choice is checked by building the config it would give, so a search space that would make a
trial's config invalid fails at load, not hours into the study.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """Every problem of one configuration, one per line."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


def num(default, *, ge=None, gt=None, le=None, lt=None):
    """A numeric field with bounds, checked at load."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt})


# ----------------------------------------------------------------------------- sections
# Each key's meaning is the comment right above it or at the end of its line, each section's its docstring:
# docs/configuration.md is rendered from them (python scripts/config_reference.py), and a key without one is refused.
@dataclass(frozen=True)
class ManagerSettings:
    """What runs and where: the run mode, the GPUs a search shares out, the output folder, the seed."""

    # train: train the modules; eval: evaluate what --resume names (a `training_state_*.pt`, auto for the latest step
    # of output_dir, a run's output folder, or a saved pruned_best/ or pruned_final/ folder; without --resume, the
    # untrained modules); optuna: the hyper-parameter search (needs search_settings.enable: true)
    mode: Literal["train", "eval", "optuna"] = "train"
    available_gpus: list[int] = field(default_factory=list)  # GPU ids the Optuna manager shares out; [] = CPU workers
    # GPUs per trial (and per train run): the frozen decoder layers are spread over them
    # (trainers/training/placement.py)
    gpus_per_subtask: int = num(1, ge=1)
    cpu_workers: int = num(1, ge=1)  # optuna mode with available_gpus []: worker processes on the CPU
    output_dir: str = "outputs"  # the run's folder: config, checkpoints, pruned_best/, pruned_final/, logs/, optuna/
    seed: int = 42  # torch seed of the run


@dataclass(frozen=True)
class OptimizerSettings:
    """One optimizer group: AdamW at ``lr``, with a linear warm-up from 0 over ``warmup_steps`` optimizer steps (or
    ``warmup_ratio`` of all of them), then ``scheduler``: constant, or a cosine decay to ``min_lr_ratio`` x lr at the
    last step (transformers' schedules: the first step of a warm-up runs at lr 0)."""

    lr: float = num(2e-5, gt=0)  # AdamW learning rate ("2e-05" and a bare 1e-4, strings to YAML, are read as numbers)
    weight_decay: float = num(0.0, ge=0)  # AdamW weight decay
    # the learning rate after the warm-up: constant, or cosine decay to min_lr_ratio x lr at the last step (stepped
    # once per optimizer step, checkpointed)
    scheduler: Literal["constant", "cosine"] = "constant"
    warmup_ratio: float = num(0.0, ge=0, lt=1)  # linear warm-up from 0 over this share of all steps (rounded up)
    warmup_steps: int | None = num(None, ge=0)  # the warm-up in optimizer steps instead; give this or warmup_ratio
    min_lr_ratio: float = num(0.0, ge=0, le=1)  # cosine only: the learning rate at the end, as a share of lr


@dataclass(frozen=True)
class Optimizers:
    """The three optimizer groups, each an AdamW of its own: ``token_merger``, ``layer_pruners`` and
    ``discriminator`` (whose default lr is 5e-4, the others' 2e-5)."""

    token_merger: OptimizerSettings = field(default_factory=OptimizerSettings)
    layer_pruners: OptimizerSettings = field(default_factory=OptimizerSettings)
    discriminator: OptimizerSettings = field(default_factory=lambda: OptimizerSettings(lr=5e-4))


@dataclass(frozen=True)
class DLSettings:
    """Epochs, the batch and how it is split, the optimizers."""

    epochs: int = num(1, ge=1)  # passes over the training set
    # the global batch of one optimizer step, over every process and accumulation step: each process computes
    # batch_size / (processes x gradient_accumulation_steps) samples at a time, so it must be a multiple of
    # processes x gradient_accumulation_steps (checked before any weight loads)
    batch_size: int = num(12, ge=1)
    # micro-batches per optimizer step on each process; the step is the same whatever the split
    gradient_accumulation_steps: int = num(1, ge=1)
    optimizers: Optimizers = field(default_factory=Optimizers)


@dataclass(frozen=True)
class TrainerSettings:
    """The training loop: log, evaluation and checkpoint intervals, clipping, precision, what an evaluation measures."""

    dl_settings: DLSettings = field(default_factory=DLSettings)
    log_every: int = num(10, ge=1)  # steps between the log's loss, temperature and throughput blocks
    eval_every: int = num(200, ge=1)  # steps between evaluations (and one at the end)
    save_every: int = num(200, ge=1)  # steps between checkpoints
    max_grad_norm: float = num(1.0, gt=0)  # gradient clipping, per optimizer group
    max_steps: int | None = num(None, ge=1)  # stop early (null: all epochs)
    keep_last: int = num(3, ge=1)  # step checkpoints kept on disk
    # eval metric that picks `*_best.pt` and pruned_best/: any metric an evaluation reports (losses are not measured
    # at evaluation), checked at load
    best_metric: str = "accuracy_hard"
    best_mode: Literal["max", "min"] = "max"  # whether the highest or the lowest best_metric is best
    # non-finite losses in a row before the run stops (each one skips its update; the stop leaves a checkpoint of the
    # last good state)
    max_nonfinite_steps: int = num(3, ge=1)
    # bf16 autocast through accelerate (GPUs); the config decides, not accelerate launch --mixed_precision
    mixed_precision: Literal["no", "bf16"] = "no"
    gradient_checkpointing: bool = False  # recompute decoder layers in backward (saves GPU memory)
    # evaluations also decode in soft mode (accuracy_soft; one forward per new token: the slow part of an evaluation)
    eval_soft: bool = True
    # evaluations also measure the unpruned backbone (accuracy_baseline, once per eval set); false: the summary
    # reports the accuracy drop as not measured
    eval_baseline: bool = True
    # where the run's scalars and hyper-parameters go: tensorboard (logs/tensorboard, with the kept-token pictures)
    # and any tracker accelerate supports that is installed (wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab,
    # trackio); [] logs to training.log only
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])


@dataclass(frozen=True)
class MethodSettings:
    """The method: the token merger, the layer pruners, temperature annealing, the loss weights, the discriminator."""

    # simple: an MLP scores each vision token; question_aware: the vision tokens attend to the question's word
    # embeddings, so the merger can drop what the question is not about
    merger_type: Literal["simple", "question_aware"] = "simple"
    merge_ratio: float = num(0.5, gt=0, le=1)  # fraction of the vision tokens the merger keeps
    # tokens the merger keeps: merge_ratio x the backbone's vision tokens (+-1), or null: each image keeps merge_ratio
    # of its own tokens (LLaVA-NeXT, Qwen2-VL); a --set of merge_ratio alone makes it null
    target_merge_tokens: int | None = num(288, ge=1)
    # weight of the merge sparsity loss (mean keep probability - merge_ratio)^2, p_i = sigmoid(s_i); with merge_budget
    # adaptive it steers the mean K (raise it when avg_merged_tokens drifts from the target)
    merge_sparsity_weight: float = num(1e-4, ge=0)
    # fixed: K = target_merge_tokens per image; adaptive: K per image from the scores, round(sum p_i) clamped to
    # [K/2, 2K], mean pulled to merge_ratio (the eval block then reports merged_tokens_min / merged_tokens_max)
    merge_budget: Literal["fixed", "adaptive"] = "fixed"
    # a token merges into the centres at least this cosine-similar to it, and is dropped when none is (-1: all merge,
    # the plain soft assignment; above 1: none does, the centres alone)
    merge_similarity_threshold: float = num(0.9, ge=-1, le=1.01)
    # the language model attends to a merged token in proportion to the tokens it stands for (ToMe's proportional
    # attention: log size added to every attention logit towards it)
    merge_proportional_attention: bool = False
    # ties among the merger's centres broken evenly over the image: the centres are the top K of score + this weight x
    # a fixed spatial prior in (0, 1] (models/token_merger.spread_prior); tokens more than the weight apart keep their
    # order; 0: the plain top K
    merge_spread_weight: float = num(0.0, ge=0)
    # the tokens a pruner drops leave their attention weight to the kept tokens most like them (cosine of the hidden
    # states), so that the language model's attention mass over the image is kept (models/pruned_llava.fold_weights)
    pruner_proportional_attention: bool = False
    # weight of the merger's importance loss: cross-entropy of softmax(merger scores) against the unpruned model's
    # attention from the answer-predicting token to each vision token (trainers/training/losses.py), a dense signal
    # for the discrete centre choice
    merge_importance_weight: float = num(0.0, ge=0)
    # the same target for each pruner's keep logits (the teacher's attention at the tokens the stage scores,
    # renormalised), so that hard mode's top-k keeps what the unpruned model reads
    pruner_importance_weight: float = num(0.0, ge=0)
    # weight of the relevance losses: with data that carries relevance boxes (the regions a question is about: the
    # synthetic scenes' objects, or relevant_boxes on llava_json records, docs/data.md), the pruners' (and a
    # question-aware merger's) keep logits at the tokens the boxes mark irrelevant are pushed down (how far:
    # relevance_ranking), so they learn to drop those before the asked ones (0: the boxes are not used). Samples
    # without boxes add no relevance loss. Training only: inference reads no boxes. Refused when no training sample
    # carries boxes
    relevance_weight: float = num(0.0, ge=0)
    # where the relevance losses put a token the boxes mark irrelevant. last: under nearly everything (pushed below
    # the median of every other token, a zero importance target): dropped first, before the background.
    # below_relevant: under the tokens a relevant box covers only (below their median), its importance target left at
    # the teacher's attention, so an unasked object the model reads still ranks above the background; on the tiny
    # backbone it lost at a 5% budget on both draws measured and gained nothing beyond noise at 50% (docs/benchmark.md)
    relevance_ranking: Literal["last", "below_relevant"] = "last"
    merger_d_internal: int = num(256, ge=1)  # width of the merger's scorer
    # decoder layers with a pruner before them, strictly increasing, within the backbone's depth ([]: no pruners, the
    # merger trains alone, with pruner_keep_ratios [])
    pruning_layers: list[int] = field(default_factory=lambda: [10, 20, 31])
    # vision tokens kept by each pruning stage, as a fraction of those entering it (hard mode's budget, soft mode's
    # sparsity target): 288 -> ~200 -> ~150 -> ~100 for llava-1.5, the seed's trajectory; a list of another length
    # than pruning_layers becomes the geometric schedule with the same product
    pruner_keep_ratios: list[float] = field(default_factory=lambda: [0.7, 0.75, 0.67])
    pruner_d_internal: int = num(512, ge=1)  # pruners' internal width, a multiple of pruner_num_heads
    pruner_num_heads: int = num(4, ge=1)  # cross-attention heads of the pruners (and of a question-aware merger)
    # cross_attention: the vision tokens attend to the question tokens; attention_aware: the same, also reading the
    # attention the last question token paid each vision token in the layer before (FastV's signal); mlp: each vision
    # token scored alone
    pruner_type: Literal["cross_attention", "attention_aware", "mlp"] = "cross_attention"
    temperature: float = num(1.0, gt=0)  # initial temperature (soft assignment)
    temperature_min: float = num(0.1, gt=0)  # final temperature (near-hard assignment), at most temperature
    temperature_anneal_rate: float = num(0.5, ge=0, le=1)  # share of all steps over which the temperature falls
    adv_loss_weight: float = num(1.0, ge=0)  # adversarial loss: the merger and pruners against the discriminator
    task_loss_weight: float = num(25.0, ge=0)  # task loss: the pruned model's cross-entropy on the answer tokens
    pruner_sparsity_weight: float = num(1.0, ge=0)  # per-stage keep-budget losses of the pruners
    distill_weight: float = num(0.0, ge=0)  # KL to the unpruned model's answer distribution (0 = off)
    # chance per step of re-initialising the discriminator (and its optimizer state)
    disc_reinit_prob: float = num(0.0, ge=0, le=1)
    # what the discriminator reads at the answer positions: the final-norm hidden states or the logits
    discriminator_input: Literal["hidden", "logits"] = "hidden"
    discriminator_hidden: int = num(256, ge=1)  # the discriminator's width


@dataclass(frozen=True)
class SearchParam:
    """One searched key: a ``float`` or ``int`` range (``log`` scale, optional ``step``) or ``categorical`` choices."""

    type: Literal["float", "int", "categorical"] | None = None  # a range of numbers or a list of choices
    low: float | None = None  # lowest value of a range
    high: float | None = None  # highest value of a range
    log: bool = False  # draw a range on a log scale (low > 0)
    step: float | None = None  # a range's grid step (not with log)
    choices: list[Any] | None = None  # the values of a categorical key (lists too, e.g. pruning layers)


@dataclass(frozen=True)
class Objective:
    """One objective of the search: an evaluation metric and its direction."""

    metric: str = "accuracy_hard"  # an accuracy, FLOPs figure or token count (SEARCH_METRICS, configs/schema.py)
    direction: Literal["maximize", "minimize"] = "maximize"  # whether the study maximises or minimises it
# Evaluation metrics (trainers/inference/evaluation.py), besides accuracy_hard/<question type> and tokens_after_layer_<L>.
EVAL_METRICS = ("accuracy_baseline", "accuracy_soft", "accuracy_hard", "accuracy_majority", "keep_ratio_merge",
                "avg_original_tokens", "avg_merged_tokens", "merged_tokens_min", "merged_tokens_max",
                "avg_vision_tokens_per_layer", "flops_baseline", "flops_pruned", "flops_reduction",
                "vision_flops_reduction", "prefill_ms_per_sample")


def is_eval_metric(name: str) -> bool:
    return name in EVAL_METRICS or bool(re.fullmatch(r"accuracy_hard/\w+|tokens_after_layer_\d+", name))


# Evaluation metrics (trainers/inference/evaluation.py) a search may optimise.
SEARCH_METRICS = ("accuracy_hard", "accuracy_soft", "flops_reduction", "vision_flops_reduction", "flops_pruned",
                  "keep_ratio_merge", "avg_merged_tokens", "avg_vision_tokens_per_layer")


def default_search_space() -> dict[str, SearchParam]:
    """The knobs the quick-start guide's troubleshooting turns, around llava-1.5-7b's values."""
    lr = "trainer_settings.dl_settings.optimizers"
    return {
        f"{lr}.token_merger.lr": SearchParam("float", 1e-5, 1e-4, log=True),
        f"{lr}.layer_pruners.lr": SearchParam("float", 1e-5, 1e-4, log=True),
        f"{lr}.discriminator.lr": SearchParam("float", 1e-4, 1e-3, log=True),
        "method_settings.task_loss_weight": SearchParam("float", 10.0, 50.0, log=True),
        "method_settings.adv_loss_weight": SearchParam("float", 0.5, 2.0, log=True),
        "method_settings.merge_sparsity_weight": SearchParam("float", 1e-4, 1e-3, log=True),
        "method_settings.merge_ratio": SearchParam("float", 0.4, 0.6),
        "method_settings.disc_reinit_prob": SearchParam("float", 0.0, 0.1),
        "method_settings.pruning_layers": SearchParam("categorical", choices=[[10, 20, 31], [5, 15, 25], [20, 25, 31]]),
    }


@dataclass(frozen=True)
class SearchSettings:
    """The Optuna search (``manager_settings.mode: optuna``): the study, its objectives and search space, the sampler
    and the pruner, and how a dead worker's trial is noticed and run again."""

    enable: bool = False  # the search may run (manager_settings.mode: optuna starts it)
    n_trials: int = num(50, ge=1)  # trials of the whole study, over every run and machine that shares it
    # names the study and its folder `<output_dir>/optuna/<study_name>/`; running the same name again resumes it
    study_name: str = "vision-token-pruning"
    storage: str | None = None  # null: a journal file in `<output_dir>/optuna/`; or an RDB URL (postgresql://...)
    # one metric (the best trial) or several (the Pareto front)
    objectives: list[Objective] = field(default_factory=lambda: [Objective()])
    flops_budget: float | None = num(None, gt=0, le=1)  # constraint: flops_pruned / flops_baseline <= this
    # dotted config key -> a range or choices; every bound and choice is tried at load, against the backbone's depth
    # too; a searched merge_ratio makes target_merge_tokens null
    search_space: dict[str, SearchParam] = field(default_factory=default_search_space)
    sampler: Literal["tpe", "random", "nsga2"] = "tpe"  # Optuna's sampler (nsga2 for several objectives)
    pruner: Literal["median", "none"] = "median"  # stops trials whose intermediate evaluation lags (one objective)
    pruner_startup_trials: int = num(3, ge=0)  # trials that finish before any is pruned
    pruner_warmup_steps: int = num(0, ge=0)  # training steps of a trial before it can be pruned
    heartbeat_interval: int = num(60, ge=1)  # seconds between a running trial's heartbeats
    grace_period: int = num(180, ge=1)  # seconds without a heartbeat before a trial counts as dead
    max_retry: int = num(2, ge=0)  # re-runs of a trial whose worker died


@dataclass(frozen=True)
class BackboneSettings:
    """The frozen backbone: which checkpoint, in which precision and attention, on which device."""

    # a local folder, or a model id in the local Hugging Face cache (nothing is downloaded at run time)
    name_or_path: str = "llava-hf/llava-1.5-7b-hf"
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"  # the backbone's precision
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # the decoder's attention kernel
    device: str = "auto"  # auto (CUDA when available), cpu, cuda or cuda:N


@dataclass(frozen=True)
class DataSettings:
    """The data (synthetic VQA or LLaVA instruction JSON), bad samples, the bounds per image, evaluation batching."""

    # synthetic: the generated VQA scenes (no download); llava_json: LLaVA instruction files
    source: Literal["synthetic", "llava_json"] = "synthetic"
    train_json: str | None = None  # the LLaVA instruction file trained on (llava_json)
    eval_json: str | None = None  # the LLaVA instruction file evaluated on: each record's first question (llava_json)
    image_folder: str | None = None  # the folder the JSON's image paths are relative to (llava_json)
    synthetic_train_size: int = num(4000, ge=1)  # synthetic training questions
    # synthetic questions a run evaluates on (its validation split, which picks pruned_best/) and, with
    # scripts/benchmark.py, the benchmark's by default (its eval split, apart from them)
    synthetic_eval_size: int = num(500, ge=1)
    seed: int = 0  # seed of the synthetic data (a sample is a pure function of seed, split and index)
    # share of the synthetic training samples that carry relevance boxes (the rest carry none, as a mixture where
    # only some records have boxes): what method_settings.relevance_weight trains on
    synthetic_labelled_fraction: float = num(1.0, ge=0, le=1)
    # error: a bad sample stops the run, naming its file and id; skip: it is left out and counted in the log
    on_bad_sample: Literal["error", "skip"] = "error"
    # vision tokens per image at most: LLaVA-NeXT keeps only the grid resolutions within it, Qwen2-VL's processor
    # resizes every image within it; LLaVA-1.5's fixed 576 are checked against it
    max_vision_tokens: int | None = num(None, ge=1)
    # an image's side in px at most: LLaVA-NeXT keeps only the grid resolutions within it, Qwen2-VL bounds the pixel
    # area to its square; LLaVA-1.5's fixed 336 px are checked against it
    image_max_size: int | None = num(None, ge=1)
    eval_batch_size: int = num(16, ge=1)  # evaluation batch size
    max_new_tokens: int = num(8, ge=1)  # longest generated answer, in tokens
    num_workers: int = num(0, ge=0)  # DataLoader worker processes for training batches


@dataclass(frozen=True)
class Config:
    """The whole configuration: one section per concern."""

    manager_settings: ManagerSettings = field(default_factory=ManagerSettings)
    trainer_settings: TrainerSettings = field(default_factory=TrainerSettings)
    method_settings: MethodSettings = field(default_factory=MethodSettings)
    search_settings: SearchSettings = field(default_factory=SearchSettings)
    backbone_settings: BackboneSettings = field(default_factory=BackboneSettings)
    data_settings: DataSettings = field(default_factory=DataSettings)


# ----------------------------------------------------------------------------- conversion
def _parse_value(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; coerce numeric strings to floats."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _parse_value(value, inner, path, problems)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            problems.append(f"{path}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__} {value!r}")
            return value
        return [_parse_value(v, inner, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        _, inner = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
            return value
        return {str(k): _parse_value(v, inner, f"{path}[{k}]", problems) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # "2e-05" and YAML 1.1's bare 1e-4 arrive as strings
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        problems.append(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            problems.append(f"{path}: expected {'true/false' if tp is bool else 'a string'}, "
                            f"got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")


def _check_bounds(value: Any, meta: dict, path: str, problems: list[str]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    tests = [("ge", lambda b: value >= b, ">="), ("gt", lambda b: value > b, ">"),
             ("le", lambda b: value <= b, "<="), ("lt", lambda b: value < b, "<")]
    for key, ok, sign in tests:
        bound = meta.get(key)
        if bound is not None and not ok(bound):
            problems.append(f"{path}: {value!r} is out of range, must be {sign} {bound}")


def _build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path or 'top level'}: expected a mapping of keys, got {type(data).__name__} {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {_join(path, close[0])!r}?" if close else f"; valid keys: {sorted(fields)}"
            problems.append(f"{_join(path, key)}: unknown key{hint}")
    values = {}
    for name, f in fields.items():
        if name not in data:
            continue
        before = len(problems)
        value = _parse_value(data[name], hints[name], _join(path, name), problems)
        if _holds_sections(hints[name]):
            values[name] = value  # a section keeps its valid keys even when others are wrong
        elif len(problems) == before:
            _check_bounds(value, f.metadata, _join(path, name), problems)
            values[name] = value
    return cls(**values)


def _holds_sections(tp: Any) -> bool:
    """A section, or a list or mapping of sections (objectives, the search space)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (list, dict) else ()
    return dataclasses.is_dataclass(tp) or any(dataclasses.is_dataclass(a) for a in args)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


# ----------------------------------------------------------------------------- checks
def cross_check(config: Config) -> list[str]:
    """Contradictions between keys that need no backbone."""
    problems = []
    m, d, mg = config.method_settings, config.data_settings, config.manager_settings
    if m.temperature_min > m.temperature:
        problems.append(f"method_settings.temperature_min ({m.temperature_min}) is above "
                        f"method_settings.temperature ({m.temperature}); annealing goes from temperature down")
    layers = m.pruning_layers
    if any(b <= a for a, b in zip(layers, layers[1:])):
        problems.append(f"method_settings.pruning_layers {layers} must be strictly increasing")
    if any(layer < 0 for layer in layers):
        problems.append(f"method_settings.pruning_layers {layers} holds a negative layer index")
    if layers and not m.pruner_keep_ratios:
        problems.append("method_settings.pruner_keep_ratios is empty; give one keep ratio per pruning layer (or as "
                        "many as you like: a schedule with another count is spread geometrically over the layers)")
    if not layers and m.pruner_keep_ratios:  # no pruners: the merger trains alone, and no stage takes a ratio
        problems.append(f"method_settings.pruning_layers is [] (no pruners) but pruner_keep_ratios is "
                        f"{m.pruner_keep_ratios}; to train the token merger alone set pruner_keep_ratios: [] too, "
                        "otherwise list the decoder layers that get a pruner")
    best = config.trainer_settings.best_metric
    if not is_eval_metric(best):
        close = difflib.get_close_matches(best, EVAL_METRICS, n=1, cutoff=0.5)
        hint = (f"did you mean {close[0]!r}?" if close else
                f"losses are not measured at evaluation; choose one of {', '.join(EVAL_METRICS)}")
        problems.append(f"trainer_settings.best_metric {best!r} is not an evaluation metric; {hint}")
    skipped = {"accuracy_soft": "eval_soft", "accuracy_baseline": "eval_baseline"}
    if best in skipped and not getattr(config.trainer_settings, skipped[best]):
        problems.append(f"trainer_settings.best_metric is {best!r}, which trainer_settings.{skipped[best]}: false "
                        "does not measure; choose another metric or measure it")
    for name in ("token_merger", "layer_pruners", "discriminator"):
        o = getattr(config.trainer_settings.dl_settings.optimizers, name)
        where = f"trainer_settings.dl_settings.optimizers.{name}"
        if o.warmup_steps is not None and o.warmup_ratio > 0:
            problems.append(f"{where}: warmup_steps ({o.warmup_steps}) and warmup_ratio ({o.warmup_ratio:g}) are both "
                            "set; give one of them")
        if o.scheduler == "constant" and o.min_lr_ratio > 0:
            problems.append(f"{where}.min_lr_ratio ({o.min_lr_ratio:g}) applies to scheduler: cosine only; set "
                            "scheduler: cosine or remove it")
    if any(not 0 < r <= 1 for r in m.pruner_keep_ratios):
        problems.append(f"method_settings.pruner_keep_ratios {m.pruner_keep_ratios}: each must be in (0, 1]")
    if m.pruner_d_internal % m.pruner_num_heads:
        problems.append(f"method_settings.pruner_d_internal ({m.pruner_d_internal}) is not divisible by "
                        f"pruner_num_heads ({m.pruner_num_heads})")
    if m.merger_type == "question_aware" and m.merger_d_internal % m.pruner_num_heads:
        problems.append(f"method_settings.merger_d_internal ({m.merger_d_internal}) is not divisible by "
                        f"pruner_num_heads ({m.pruner_num_heads}), which the question-aware merger uses")
    if d.source == "llava_json":
        for key in ("train_json", "eval_json", "image_folder"):
            if getattr(d, key) is None:
                problems.append(f"data_settings.{key} is required when data_settings.source is 'llava_json'")
    if mg.mode == "optuna" and not config.search_settings.enable:
        problems.append("manager_settings.mode is 'optuna' but search_settings.enable is false; set it to true")
    if mg.available_gpus and len(mg.available_gpus) % mg.gpus_per_subtask:
        problems.append(f"manager_settings.available_gpus has {len(mg.available_gpus)} GPUs, not a multiple of "
                        f"gpus_per_subtask ({mg.gpus_per_subtask})")
    if len(set(mg.available_gpus)) != len(mg.available_gpus):
        problems.append(f"manager_settings.available_gpus {mg.available_gpus} lists a GPU twice")
    if mg.mode == "optuna":
        device = config.backbone_settings.device
        if not mg.available_gpus and device.startswith("cuda"):
            problems.append(f"backbone_settings.device is {device!r} but manager_settings.available_gpus is []: the "
                            "search's workers then run on the CPU; set device to 'auto' or 'cpu', or list the GPUs in "
                            "available_gpus")
        if mg.available_gpus and device not in ("auto", "cuda"):
            problems.append(f"backbone_settings.device is {device!r} but the search runs on manager_settings."
                            f"available_gpus {mg.available_gpus}, where each worker sees its own GPUs as cuda:0, "
                            "cuda:1, ...; set device to 'auto'")
    return problems


# ----------------------------------------------------------------------------- the search
def searchable_keys() -> dict[str, Any]:
    """Dotted config keys a search may set, with their annotations: every value outside the manager and search
    sections, and the seed."""
    keys = {"manager_settings.seed": int}

    def walk(cls: type, prefix: str) -> None:
        for name, tp in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{name}.")
            else:
                keys[f"{prefix}{name}"] = tp

    for section, tp in typing.get_type_hints(Config).items():
        if section not in ("manager_settings", "search_settings"):
            walk(tp, f"{section}.")
    return keys


def apply_search_params(config: Config, params: dict[str, Any], source: str = "trial") -> Config:
    """The config of one trial: ``config`` with each dotted key of ``params`` set to its value.

    When ``method_settings.merge_ratio`` is searched and ``target_merge_tokens`` is not, the token target
    follows the ratio (null), since a fixed count would contradict every other ratio.
    """
    data = config_to_dict(config)
    for key, value in params.items():
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node[section]
        node[name] = value
    if "method_settings.merge_ratio" in params and "method_settings.target_merge_tokens" not in params:
        data["method_settings"]["target_merge_tokens"] = None
    problems: list[str] = []
    trial = _build(Config, data, "", problems)
    problems += cross_check(trial)
    if problems:
        raise ConfigError(problems, source)
    return trial


def _is_whole(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


def _check_param_shape(param: SearchParam, annotation: Any, path: str) -> list[str]:
    """The form of one search-space entry, before its values are tried."""
    if param.type is None:
        return [f"{path}.type is required: 'float', 'int' or 'categorical'"]
    if param.type == "categorical":
        problems = [] if param.choices else [f"{path}.choices: give a non-empty list of values for a categorical key"]
        extra = [k for k in ("low", "high", "step") if getattr(param, k) is not None] + (["log"] if param.log else [])
        if extra:
            problems.append(f"{path}: categorical choices take no {'/'.join(extra)} (those are for float and int "
                            "ranges); remove them")
        if param.choices and len({yaml.safe_dump(c) for c in param.choices}) != len(param.choices):
            problems.append(f"{path}.choices {param.choices} lists a value twice")
        return problems
    problems = []
    kind = typing.get_args(annotation)[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else annotation
    if kind not in (int, float):
        what = (f"one of {list(typing.get_args(kind))}" if typing.get_origin(kind) is Literal
                else f"{getattr(kind, '__name__', kind)} values")
        problems.append(f"{path}: the key takes {what}, which has no range; use type: categorical with choices")
    if param.type == "float" and kind is int:
        problems.append(f"{path}.type: the key holds integers; use type: int")
    if param.choices is not None:
        problems.append(f"{path}.choices apply to type categorical only; a {param.type} range takes low and high")
    if param.low is None or param.high is None:
        return problems + [f"{path}: a {param.type} range needs both low and high"]
    if param.low >= param.high:
        problems.append(f"{path}: low ({param.low:g}) must be below high ({param.high:g})")
    if param.log and param.low <= 0:
        problems.append(f"{path}: a log scale needs low > 0, got {param.low:g}")
    if param.step is not None and (param.log or param.step <= 0):
        problems.append(f"{path}.step ({param.step:g}) must be positive and cannot be combined with log: true")
    if param.type == "int" and not all(_is_whole(v) for v in (param.low, param.high, param.step or 1)):
        problems.append(f"{path}: an int range needs whole low, high and step")
    return problems


def search_probes(param: SearchParam) -> list[tuple[str, Any]]:
    """(label, value) of the values that bound a search-space entry: its low and high, or each choice."""
    if param.type == "categorical":
        return [(f"choices[{i}]", choice) for i, choice in enumerate(param.choices)]
    return [("low", param.low), ("high", param.high)]


def check_search(config: Config, known: list[str] = ()) -> list[str]:
    """The search settings: names, storage, objectives, and every bound and choice of the search space tried on
    ``config``. ``known``: problems found already; entries they name are not checked again, and values are tried
    only when the rest of the config is valid."""
    s, where = config.search_settings, "search_settings"
    probe = all(p.startswith(where) for p in known)
    problems = []
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", s.study_name):
        problems.append(f"{where}.study_name {s.study_name!r}: use letters, digits, '.', '_' and '-' only "
                        "(it names the study's folder)")
    if s.storage is not None and "://" in s.storage:
        scheme = s.storage.split("://", 1)[0].split("+", 1)[0]
        if scheme not in ("postgresql", "mysql", "sqlite"):
            problems.append(f"{where}.storage: {scheme}:// is not a supported database; give a postgresql://, "
                            "mysql:// or sqlite:/// URL, a journal file path, or null for the default journal file")
    if s.grace_period <= s.heartbeat_interval:
        problems.append(f"{where}.grace_period ({s.grace_period} s) must be longer than heartbeat_interval "
                        f"({s.heartbeat_interval} s), or live trials would be taken for dead ones")
    if not s.objectives:
        problems.append(f"{where}.objectives: give at least one, e.g. [{{metric: accuracy_hard, direction: maximize}}]")
    metrics = [o.metric for o in s.objectives]
    for i, metric in enumerate(metrics):
        if metric not in SEARCH_METRICS:
            close = difflib.get_close_matches(metric, SEARCH_METRICS, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"choose from {list(SEARCH_METRICS)}"
            problems.append(f"{where}.objectives[{i}].metric: {metric!r} is not an evaluation metric; {hint}")
    if len(set(metrics)) != len(metrics):
        problems.append(f"{where}.objectives {metrics} names a metric twice")
    if not s.search_space:
        problems.append(f"{where}.search_space is empty; give at least one key to search")
    searchable = searchable_keys()
    for key, param in s.search_space.items():
        path = f"{where}.search_space[{key}]"
        if any(p.startswith(path) for p in known):
            continue
        if key not in searchable:
            close = difflib.get_close_matches(key, list(searchable), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else "give a dotted key such as method_settings.merge_ratio"
            problems.append(f"{path}: not a config key a search can set; {hint}")
            continue
        shape = _check_param_shape(param, searchable[key], path)
        problems += shape
        if shape or not probe:
            continue
        for label, value in search_probes(param):
            try:
                apply_search_params(config, {key: value})
            except ConfigError as err:
                problems += [f"{path}.{label} ({value!r}) makes the trial's config invalid: {p}" for p in err.problems]
    return problems


def check_devices(config: Config, cuda_available: bool, device_count: int | None = None) -> list[str]:
    """Devices the config asks for against the machine's (``device_count``: visible CUDA devices, if known)."""
    problems = []
    device = config.backbone_settings.device
    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        problems.append(f"backbone_settings.device: {device!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not cuda_available:
        if device.startswith("cuda"):
            problems.append(f"backbone_settings.device is {device!r} but CUDA is not available; use 'cpu' or 'auto'")
        if config.manager_settings.available_gpus:
            problems.append(f"manager_settings.available_gpus is {config.manager_settings.available_gpus} but CUDA "
                            "is not available; set it to [] to run on the CPU")
    mg = config.manager_settings
    if cuda_available and device_count is not None:
        missing = [gpu for gpu in mg.available_gpus if gpu >= device_count]
        if missing:
            problems.append(f"manager_settings.available_gpus lists GPU(s) {missing} but this machine shows "
                            f"{device_count} (ids 0..{device_count - 1}); check CUDA_VISIBLE_DEVICES")
        if mg.mode != "optuna" and mg.gpus_per_subtask > device_count:
            problems.append(f"manager_settings.gpus_per_subtask is {mg.gpus_per_subtask} but {device_count} GPU(s) "
                            "are visible; lower it or widen CUDA_VISIBLE_DEVICES")
    return problems


TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


def tracker_problems(report_to: list[str], installed) -> list[str]:
    """``trainer_settings.report_to`` against the trackers known and those ``installed(name)`` finds."""
    unknown = [name for name in report_to if name not in TRACKERS]
    missing = [name for name in report_to if name in TRACKERS and not installed(name)]
    return ([f"trainer_settings.report_to: unknown tracker(s) {unknown}; choose among {list(TRACKERS)}"] if unknown
            else []) + [f"trainer_settings.report_to: {name!r} is not installed (pip install {name.replace('_', '-')}), "
                        "or leave it out" for name in missing]


def batch_split_problem(config: Config, num_processes: int) -> str | None:
    """The global batch must split into equal micro-batches over the processes and accumulation steps."""
    dl = config.trainer_settings.dl_settings
    parts = num_processes * dl.gradient_accumulation_steps
    if dl.batch_size % parts == 0:
        return None
    fits = sorted({p for p in (dl.batch_size // parts * parts, (dl.batch_size // parts + 1) * parts) if p > 0})
    return (f"trainer_settings.dl_settings.batch_size ({dl.batch_size}) is the global batch and must split evenly "
            f"over {num_processes} process(es) x {dl.gradient_accumulation_steps} accumulation step(s) = {parts} "
            f"micro-batches; set it to a multiple of {parts} (e.g. {' or '.join(map(str, fits))}) or change "
            "gradient_accumulation_steps or the number of processes")


def check_against_backbone(config: Config, num_layers: int, num_vision_tokens: int, image_size: int) -> list[str]:
    """Checks that need the backbone's shape (read from its config.json, before any weight loads)."""
    problems = []
    m, d = config.method_settings, config.data_settings
    bad = [layer for layer in m.pruning_layers if not 0 < layer < num_layers]
    if bad:
        problems.append(f"method_settings.pruning_layers {m.pruning_layers}: layer(s) {bad} outside 1..{num_layers - 1} "
                        f"for a backbone with {num_layers} decoder layers")
    if m.target_merge_tokens is not None:
        expected = m.merge_ratio * num_vision_tokens
        if abs(m.target_merge_tokens - expected) > 1:
            problems.append(f"method_settings.target_merge_tokens ({m.target_merge_tokens}) disagrees with merge_ratio "
                            f"({m.merge_ratio}) x {num_vision_tokens} vision tokens = {expected:g}; set it to "
                            f"{round(expected)} or to null")
    if d.max_vision_tokens is not None and num_vision_tokens > d.max_vision_tokens:
        problems.append(f"data_settings.max_vision_tokens ({d.max_vision_tokens}) is below the backbone's "
                        f"{num_vision_tokens} vision tokens per image; LLaVA-1.5's token count is fixed, raise it")
    if d.image_max_size is not None and image_size > d.image_max_size:
        problems.append(f"data_settings.image_max_size ({d.image_max_size}) is below the backbone's fixed input size "
                        f"{image_size} px; raise it")
    if config.search_settings.enable:
        seen = set(problems)
        for key, param in config.search_settings.search_space.items():
            for label, value in search_probes(param):
                trial = apply_search_params(config, {key: value})
                for problem in check_against_backbone(dataclasses.replace(trial, search_settings=SearchSettings()),
                                                      num_layers, num_vision_tokens, image_size):
                    if problem not in seen:
                        problems.append(f"search_settings.search_space[{key}].{label} ({value!r}) does not fit the "
                                        f"backbone: {problem}")
    return problems


# ----------------------------------------------------------------------------- loading
class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, recording each key written twice in one mapping (PyYAML itself keeps the last value
    silently): ``duplicates`` holds (key, line of its first writing, line of the repeat)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[tuple[Any, int, int]] = []

    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' may be followed by keys it overrides
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in first_line:
                    self.duplicates.append((key, first_line[key], line))
                else:
                    first_line[key] = line
            except TypeError:  # an unhashable key: the constructor below refuses it itself
                continue
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str) -> tuple[Any, list[tuple[Any, int, int]]]:
    """The YAML document in ``text`` and its duplicated keys (:class:`_UniqueKeyLoader`); raises yaml.YAMLError."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data(), sorted(loader.duplicates, key=lambda duplicate: duplicate[2])
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what the parser expected and where."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else err.problem
    return str(err).splitlines()[0]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], value typed as YAML would type it)."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected dotted.key=value"], "command line")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError([f"--set {text!r}: empty key part in {key!r}"], "command line")
    if not raw.strip():
        return parts, ""
    try:
        value, duplicates = _parse_yaml(raw)
    except yaml.YAMLError as err:
        raise ConfigError([f"--set {text!r}: not a valid YAML value ({_yaml_problem(err)}); quote it or fix its "
                           "brackets and quotes"], "command line") from err
    if duplicates:
        raise ConfigError([f"--set {text!r}: key {k!r} is written twice in the value; keep one"
                           for k, _, _ in duplicates], "command line")
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError([f"--set {text!r}: {part!r} is a value, not a section"], "command line")
            node = node[part]
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict, source: str = "config") -> Config:
    problems: list[str] = []
    config = _build(Config, data, "", problems)
    problems += cross_check(config)  # on the valid keys (an invalid one stands at its default meanwhile)
    if config.search_settings.enable:  # a disabled search's space is never used: its problems would hide the real ones
        problems += check_search(config, problems)
    if problems:
        raise ConfigError(problems, source)
    return config


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"no such file: {path} (pass --config PATH; shipped configs are in configs/)"], str(path))
    try:
        data, duplicates = _parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError([f"not valid YAML: {err}"], str(path)) from err
    if duplicates:
        problems = []
        for key, first, line in duplicates:
            where = f"lines {first} and {line}" if first != line else f"line {line}"
            problems.append(f"key {key!r} is written twice in one mapping, at {where}: YAML would keep only the last; "
                            "remove one or merge them")
        raise ConfigError(problems, str(path))
    if data is None or data == {}:
        raise ConfigError([f"{path} holds no settings (it is empty or only comments); write the sections to change, "
                           "or start from a shipped config such as configs/tiny.yaml"], str(path))
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping of sections, got {type(data).__name__}"], str(path))
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read ``path``, apply ``--set`` overrides, validate: a Config or one ConfigError listing every problem.

    ``--set method_settings.merge_ratio=x`` alone (the guide's troubleshooting step) makes the file's
    ``target_merge_tokens`` follow the new ratio (null); a file that sets both inconsistently stays an error.
    """
    data = apply_overrides(read_yaml(path), list(overrides))
    keys = {".".join(parse_override(text)[0]) for text in overrides}
    if "method_settings.merge_ratio" in keys and "method_settings.target_merge_tokens" not in keys:
        if isinstance(data.get("method_settings"), dict):
            data["method_settings"]["target_merge_tokens"] = None
    return config_from_dict(data, str(path))


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """A nested dict's leaves under dotted keys."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict, config: Config, keys: tuple[str, ...]) -> list[str]:
    """'key: saved -> now' for every setting under ``keys`` (dotted prefixes) on which a saved config (as
    :func:`config_to_dict` wrote it) and ``config`` differ."""
    old, new = flatten(saved), flatten(config_to_dict(config))
    names = sorted(k for k in set(old) | set(new) if any(k == p or k.startswith(p + ".") for p in keys))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in names if old.get(k) != new.get(k)]


def save_config(config: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
