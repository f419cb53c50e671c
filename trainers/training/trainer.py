"""The adversarial trainer: teacher pass, student pass, then one backward for the discriminator and the generator.

Each optimizer step takes one global batch, as ``gradient_accumulation_steps`` micro-batches on each
process (trainers/training/distributed.py: accelerate). Per micro-batch:
1. teacher: the unpruned backbone (no grad);
2. student: merger + soft pruners at temperature tau(step);
3. discriminator losses on detached real (teacher) / fake (student) answer states;
4. generator losses: task_loss_weight * task + adv_loss_weight * adv
   + merge_sparsity_weight * merge_sparsity + pruner_sparsity_weight * pruner sparsity
   (+ distill_weight * KL(teacher || student) on the answer tokens)
   (+ merge_importance_weight * H(teacher attention, softmax(merger scores)), and the same for
   each pruner's logits with pruner_importance_weight), the adversarial term through the
   discriminator's weights held fixed;
and one backward of their sum, which reaches the discriminator from (3) only and the merger and
pruners from (4) only. After the last micro-batch the three AdamW optimizers (disjoint parameter
sets) clip and step, each with its learning-rate schedule. Both players update from the same
discriminator (simultaneous updates): that makes the step independent of how the global batch is
split into micro-batches and processes. A non-finite loss anywhere skips the whole update. Logs follow the quick-start
guide's formats; checkpoints and exact resume are in trainers/checkpoint.py. Every process
evaluates its share of the eval set; rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import gc
import signal
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from configs.schema import Config, batch_split_problem, config_to_dict, flatten
from data.build import RUN_EVAL_SPLIT, batches, describe, planned_steps, unlabelled_data_problem
from data.collator import VQACollator
from models.discriminator import adversarial_loss, discriminator_losses
from models.llava_backbone import LlavaBackbone
from models.pruned_llava import PrunedLlava, PrunedOutput
from models.sequences import compact, sorted_positions
from trainers.checkpoint import STATE, Checkpointer, load, restore_rng_state, rng_state
from trainers.inference.build import build_discriminator, build_pruned_model, stage_keep_ratios
from trainers.inference.evaluation import (answer_accuracy, collect_answers, generate_baseline_answers,
                                           pruned_results, summarize_pruned)
from trainers.inference.pictures import grid_side, kept_patch_grids, model_view, strip
from trainers.inference.pruned_model import load_modules, read_saved_modules, save_pretrained
from trainers.run_log import RunLog
from trainers.training.distributed import make_accelerator, shard
from trainers.training.losses import (RelevanceLabels, distillation_loss, irrelevant_tokens, merge_importance_loss,
                                      next_token_positions, pruner_importance_loss, pruner_relevance_loss,
                                      relevance_loss, task_loss, weighted_sum)
from trainers.training.metrics_log import MetricsLog, summary
from trainers.training.preflight import backbone_identity
from trainers.training.schedules import TemperatureSchedule, learning_rate_schedule
from trainers.training.signals import StopRequested, StopSignals, TrainingInterrupted
from trainers.training.throughput import Throughput, eta_seconds


def hyperparameters(config: Config) -> dict[str, int | float | str | bool]:
    """The resolved config as flat ``section.key`` scalars, what TensorBoard's hparams and the trackers take (lists
    and empty values written as text)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flatten(config_to_dict(config)).items()}


def eval_set_identity(data) -> dict:
    """What decides the eval set's questions: a baseline measured on another is measured again."""
    return {"source": data.source, "eval_json": data.eval_json, "image_folder": data.image_folder,
            "synthetic_split": RUN_EVAL_SPLIT, "synthetic_eval_size": data.synthetic_eval_size, "seed": data.seed,
            "max_new_tokens": data.max_new_tokens}


PICTURE_SAMPLES = 4  # eval samples whose kept tokens each evaluation draws to TensorBoard


class NonFiniteLossError(RuntimeError):
    pass


class TrainedParts(nn.Module):
    """The merger and the pruners as one module whose forward is the pruned forward: what accelerate prepares (DDP
    over several processes), so their gradients are averaged while the frozen backbone, held outside the module
    tree, is neither broadcast nor watched."""

    def __init__(self, model: PrunedLlava):
        super().__init__()
        self.merger, self.pruners = model.merger, model.pruners
        self._pruned = [model]  # a list: not a submodule

    def forward(self, *args, **kwargs) -> PrunedOutput:
        return self._pruned[0](*args, **kwargs)


