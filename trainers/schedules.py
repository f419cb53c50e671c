"""Temperature annealing: ``temperature`` -> ``temperature_min`` linearly over the first part of training."""

from __future__ import annotations

from dataclasses import dataclass


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
