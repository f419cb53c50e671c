"""Training throughput: samples/s, tokens/s, the step time split into its phases, and peak device memory.

The trainer marks the end of each phase of a step (``lap``); on CUDA each mark synchronizes the
device first, so a phase is charged for its kernels and not for the next phase's (the cost of
these few synchronizations is part of what is measured). ``report`` averages the steps since the
last report, the way nanoGPT and torchtitan print throughput at every log step.
"""

from __future__ import annotations

import datetime
import time

import torch

PHASES = ("teacher", "student", "backward", "optimizer")  # backward: the losses and their backward; optimizer: clip, step


class Throughput:
    def __init__(self, device: torch.device):
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = self.samples = self.tokens = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start_step(self, samples: int, tokens: int) -> None:
        self.steps, self.samples, self.tokens = self.steps + 1, self.samples + samples, self.tokens + tokens
        self._last = self._now()

    def lap(self, phase: str) -> None:
        now = self._now()
        self.seconds[phase] += now - self._last
        self._last = now

    def report(self) -> dict[str, float]:
        """Means since the last report (then starts over): samples_per_s, tokens_per_s, step_s, <phase>_s and, on
        CUDA, peak_memory_gib."""
        total = sum(self.seconds.values())
        steps = max(self.steps, 1)
        result = {"samples_per_s": self.samples / total if total else 0.0,
                  "tokens_per_s": self.tokens / total if total else 0.0, "step_s": total / steps,
                  **{f"{phase}_s": seconds / steps for phase, seconds in self.seconds.items()}}
        if self.device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._reset()
        return result


def describe(report: dict[str, float]) -> str:
    """'12.3 samples/s, 2,345 tokens/s, 0.81 s/step (teacher 0.12, student 0.30, ...)[, peak memory 1.2 GiB]'."""
    phases = ", ".join(f"{phase} {report[f'{phase}_s']:.3f}" for phase in PHASES)
    text = (f"{report['samples_per_s']:.1f} samples/s, {report['tokens_per_s']:,.0f} tokens/s, "
            f"{report['step_s']:.3f} s/step ({phases})")
    if "peak_memory_gib" in report:
        text += f", peak memory {report['peak_memory_gib']:.2f} GiB"
    if "eta_s" in report:
        text += f", ETA {datetime.timedelta(seconds=round(report['eta_s']))}"
    return text


def eta_seconds(started: float, steps_done: int, steps_left: int) -> float:
    """The time the ``steps_left`` will take at the pace of this process so far (``steps_done`` since ``started``,
    a ``time.perf_counter()``), evaluations and checkpoints included."""
    return (time.perf_counter() - started) / max(steps_done, 1) * steps_left