class Trainer:
    def __init__(self, config: Config, backbone: LlavaBackbone, train_set, eval_set, log: RunLog,
                 output_dir: str | Path):
        self.config, self.backbone, self.log = config, backbone, log
        self.accelerator = make_accelerator(config.trainer_settings, Path(output_dir) / "logs")
        split = batch_split_problem(config, self.accelerator.num_processes)
        if split:  # main.py refuses it before the weights load; here for callers that build a Trainer themselves
            raise ValueError(split)
        self.train_set, self.eval_set = train_set, eval_set
        method, trainer = config.method_settings, config.trainer_settings
        unlabelled = unlabelled_data_problem(method.relevance_weight, train_set)
        if unlabelled:  # main.py refuses it before the weights load; here for callers that build a Trainer themselves
            raise ValueError(unlabelled)
        self.out = Path(output_dir)
        log.info("Creating Trainer...")
        log.info("Creating Token Merger...")
        log.info("Creating Layer-Specific Pruners...")
        self.model: PrunedLlava = build_pruned_model(method, backbone)
        self.model.gradient_checkpointing = trainer.gradient_checkpointing
        log.info("Creating Discriminator...")
        self.discriminator = build_discriminator(method, backbone)
        self.teacher = PrunedLlava(backbone)  # the unpruned forward, through the same code path
        params = {
            "token_merger": list(self.model.merger.parameters()) if self.model.merger is not None else [],
            "layer_pruners": list(self.model.pruners.parameters()),
            "discriminator": list(self.discriminator.parameters()),
        }
        self.optimizers = {
            name: torch.optim.AdamW(group, lr=getattr(trainer.dl_settings.optimizers, name).lr,
                                    weight_decay=getattr(trainer.dl_settings.optimizers, name).weight_decay)
            for name, group in params.items() if group
        }
        self.collate = VQACollator(backbone.processor)
        self.steps_per_epoch, self.total_steps = planned_steps(config, len(train_set), self.accelerator.num_processes)
        self.schedulers = {name: learning_rate_schedule(opt, getattr(trainer.dl_settings.optimizers, name),
                                                        self.total_steps) for name, opt in self.optimizers.items()}
        # What the step runs through accelerate: the trained parts and the discriminator, each called once per
        # micro-batch (DDP over several processes; the modules themselves otherwise)
        self.student = self.accelerator.prepare_model(TrainedParts(self.model)) if params["token_merger"] + \
            params["layer_pruners"] else self.model
        self.critic = self.accelerator.prepare_model(self.discriminator)
        self.temperature = TemperatureSchedule(method.temperature, method.temperature_min,
                                               method.temperature_anneal_rate, self.total_steps)
        self.checkpointer = Checkpointer(self.out / "checkpoints", trainer.keep_last)
        self.backbone_identity = backbone_identity(config.backbone_settings.name_or_path)
        self.step = 0
        self.model.temperature = self.temperature(self.step)  # what hard mode and saved folders use: the current tau
        self.best: float | None = None
        self.nonfinite_in_a_row = 0
        self.accuracy_baseline: float | None = None
        self.baseline_eval_set: dict | None = None  # the eval set accuracy_baseline was measured on
        self.throughput = Throughput(backbone.device)
        self._started, self._started_step = time.perf_counter(), 0  # where the ETA's pace is measured from
        trackers = any(name != "tensorboard" for name in trainer.report_to)
        if trackers:  # accelerate's trackers (W&B, MLflow, ...; on the main process): the run's hyper-parameters first
            self.accelerator.init_trackers(self.out.name or "run", config=hyperparameters(config))
        self.metrics = MetricsLog(log, self.out / "logs" / "tensorboard" if "tensorboard" in trainer.report_to else None,
                                  self.accelerator.log if trackers else None)

    # ------------------------------------------------------------------ state
    def module_states(self) -> dict[str, dict]:
        states = {"layer_pruners": self.model.pruners.state_dict(), "discriminator": self.discriminator.state_dict()}
        if self.model.merger is not None:
            states["token_merger"] = self.model.merger.state_dict()
        return states

    def training_state(self) -> dict:
        return {
            "step": self.step, "temperature": self.temperature(self.step), "modules": self.module_states(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: scheduler.state_dict() for name, scheduler in self.schedulers.items()},
            "rng": rng_state(), "best": self.best, "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "accuracy_baseline": self.accuracy_baseline, "baseline_eval_set": self.baseline_eval_set,
            "data_position": {"epoch": self.step // self.steps_per_epoch, "batch": self.step % self.steps_per_epoch},
            "backbone_identity": self.backbone_identity,  # a resume on the same backbone moved elsewhere continues
            "config": config_to_dict(self.config),
        }

    def load_training_state(self, path: str | Path, state: dict | None = None) -> None:
        """Continue from a training state (``state``: already read and checked against this config,
        trainers/training/preflight.resume_state)."""
        state = load(path) if state is None else state
        if "saved_folder" in state:  # eval mode on a folder written by save_pretrained: modules only
            weights, self.model.temperature = read_saved_modules(Path(state["saved_folder"]), self.backbone)
            load_modules(self.model, weights)
            self.step = self.total_steps  # a finished run's modules, at the temperature its training ended at
            self.log.info(f"Loaded the pruned model saved in {path}")
            return
        load_modules(self.model, state["modules"])
        self.discriminator.load_state_dict(state["modules"]["discriminator"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
            if "schedulers" in state:  # written since the schedules exist; before, every rate was constant
                self.schedulers[name].load_state_dict(state["schedulers"][name])
        self.step, self.best = state["step"], state["best"]
        self.model.temperature = self.temperature(self.step)
        self.nonfinite_in_a_row, self.accuracy_baseline = state["nonfinite_in_a_row"], state["accuracy_baseline"]
        self.baseline_eval_set = state.get("baseline_eval_set")
        restore_rng_state(state["rng"], self.accelerator.num_processes > 1)
        self.log.info(f"Resumed from {path} at step {self.step}")

    def save(self, tag: str | None = None) -> Path:
        if not self.accelerator.is_main_process:  # rank 0 writes; every rank reports the same path
            return self.checkpointer.folder / f"{STATE}_{tag or f'step_{self.step}'}.pt"
        return self.checkpointer.save(self.step, self.module_states(), self.training_state(), tag)

    # ------------------------------------------------------------------ data
    def train_batches(self):
        """This process's micro-batches of each optimizer step from the current step on, one list per step: a fresh
        permutation per epoch, seeded, so a resume continues exactly. A global batch is cut into
        ``gradient_accumulation_steps`` consecutive parts and each part into one shard per process."""
        bs = self.config.trainer_settings.dl_settings.batch_size
        parts = self.config.trainer_settings.dl_settings.gradient_accumulation_steps
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        epoch, start = divmod(self.step, self.steps_per_epoch)
        while True:
            order = torch.randperm(len(self.train_set),
                                   generator=torch.Generator().manual_seed(self.config.manager_settings.seed + epoch))
            steps = [order[i:i + bs].tolist() for i in range(0, len(order), bs)][start:self.steps_per_epoch]
            micro_batches = [shard(part, rank, world) for batch in steps for part in
                             (batch[len(batch) * k // parts: len(batch) * (k + 1) // parts] for k in range(parts))]
            # Its own generator: a DataLoader draws a seed when iterated, which must not move the global RNG
            # (the Gumbel noise's) differently in a resumed run.
            loader = iter(DataLoader(self.train_set, batch_sampler=micro_batches, collate_fn=self.collate,
                                     num_workers=self.config.data_settings.num_workers,
                                     generator=torch.Generator().manual_seed(epoch)))
            for _ in steps:
                yield [next(loader) for _ in range(parts)]
            epoch, start = epoch + 1, 0

    # ------------------------------------------------------------------ one step
    def training_step(self, micro_batches: list[dict]) -> dict[str, float] | None:
        """One optimizer step over this process's micro-batches; returns the logged values (means over the
        micro-batches), or None when a non-finite loss skipped the update."""
        method = self.config.method_settings
        tau = self.temperature(self.step)
        self.model.train()
        self.discriminator.train()
        if method.disc_reinit_prob > 0 and torch.rand(()).item() < method.disc_reinit_prob:
            self.discriminator.reset_parameters()
            self.optimizers["discriminator"].state.clear()
        clock = self.throughput
        clock.start_step(sum(len(b["ids"]) for b in micro_batches),
                         sum(int(b["attention_mask"].sum()) for b in micro_batches))
        means: dict[str, torch.Tensor] = {}
        bad: set[str] = set()
        labelled = self.labelled_per_batch(micro_batches) if method.relevance_weight > 0 else None
        for batch in micro_batches:
            with self.accelerator.accumulate(self.student, self.critic):
                terms = self.losses(batch, tau, labelled)
                bad |= {name for name, value in terms.items() if not torch.isfinite(value).all()}
                self.accelerator.backward(weighted_sum(terms, method))
            clock.lap("backward")
            for name, value in terms.items():
                means[name] = means.get(name, 0.0) + value.detach().float() / len(micro_batches)
        if self._skip_update(bad, [i for b in micro_batches for i in b["ids"]]):
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            return None
        for name, opt in self.optimizers.items():
            self.accelerator.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                             self.config.trainer_settings.max_grad_norm)
            opt.step()
            self.schedulers[name].step()
            opt.zero_grad(set_to_none=True)
        clock.lap("optimizer")
        self.nonfinite_in_a_row = 0
        values = {name: v.item() for name, v in means.items()}
        values["temperature"] = tau
        return values

    def relevance_labels(self, batch: dict) -> RelevanceLabels:
        """The batch's relevance boxes on its vision tokens (trainers/training/losses.irrelevant_tokens, through the
        adapter's geometry)."""
        _, valid = self.vision_slots(batch["input_ids"], self.backbone.image_inputs(batch))
        return irrelevant_tokens(self.backbone.box_tokens, batch["relevance"], batch["image_sizes_wh"], valid.cpu())

    def vision_slots(self, ids: torch.Tensor, images: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) the positions of each sample's placeholders that hold a vision feature (LLaVA-NeXT's row ends do
        not), left-aligned, and (B, N) which are real: what the teacher's attention and the labels are over."""
        return compact(self.backbone.feature_slots(ids, **images))

    def labelled_per_batch(self, micro_batches: list[dict]) -> float:
        """The samples with relevance labels in this step's global batch (every process's micro-batches), per
        micro-batch: what the relevance losses divide their sums by, so that accumulation and data parallelism, which
        average the micro-batches' losses, give the mean over the labelled samples however they are spread."""
        here = sum(int(self.relevance_labels(batch).labelled.sum()) for batch in micro_batches)
        total = self.accelerator.reduce(torch.tensor([float(here)], device=self.accelerator.device), "sum")
        return total.item() / (len(micro_batches) * self.accelerator.num_processes)

    def losses(self, batch: dict, tau: float, labelled_per_batch: float | None = None) -> dict[str, torch.Tensor]:
        """Every loss term of one micro-batch (trainers/training/losses.LOSS_TERMS; ``real_loss`` and ``fake_loss`` for the
        discriminator) and the discriminator's mean probabilities. ``labelled_per_batch``: see
        :meth:`labelled_per_batch` (None: the relevance losses are means over this micro-batch's labelled samples)."""
        method = self.config.method_settings
        device = self.backbone.device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        pixels, labels = batch["pixel_values"].to(device, self.backbone.dtype), batch["labels"].to(device)
        images = self.backbone.image_inputs(batch)  # what else the family's vision path reads (LLaVA-NeXT: sizes)
        clock = self.throughput
        with self.accelerator.autocast():
            with torch.no_grad():
                teacher = self.teacher(ids, pixels, mask, labels=labels, image_inputs=images,  # (1) unpruned
                                       record_attention=method.merge_importance_weight + method.pruner_importance_weight > 0)
            clock.lap("teacher")
            student = self.student(ids, pixels, mask, labels=labels, mode="soft", tau=tau, image_inputs=images)  # (2)
            clock.lap("student")
            real = self.discriminator.features(teacher.hidden, teacher.logits, next_token_positions(teacher.labels))
            fake = self.discriminator.features(student.hidden, student.logits, next_token_positions(student.labels))
            terms = discriminator_losses(self.critic, real, fake)  # (3) on detached inputs
            terms.update({  # (4)
                "task_loss": task_loss(student.logits, student.labels),
                "adv_loss": adversarial_loss(self.discriminator, fake),
                "pruner_sparsity_loss": torch.stack(student.pruner_sparsity_losses).sum()
                if student.pruner_sparsity_losses else torch.zeros((), device=device),
            })
            attention = target = teacher.vision_attention  # (B, N) the importance target
            # a question-blind merger cannot know what is asked: relevance labels act on the pruners and on a
            # question-aware merger only
            aware = method.merger_type == "question_aware"
            if method.relevance_weight > 0:
                labels = self.relevance_labels(batch)  # unlabelled samples: no token irrelevant
                irrelevant, labelled = labels.irrelevant.to(device), labels.labelled.to(device)
                # the median the irrelevant tokens are pushed below: the asked tokens', or every other token's
                reference = labels.relevant.to(device) if method.relevance_ranking == "below_relevant" else None
                if method.relevance_ranking == "last" and attention is not None:
                    target = attention * ~irrelevant
            if student.merge is not None:
                terms["merge_sparsity_loss"] = student.merge.sparsity_loss
                if method.merge_importance_weight > 0:
                    terms["merge_importance_loss"] = merge_importance_loss(student.merge.scores,
                                                                           target if aware else attention)
                if method.relevance_weight > 0 and aware:
                    terms["merge_relevance_loss"] = relevance_loss(student.merge.scores, irrelevant,
                                                                   self.vision_slots(ids, images)[1], labelled,
                                                                   labelled_per_batch, reference)
            if student.stage_logits and (method.pruner_importance_weight > 0 or method.relevance_weight > 0):
                image_positions = sorted_positions(*self.vision_slots(ids, images))  # (B, N)
            if method.pruner_importance_weight > 0 and student.stage_logits:
                terms["pruner_importance_loss"] = pruner_importance_loss(
                    student.stage_logits, student.stage_positions, target, image_positions)
            if method.relevance_weight > 0 and student.stage_logits:
                terms["pruner_relevance_loss"] = pruner_relevance_loss(
                    student.stage_logits, student.stage_positions, irrelevant, image_positions, labelled,
                    labelled_per_batch, reference)
            if method.distill_weight > 0:
                terms["distill_loss"] = distillation_loss(student.logits, student.labels,
                                                          teacher.logits, teacher.labels)
        return terms

    def _skip_update(self, bad: set[str], sample_ids: list[str]) -> bool:
        """True (on every process) when a loss of this step was non-finite on some process: the update is skipped,
        logged with the terms and samples, and the run stops after ``max_nonfinite_steps`` such steps in a row."""
        anywhere = self.accelerator.reduce(torch.tensor([float(bool(bad))], device=self.accelerator.device), "sum")
        if anywhere.item() == 0:
            return False
        bad = sorted(bad) or ["a loss on another process"]
        self.nonfinite_in_a_row += 1
        limit = self.config.trainer_settings.max_nonfinite_steps
        step = self.step + 1  # the number the loss log gives this step
        shown = ", ".join(sample_ids[:8]) + (f" and {len(sample_ids) - 8} more" if len(sample_ids) > 8 else "")
        self.log.info(f"[Step {step}] non-finite {', '.join(bad)}: update skipped "
                      f"({self.nonfinite_in_a_row} in a row, limit {limit}); batch samples: {shown}")
        if self.nonfinite_in_a_row >= limit:
            path = self.save()
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} steps in a row had non-finite losses ({', '.join(bad)}) at step {step}; "
                f"the last good state is saved in {path}. Lower the learning rates or the loss weights, or try "
                "trainer_settings.mixed_precision: no")
        return True

    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        """Logged values averaged over the processes (equal micro-batches: the whole global batch's means)."""
        keys = sorted(values)
        mean = self.accelerator.reduce(torch.tensor([values[k] for k in keys], dtype=torch.float64,
                                                    device=self.accelerator.device), "mean")
        return dict(zip(keys, mean.tolist()))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, stop: StopSignals | None = None) -> dict[str, float]:
        """The evaluation metrics; under data parallelism every process answers its share of the eval set and the
        answers and counts are gathered (``gather_for_metrics``), so every process returns the whole set's.
        ``stop``: a stop asked for during the evaluation ends it between two batches (one process; several finish
        it together and stop after)."""
        data = self.config.data_settings
        prompts = VQACollator(self.backbone.processor, with_answers=False)
        share = Subset(self.eval_set, shard(list(range(len(self.eval_set))), self.accelerator.process_index,
                                            self.accelerator.num_processes))
        guard = stop.guard if stop is not None and self.accelerator.num_processes == 1 else iter
        eval_batches = lambda: guard(batches(share, prompts, data.eval_batch_size))
        gather = lambda rows: self.accelerator.gather_for_metrics(rows, use_gather_object=True)
        show = self.accelerator.is_main_process
        trainer = self.config.trainer_settings
        if self.baseline_eval_set != eval_set_identity(data):  # a checkpoint's baseline is of another eval set
            self.accuracy_baseline = None
        if self.accuracy_baseline is None and trainer.eval_baseline:  # once per eval set: the backbone is frozen
            self.baseline_eval_set = eval_set_identity(data)
            rows = collect_answers(lambda b: generate_baseline_answers(self.backbone, b, data.max_new_tokens),
                                   eval_batches(), desc="accuracy_baseline", show_progress=show)
            self.accuracy_baseline = answer_accuracy(gather(rows))["overall"]
        metrics = {} if self.accuracy_baseline is None else {"accuracy_baseline": self.accuracy_baseline}
        results = pruned_results(self.model, eval_batches(), self.model.temperature, data.max_new_tokens,
                                 show_progress=show, soft=trainer.eval_soft)
        metrics.update(summarize_pruned(gather(results)))
        return metrics

    # ------------------------------------------------------------------ logging (trainers/training/metrics_log.py)
    def log_step(self, values: dict[str, float]) -> None:
        speed = self.throughput.report()
        speed["eta_s"] = eta_seconds(self._started, self.step - self._started_step, self.total_steps - self.step)
        self.metrics.training_step(self.step, values, speed,
                                   {name: s.get_last_lr()[0] for name, s in self.schedulers.items()})

    def log_eval(self, metrics: dict[str, float]) -> None:
        self.metrics.evaluation(self.step, metrics, self.kept_token_pictures())

    def kept_token_pictures(self) -> list:
        """The first PICTURE_SAMPLES eval samples, each the image, what each patch merged into, and the patches left
        after the merger and after each pruning stage (hard mode), so one sees what the modules learn to keep; none
        when the vision tokens are no single square grid of patches (the `full` strategy's CLS, LLaVA-NeXT's crops)."""
        bb = self.backbone
        if not bb.one_patch_grid or grid_side(bb.num_vision_tokens) is None:
            return []
        samples = [self.eval_set[i] for i in range(min(PICTURE_SAMPLES, len(self.eval_set)))]
        batch = VQACollator(bb.processor, with_answers=False)(samples)
        ids, mask = batch["input_ids"].to(bb.device), batch["attention_mask"].to(bb.device)
        pixels = batch["pixel_values"].to(bb.device, bb.dtype)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.model(ids, pixels, mask, mode="hard")
        self.model.train(was_training)
        slots = out.merge.assignment if out.merge is not None else None
        return [strip(model_view(pixels, bb.processor.image_processor, sample=i),
                      kept_patch_grids(out.kept_positions, ids, bb.image_token_id, bb.num_vision_tokens, sample=i),
                      slots=None if slots is None else slots[i])
                for i in range(len(samples))]

    # ------------------------------------------------------------------ the loop
    def train(self, on_eval: Callable[[int, dict[str, float]], None] | None = None,
              handle_signals: bool = False) -> dict[str, float]:
        """Train to the last step; ``on_eval(step, metrics)`` after each evaluation (an Optuna trial reports there
        and may stop the run by raising ``optuna.TrialPruned``). ``handle_signals``: SIGTERM and the first Ctrl-C stop
        the run at the next safe point with a resumable state saved (trainers/training/signals.py;
        TrainingInterrupted)."""
        method, trainer = self.config.method_settings, self.config.trainer_settings
        self.log.info("Starting training...")
        self.log.info(f"Token Merger type: {method.merger_type}")
        self.log.info(f"Merge Ratio: {method.merge_ratio}")
        self.log.info(f"Pruning Layers: {list(method.pruning_layers)}")
        self.log.info(f"Temperature: {method.temperature} → {method.temperature_min}")
        ratios = stage_keep_ratios(method)
        if ratios != list(method.pruner_keep_ratios):
            self.log.info(f"pruner_keep_ratios {list(method.pruner_keep_ratios)} has {len(method.pruner_keep_ratios)} "
                          f"entries for {len(ratios)} pruning layers: using {ratios} (the same final share)")
        self.log.info(f"{self.total_steps} steps ({self.steps_per_epoch} per epoch), vision tokens per stage in hard "
                      f"mode: {self.backbone.num_vision_tokens} → "
                      + " → ".join(str(k) for k in self._budget_trajectory()))
        metrics: dict[str, float] = {}
        main = self.accelerator.is_main_process
        self._started, self._started_step = time.perf_counter(), self.step  # the run's ETA counts from here
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", disable=not main)
        data = self.train_batches()
        stop = StopSignals(enabled=handle_signals)
        saved_at = None
        try:
            with stop:
                while self.step < self.total_steps:
                    values = self.training_step(next(data))
                    self.step += 1
                    self.model.temperature = self.temperature(self.step)
                    bar.update(1)
                    if values is not None:
                        bar.set_postfix(task=f"{values['task_loss']:.3f}", tau=f"{values['temperature']:.2f}")
                        if self.step % trainer.log_every == 0:
                            values = self._mean_over_processes(values)
                            if main:
                                self.log_step(values)
                    self._stop_if_asked(stop)
                    last = self.step == self.total_steps
                    if self.step % trainer.eval_every == 0 or last:
                        metrics = self.evaluate(stop)  # every process its share of the eval set
                        if main:
                            self.log_eval(metrics)
                            self._keep_best(metrics)
                            if on_eval is not None:
                                on_eval(self.step, metrics)
                        self._stop_if_asked(stop)
                    if self.step % trainer.save_every == 0 or last:
                        self.save()
                        saved_at = self.step
                    if last and main:
                        save_pretrained(self.model, self.config, self.out / "pruned_final", metrics)
                    self._stop_if_asked(stop)
        except StopRequested:
            path = self.save() if saved_at != self.step else self.checkpointer.folder / f"{STATE}_step_{self.step}.pt"
            message = (f"Stopped by {stop.name} at step {self.step} of {self.total_steps}: the state is saved in {path}; "
                       "continue with --resume auto")
            self.log.info(message)
            raise TrainingInterrupted(stop.received, message) from None
        finally:
            bar.close()
            self.close(metrics)
        self.log.block(summary(metrics))
        if hasattr(self.train_set, "skipped"):  # instruction data: what the run left out, beside what it reached
            self.log.info(describe("train", self.train_set))
        return metrics

    def _stop_if_asked(self, stop: StopSignals) -> None:
        """Raise StopRequested when a stop was asked for; under data parallelism the processes agree (one all-reduce
        of a flag), so that all stop at the same step."""
        asked = stop.received is not None
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(asked)], device=self.accelerator.device)
            asked = bool(self.accelerator.reduce(flag, reduction="sum").item())
            if asked and stop.received is None:
                stop.received = signal.SIGTERM  # another process was asked
        if asked:
            raise StopRequested

    def close(self, metrics: dict[str, float] | None = None) -> None:
        """Record the run's hyper-parameters with its final ``metrics`` (TensorBoard's hparams), then close the
        trackers and the process group (train and eval modes both end here).

        The data-parallel wrappers go first: a DDP reducer sits in reference cycles, and one the garbage collector
        freed after ``end_training`` had closed the group took the gloo group's last reference with it, whose
        destructor then waited on a process that had already exited (a rank hung at exit)."""
        if metrics and self.accelerator.is_main_process:
            self.metrics.hyperparameters(hyperparameters(self.config), metrics)
        self.metrics.close()
        self.student = self.critic = None
        self.accelerator.free_memory()
        gc.collect()
        self.accelerator.end_training()

    def _budget_trajectory(self) -> list[int]:
        merged = self.model.merger.num_keep if self.model.merger is not None else self.backbone.num_vision_tokens
        return [merged, *self.model.stage_budgets]

    def _keep_best(self, metrics: dict[str, float]) -> None:
        name = self.config.trainer_settings.best_metric
        if name not in metrics:
            raise KeyError(f"trainer_settings.best_metric {name!r} is not an eval metric; choose one of {sorted(metrics)}")
        value = metrics[name]
        better = self.best is None or (value > self.best if self.config.trainer_settings.best_mode == "max"
                                       else value < self.best)
        if better:
            self.best = value
            self.save(tag="best")
            save_pretrained(self.model, self.config, self.out / "pruned_best", metrics)
