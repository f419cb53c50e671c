"""The schedules of a run: temperature annealing (``temperature`` -> ``temperature_min`` linearly over the first part
of training) and each optimizer group's learning rate (warm-up, then constant or cosine)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from configs.schema import OptimizerSettings


@dataclass(frozen=True)
class TemperatureSchedule:
    """tau(step) falls linearly from ``start`` to ``end`` over the first ``anneal_rate`` x ``total_steps`` steps, then holds."""

    start: float
    end: float
    anneal_rate: float
    total_steps: int

    def __post_init__(self):
        if self.end > self.start:
            raise ValueError(f"temperature_min ({self.end}) is above temperature ({self.start})")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")

    @property
    def anneal_steps(self) -> int:
        return round(self.anneal_rate * self.total_steps)

    def __call__(self, step: int) -> float:
        if self.anneal_steps == 0 or step >= self.anneal_steps:
            return self.end
        return self.start + (self.end - self.start) * step / self.anneal_steps


def warmup_steps(settings: OptimizerSettings, total_steps: int) -> int:
    """The optimizer steps of the linear warm-up: ``warmup_steps``, or ``warmup_ratio`` of ``total_steps`` rounded up."""
    return settings.warmup_steps if settings.warmup_steps is not None else math.ceil(settings.warmup_ratio * total_steps)


def learning_rate_schedule(optimizer: torch.optim.Optimizer, settings: OptimizerSettings,
                           total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``optimizer``'s learning rate per optimizer step: transformers' warm-up + constant or warm-up + cosine schedule
    (the schedules LLaVA's recipes use), stepped once per optimizer step."""
    warmup = warmup_steps(settings, total_steps)
    if settings.scheduler == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total_steps,
                                                            min_lr_rate=settings.min_lr_ratio)
    return get_constant_schedule_with_warmup(optimizer, warmup)
