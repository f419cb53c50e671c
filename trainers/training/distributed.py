"""Data parallelism, gradient accumulation and mixed precision, through accelerate.

``accelerate launch main.py ...`` (or ``torchrun``) starts one process per device;
:func:`join_processes` joins them (accelerate's ``PartialState``: NCCL on GPUs, gloo on the CPU)
before any weight loads, and the trainer drives its step through an ``accelerate.Accelerator``
(:func:`make_accelerator`):

- the trainable modules are prepared (DDP on several processes: they start equal, broadcast from
  rank 0, and their gradients are averaged in backward);
- every optimizer step takes one global batch (``trainer_settings.dl_settings.batch_size``), split
  into ``gradient_accumulation_steps`` x processes equal micro-batches; ``accumulate`` skips the
  gradient all-reduce on all but the last micro-batch and ``backward`` divides each micro-batch's
  loss by the accumulation steps, so the step equals the one a single process would take on the
  whole batch (for losses that are means over samples);
- ``autocast`` applies ``trainer_settings.mixed_precision``;
- evaluation is shared: every process answers its share of the eval set and ``gather_for_metrics``
  brings the answers and counts together;
- rank 0 alone logs and writes checkpoints (and draws the kept-token pictures); the other ranks
  wait for it at the next collective.

Every rank seeds the same RNG and draws the same amount from it (equal micro-batches), so the ranks'
RNGs stay in step: a discriminator re-initialisation (``disc_reinit_prob``) happens on all ranks at
once and gives the same weights.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import accelerate.utils
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs, PartialState
from accelerate.state import AcceleratorState, GradientState

from configs.schema import TrainerSettings

# Ranks other than 0 wait at their next collective while rank 0 writes checkpoints and pictures; must not time out.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def launched_processes() -> int:
    """The number of processes accelerate launch / torchrun started (1 for a plain ``python main.py``), read from the
    environment, so that it can be checked before the process group forms."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_launch_process() -> bool:
    """Rank 0 of the launch (or a single process): the one that prints an error found before the group forms."""
    return int(os.environ.get("RANK", "0")) == 0


def join_processes() -> PartialState:
    """The launcher's process group (one process when not launched): rank, world size and this rank's device."""
    return PartialState(cpu=not torch.cuda.is_available(), timeout=COLLECTIVE_TIMEOUT)


def tracker_installed(name: str) -> bool:
    """Whether the package of accelerate's tracker ``name`` is importable."""
    return bool(getattr(accelerate.utils, f"is_{name}_available")())


def make_accelerator(settings: TrainerSettings, logging_dir: str | Path | None = None) -> Accelerator:
    """The accelerator of one run. A process may hold several runs one after the other (an Optuna worker's trials,
    tests), each with its own accumulation and precision: accelerate keeps those in process-wide state that refuses
    to change, so it is cleared first (the process group itself, in ``PartialState``, stays). The trackers of
    ``report_to`` other than TensorBoard (which the run writes itself, pictures included) are accelerate's."""
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        log_with=[name for name in settings.report_to if name != "tensorboard"] or None,
        project_dir=logging_dir,
        cpu=not torch.cuda.is_available(),
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.dl_settings.gradient_accumulation_steps,
        device_placement=False,  # the backbone adapter places the modules (spread over GPUs with gpus_per_subtask)
        kwargs_handlers=[
            # a pruner whose output a loss does not reach in some configuration gets no gradient
            DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False),
            InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT),
        ],
    )


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous part of a batch (part sizes differ by at most one)."""
    n = len(indices)
    return indices[n * rank // world_size: n * (rank + 1) // world_size]


def finish() -> None:
    """Every rank waits for rank 0's last evaluation and checkpoint, then the process group closes.

    A rank that left while the others still held its connections could abort on exit ("terminate called
    without an active exception" in gloo), failing a run that had succeeded."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
