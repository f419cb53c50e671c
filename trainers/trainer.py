"""The adversarial trainer: teacher pass, student pass, discriminator step, generator step.

Each step:
1. teacher: the unpruned backbone on the batch (no grad);
2. student: merger + soft pruners at temperature tau(step);
3. discriminator update on detached real (teacher) / fake (student) answer states;
4. generator update: task_loss_weight * task + adv_loss_weight * adv
   + merge_sparsity_weight * merge_sparsity + pruner_sparsity_weight * pruner sparsity
   (+ distill_weight * KL(teacher || student) on the answer tokens)
   (+ merge_importance_weight * H(teacher attention, softmax(merger scores)), and the same for
   each pruner's logits with pruner_importance_weight), stepping the
   ``token_merger`` and ``layer_pruners`` optimizers.
Three AdamW optimizers own disjoint parameter sets; every update is checked for non-finite
losses before its optimizer step. Logs follow the quick-start guide's formats; checkpoints
and exact resume are in trainers/checkpoint.py. Under data parallelism (trainers/distributed.py)
each rank trains on its shard of every global batch with averaged gradients, and rank 0 alone
logs, evaluates and writes checkpoints.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from configs.schema import Config, config_to_dict, relevance_grid_problem
from data.build import batches
from data.collator import VQACollator
from models.discriminator import adversarial_loss, discriminator_losses
from models.llava_backbone import LlavaBackbone
from models.pruned_llava import PrunedLlava, compact, sorted_positions
from trainers.build import build_discriminator, build_pruned_model, stage_keep_ratios
from trainers.checkpoint import STATE, Checkpointer, load, restore_rng_state, rng_state
from trainers.distributed import DataParallel
from trainers.evaluation import evaluate_accuracy, evaluate_pruned, generate_baseline_answers
from trainers.run_log import RunLog
from trainers.losses import (distillation_loss, irrelevant_tokens, merge_importance_loss, next_token_positions,
                             pruner_importance_loss, pruner_relevance_loss, relevance_loss, task_loss, weighted_sum)
from trainers.pictures import grid_side, kept_patch_grids, model_view, strip
from trainers.pruned_model import load_modules, read_saved_modules, save_pretrained
from trainers.schedules import TemperatureSchedule
from trainers.metrics_log import MetricsLog, summary
from trainers.throughput import Throughput


def eval_set_identity(data) -> dict:
    """What decides the eval set's questions: a baseline measured on another is measured again."""
    return {"source": data.source, "eval_json": data.eval_json, "image_folder": data.image_folder,
            "synthetic_eval_size": data.synthetic_eval_size, "seed": data.seed, "max_new_tokens": data.max_new_tokens}


