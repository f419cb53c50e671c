"""What one device does with the trainer's step: its throughput at a batch size, and the largest batch that fits.

Each figure comes from the step main.py runs (``Trainer.training_step``) on synthetic data, with the config's
learning-rate schedules and, on CUDA, bf16 autocast; the throughput meter is trainers/training/throughput.py.
"""

from __future__ import annotations

import dataclasses
import tempfile

import torch

from data.synthetic_vqa import SyntheticVQADataset
from trainers.run_log import RunLog
from trainers.training.trainer import Trainer


def out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def training_figures(config, backbone, batch_size: int, checkpointing: bool, steps: int, accumulation: int = 1) -> dict:
    """Throughput of ``steps`` trainer steps of ``accumulation`` micro-batches of ``batch_size`` each, after one
    warm-up step (trainers/training/throughput.py); the config's learning-rate schedules step with them."""
    trainer_settings = dataclasses.replace(
        config.trainer_settings, gradient_checkpointing=checkpointing,
        mixed_precision="bf16" if backbone.device.type == "cuda" else "no",
        dl_settings=dataclasses.replace(config.trainer_settings.dl_settings, batch_size=batch_size * accumulation,
                                        gradient_accumulation_steps=accumulation))
    config = dataclasses.replace(config, trainer_settings=trainer_settings)
    data = SyntheticVQADataset(batch_size, "train", seed=0)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, backbone, data, data, RunLog(None, echo=False), out)
        batch = trainer.collate([data[i] for i in range(batch_size)])
        try:
            for step in range(steps + 1):
                if step == 1:
                    trainer.throughput.report()  # the warm-up step does not count
                if trainer.training_step([batch] * accumulation) is None:
                    raise RuntimeError("a non-finite loss skipped the update")
            return trainer.throughput.report()
        finally:
            del trainer
            if backbone.device.type == "cuda":
                torch.cuda.empty_cache()


def epoch_hours(samples_per_s: float, epoch_samples: int, gpus: int) -> float:
    """Hours of one epoch when each of ``gpus`` data-parallel GPUs keeps this GPU's pace (gradients are averaged once
    per optimizer step, a small share of a 7B step)."""
    return epoch_samples / (samples_per_s * gpus) / 3600


def largest_batch(config, backbone, start: int, limit: int, checkpointing: bool) -> tuple[int | None, str]:
    """The largest of start, 2 start, 4 start, ... <= limit whose training step fits in memory."""
    fits, batch = None, start
    while batch <= limit:
        try:
            training_figures(config, backbone, batch, checkpointing, steps=0)
        except RuntimeError as err:
            if not out_of_memory(err):
                raise
            torch.cuda.empty_cache()
            return fits, f"batch {batch} ran out of memory"
        fits, batch = batch, 2 * batch
    return fits, f"--max-batch {limit} reached"