def planned_steps(config: Config, train_size: int, world_size: int = 1) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run on ``train_size`` samples over ``world_size`` processes.

    Equal shards: every rank draws the same amount of noise, so the ranks' RNGs stay in step; a last
    batch that does not split evenly over the processes is left out."""
    trainer = config.trainer_settings
    full, rest = divmod(train_size, trainer.dl_settings.batch_size)
    per_epoch = full + (rest > 0 and rest % world_size == 0)
    total = per_epoch * trainer.dl_settings.epochs
    return per_epoch, total if trainer.max_steps is None else min(total, trainer.max_steps)


PICTURE_SAMPLES = 4  # eval samples whose kept tokens each evaluation draws to TensorBoard


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, config: Config, backbone: LlavaBackbone, train_set, eval_set, log: RunLog,
                 output_dir: str | Path, data_parallel: DataParallel = DataParallel()):
        self.config, self.backbone, self.log = config, backbone, log
        self.dp = data_parallel
        bs = config.trainer_settings.dl_settings.batch_size
        if bs % self.dp.world_size:
            raise ValueError(f"trainer_settings.dl_settings.batch_size ({bs}) is the global batch and must split evenly "
                             f"over the {self.dp.world_size} processes; make it a multiple of {self.dp.world_size}")
        self.train_set, self.eval_set = train_set, eval_set
        method, trainer = config.method_settings, config.trainer_settings
        relevance = relevance_grid_problem(method, backbone.one_patch_grid, backbone.num_vision_tokens)
        if relevance:  # main.py refuses it before the weights load; here for callers that build a Trainer themselves
            raise ValueError(relevance)
        self.out = Path(output_dir)
        log.info("Creating Trainer...")
        log.info("Creating Token Merger...")
        log.info("Creating Layer-Specific Pruners...")
        self.model: PrunedLlava = build_pruned_model(method, backbone)
        self.model.gradient_checkpointing = trainer.gradient_checkpointing
        log.info("Creating Discriminator...")
        self.discriminator = build_discriminator(method, backbone)
        self.teacher = PrunedLlava(backbone)  # the unpruned forward, through the same code path
        self.dp.broadcast_parameters([self.model.merger, self.model.pruners, self.discriminator])
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
        self.steps_per_epoch, self.total_steps = planned_steps(config, len(train_set), self.dp.world_size)
        self.local_samples = 0  # samples of the current batch on this rank
        self.temperature = TemperatureSchedule(method.temperature, method.temperature_min,
                                               method.temperature_anneal_rate, self.total_steps)
        self.checkpointer = Checkpointer(self.out / "checkpoints", trainer.keep_last)
        self.step = 0
        self.best: float | None = None
        self.nonfinite_in_a_row = 0
        self.accuracy_baseline: float | None = None
        self.baseline_eval_set: dict | None = None  # the eval set accuracy_baseline was measured on
        self.throughput = Throughput(backbone.device)
        self.metrics = MetricsLog(log, self.out / "logs" / "tensorboard")

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
            "rng": rng_state(), "best": self.best, "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "accuracy_baseline": self.accuracy_baseline, "baseline_eval_set": self.baseline_eval_set,
            "data_position": {"epoch": self.step // self.steps_per_epoch, "batch": self.step % self.steps_per_epoch},
            "config": config_to_dict(self.config),
        }

    def load_training_state(self, path: str | Path, state: dict | None = None) -> None:
        """Continue from a training state (``state``: already read and checked against this config,
        trainers/preflight.resume_state)."""
        state = load(path) if state is None else state
        if "saved_folder" in state:  # eval mode on a folder written by save_pretrained: modules only
            load_modules(self.model, read_saved_modules(Path(state["saved_folder"]), self.backbone))
            self.step = self.total_steps  # a finished run's modules: soft mode at the final temperature
            self.log.info(f"Loaded the pruned model saved in {path}")
            return
        load_modules(self.model, state["modules"])
        self.discriminator.load_state_dict(state["modules"]["discriminator"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        self.step, self.best = state["step"], state["best"]
        self.nonfinite_in_a_row, self.accuracy_baseline = state["nonfinite_in_a_row"], state["accuracy_baseline"]
        self.baseline_eval_set = state.get("baseline_eval_set")
        restore_rng_state(state["rng"])
        self.log.info(f"Resumed from {path} at step {self.step}")

    def save(self, tag: str | None = None) -> Path:
        if not self.dp.is_main:  # rank 0 writes; every rank reports the same path
            return self.checkpointer.folder / f"{STATE}_{tag or f'step_{self.step}'}.pt"
        return self.checkpointer.save(self.step, self.module_states(), self.training_state(), tag)

    # ------------------------------------------------------------------ data
    def train_batches(self):
        """Batches from the current step on: a fresh permutation per epoch, seeded, so a resume continues exactly."""
        bs = self.config.trainer_settings.dl_settings.batch_size
        epoch, start = divmod(self.step, self.steps_per_epoch)
        while True:
            order = torch.randperm(len(self.train_set),
                                   generator=torch.Generator().manual_seed(self.config.manager_settings.seed + epoch))
            index_batches = [self.dp.shard(order[i:i + bs].tolist())
                             for i in range(0, len(order), bs)][start:self.steps_per_epoch]
            # Its own generator: a DataLoader draws a seed when iterated, which must not move the global RNG
            # (the Gumbel noise's) differently in a resumed run.
            loader = DataLoader(self.train_set, batch_sampler=index_batches, collate_fn=self.collate,
                                num_workers=self.config.data_settings.num_workers,
                                generator=torch.Generator().manual_seed(epoch))
            yield from loader
            epoch, start = epoch + 1, 0

    # ------------------------------------------------------------------ one step
    def autocast(self):
        if self.config.trainer_settings.mixed_precision == "bf16":
            return torch.autocast(self.backbone.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def training_step(self, batch: dict) -> dict[str, float] | None:
        """One step; returns the logged values, or None when a non-finite loss skipped the update."""
        method = self.config.method_settings
        tau = self.temperature(self.step)
        device = self.backbone.device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        pixels, labels = batch["pixel_values"].to(device, self.backbone.dtype), batch["labels"].to(device)
        images = self.backbone.image_inputs(batch)  # what else the family's vision path reads (LLaVA-NeXT: sizes)
        self.model.train()
        self.discriminator.train()
        if method.disc_reinit_prob > 0 and torch.rand(()).item() < method.disc_reinit_prob:
            self.discriminator.reset_parameters()
            self.optimizers["discriminator"].state.clear()
        clock = self.throughput
        clock.start_step(ids.shape[0], int(mask.sum()))

        with self.autocast():
            with torch.no_grad():
                teacher = self.teacher(ids, pixels, mask, labels=labels, image_inputs=images,  # (1) unpruned
                                       record_attention=method.merge_importance_weight + method.pruner_importance_weight > 0)
            clock.lap("teacher")
            student = self.model(ids, pixels, mask, labels=labels, mode="soft", tau=tau, image_inputs=images)  # (2)
            clock.lap("student")
            real = self.discriminator.features(teacher.hidden, teacher.logits, next_token_positions(teacher.labels))
            fake = self.discriminator.features(student.hidden, student.logits, next_token_positions(student.labels))

            # (3) discriminator on detached inputs
            d = discriminator_losses(self.discriminator, real, fake)
        if not self._finite({"real_loss": d["real_loss"], "fake_loss": d["fake_loss"]}, batch["ids"]):
            return None
        self._update(["discriminator"], d["real_loss"] + d["fake_loss"])
        clock.lap("discriminator")

        # (4) generator: merger and pruners; the discriminator only judges
        self.discriminator.requires_grad_(False)
        try:
            with self.autocast():
                terms = {
                    "task_loss": task_loss(student.logits, student.labels),
                    "adv_loss": adversarial_loss(self.discriminator, fake),
                    "pruner_sparsity_loss": torch.stack(student.pruner_sparsity_losses).sum()
                    if student.pruner_sparsity_losses else torch.zeros((), device=device),
                }
                attention = relevant = teacher.vision_attention  # (B, N) the importance target
                # a question-blind merger cannot know what is asked: relevance labels act on the pruners and on a
                # question-aware merger only
                aware = method.merger_type == "question_aware"
                if method.relevance_weight > 0:
                    irrelevant = irrelevant_tokens(batch["irrelevant"], self.backbone.num_vision_tokens).to(device)
                    relevant = None if attention is None else attention * ~irrelevant
                if student.merge is not None:
                    terms["merge_sparsity_loss"] = student.merge.sparsity_loss
                    if method.merge_importance_weight > 0:
                        terms["merge_importance_loss"] = merge_importance_loss(student.merge.scores,
                                                                               relevant if aware else attention)
                    if method.relevance_weight > 0 and aware:
                        terms["merge_relevance_loss"] = relevance_loss(student.merge.scores, irrelevant)
                if student.stage_logits and (method.pruner_importance_weight > 0 or method.relevance_weight > 0):
                    # the placeholders that hold a vision feature (LLaVA-NeXT's row ends do not), as the teacher's
                    # attention and the labels are over them
                    image_positions = sorted_positions(*compact(self.backbone.feature_slots(ids, **images)))  # (B, N)
                if method.pruner_importance_weight > 0 and student.stage_logits:
                    terms["pruner_importance_loss"] = pruner_importance_loss(
                        student.stage_logits, student.stage_positions, relevant, image_positions)
                if method.relevance_weight > 0 and student.stage_logits:
                    terms["pruner_relevance_loss"] = pruner_relevance_loss(
                        student.stage_logits, student.stage_positions, irrelevant, image_positions)
                if method.distill_weight > 0:
                    terms["distill_loss"] = distillation_loss(student.logits, student.labels,
                                                              teacher.logits, teacher.labels)
        finally:
            self.discriminator.requires_grad_(True)
        if not self._finite(terms, batch["ids"]):
            return None
        self._update(["token_merger", "layer_pruners"], weighted_sum(terms, method))
        clock.lap("optimizer")
        self.nonfinite_in_a_row = 0
        values = {name: v.item() for name, v in terms.items()}
        values.update({k: v.item() for k, v in d.items()})
        values["temperature"] = tau
        return values

    def _finite(self, terms: dict[str, torch.Tensor], sample_ids: list[str]) -> bool:
        bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
        if not self.dp.any(bool(bad)):  # every rank skips the update together
            return True
        bad = bad or ["a loss on another process"]
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
        return False

    def _update(self, groups: list[str], loss: torch.Tensor) -> None:
        groups = [g for g in groups if g in self.optimizers]
        for g in groups:
            self.optimizers[g].zero_grad(set_to_none=True)
        loss.backward()
        self.dp.average_gradients([p for g in groups for group in self.optimizers[g].param_groups
                                   for p in group["params"]], self.local_samples)
        for g in groups:
            params = [p for group in self.optimizers[g].param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.trainer_settings.max_grad_norm)
            self.optimizers[g].step()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        data = self.config.data_settings
        prompts = VQACollator(self.backbone.processor, with_answers=False)
        eval_batches = lambda: batches(self.eval_set, prompts, data.eval_batch_size)
        trainer = self.config.trainer_settings
        if self.baseline_eval_set != eval_set_identity(data):  # a checkpoint's baseline is of another eval set
            self.accuracy_baseline = None
        if self.accuracy_baseline is None and trainer.eval_baseline:  # once per eval set: the backbone is frozen
            self.baseline_eval_set = eval_set_identity(data)
            self.accuracy_baseline = evaluate_accuracy(
                lambda b: generate_baseline_answers(self.backbone, b, data.max_new_tokens), eval_batches(),
                desc="accuracy_baseline")["overall"]
        metrics = {} if self.accuracy_baseline is None else {"accuracy_baseline": self.accuracy_baseline}
        metrics.update(evaluate_pruned(self.model, eval_batches(), self.temperature(self.step), data.max_new_tokens,
                                       soft=trainer.eval_soft))
        return metrics

    # ------------------------------------------------------------------ logging (trainers/metrics_log.py)
    def log_step(self, values: dict[str, float]) -> None:
        self.metrics.training_step(self.step, values, self.throughput.report())

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
    def train(self, on_eval: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
        """Train to the last step; ``on_eval(step, metrics)`` after each evaluation (an Optuna trial reports there
        and may stop the run by raising ``optuna.TrialPruned``)."""
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
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", disable=not self.dp.is_main)
        data = self.train_batches()
        try:
            while self.step < self.total_steps:
                batch = next(data)
                self.local_samples = batch["input_ids"].shape[0]
                values = self.training_step(batch)
                self.step += 1
                bar.update(1)
                if values is not None:
                    bar.set_postfix(task=f"{values['task_loss']:.3f}", tau=f"{values['temperature']:.2f}")
                    if self.step % trainer.log_every == 0:
                        values = self.dp.mean(values, self.local_samples)
                        if self.dp.is_main:
                            self.log_step(values)
                last = self.step == self.total_steps
                if (self.step % trainer.eval_every == 0 or last) and self.dp.is_main:
                    metrics = self.evaluate()
                    self.log_eval(metrics)
                    self._keep_best(metrics)
                    if on_eval is not None:
                        on_eval(self.step, metrics)
                if self.step % trainer.save_every == 0 or last:
                    self.save()
                if last and self.dp.is_main:
                    save_pretrained(self.model, self.config, self.out / "pruned_final")
        finally:
            bar.close()
            self.close()
        self.log.block(summary(metrics))
        return metrics

    def close(self) -> None:
        """Flush and close the TensorBoard writer (train and eval modes both end here)."""
        self.metrics.close()

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
            save_pretrained(self.model, self.config, self.out / "pruned_best")
