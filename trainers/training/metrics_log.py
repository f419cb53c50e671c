"""What a run reports, in one place: the quick-start guide's log blocks, TensorBoard scalars and images, and
the summary of the guide's targets (torchtitan's MetricsProcessor plays this part there).

The trainer hands over plain numbers (losses, throughput, evaluation metrics) and pictures; this
component decides how they read in training.log and under which TensorBoard tags they land:
``loss/<group>/<loss>`` (groups from trainers/training/losses.LOSS_TERMS), ``temperature``,
``discriminator/disc_prob_{real,fake}``, ``throughput/<figure>``, ``eval/<metric>`` and
``kept_tokens/<i>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from trainers.run_log import RunLog
from trainers.training.losses import LOSS_TERMS
from trainers.training.throughput import describe as describe_throughput

INTEGER_METRICS = ("avg_original_tokens", "avg_merged_tokens", "merged_tokens_min", "merged_tokens_max")
FIRST_METRICS = ("accuracy_baseline", "accuracy_soft", "accuracy_hard", "keep_ratio_merge", *INTEGER_METRICS)  # seed order


class MetricsLog:
    """The seed's log blocks, and the same values as scalars: to TensorBoard (``tensorboard_dir``; None: not written)
    and to ``also(values, step)`` (accelerate's trackers) when given."""

    def __init__(self, log: RunLog, tensorboard_dir: str | Path | None,
                 also: Callable[[dict[str, float], int], None] | None = None):
        self.log, self.tensorboard_dir, self.also = log, tensorboard_dir and Path(tensorboard_dir), also
        self._writer = None

    @property
    def writer(self) -> SummaryWriter | None:
        """The TensorBoard writer, opened on first use (a run that logs nothing leaves no event file)."""
        if self._writer is None and self.tensorboard_dir is not None:
            self._writer = SummaryWriter(str(self.tensorboard_dir))
        return self._writer

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        if self.also is not None:
            self.also(values, step)

    def hyperparameters(self, hparams: dict, metrics: dict[str, float]) -> None:
        """The run's hyper-parameters beside its final metrics (TensorBoard's HPARAMS tab; the trackers got the
        hyper-parameters at the start and get the final metrics here)."""
        final = {f"final/{k}": v for k, v in metrics.items()}
        if self.writer is not None:
            self.writer.add_hparams(hparams, final, run_name=".")
        if self.also is not None:
            self.also(final, 0)

    def training_step(self, step: int, values: dict[str, float], speed: dict[str, float],
                      learning_rates: dict[str, float] | None = None) -> None:
        """The seed's loss block per optimizer group, temperature and discriminator lines, then the throughput (and
        the run's ETA); each optimizer group's learning rate to TensorBoard (``lr/<group>``)."""
        lines, scalars = [f"[Step {step}] Losses:"], {}
        for group in dict.fromkeys(t.group for t in LOSS_TERMS):
            present = [t.name for t in LOSS_TERMS if t.group == group and t.name in values]
            if present:
                lines.append(f"  {group}:")
                lines += [f"    - {n}: {values[n]:.4f}" for n in present]
            scalars.update({f"loss/{group}/{n}": values[n] for n in present})
        self.log.block("\n".join(lines))
        self.log.block(f"[Step {step}] Temperature: {values['temperature']:.2f}")
        self.log.info(f"disc_prob_real: {values['disc_prob_real']:.3f}")
        self.log.info(f"disc_prob_fake: {values['disc_prob_fake']:.3f}")
        self.log.block(f"[Step {step}] Throughput: {describe_throughput(speed)}")
        scalars.update({f"throughput/{key}": value for key, value in speed.items()})
        scalars.update({f"lr/{group}": lr for group, lr in (learning_rates or {}).items()})
        scalars.update({"temperature": values["temperature"], "discriminator/disc_prob_real": values["disc_prob_real"],
                        "discriminator/disc_prob_fake": values["disc_prob_fake"]})
        self.scalars(scalars, step)

    def evaluation(self, step: int, metrics: dict[str, float], pictures: list[np.ndarray] = ()) -> None:
        """The ``[Eval Step N]`` block (the seed's metrics first), ``eval/<metric>`` scalars and ``kept_tokens/<i>``
        images ((H, W, 3) uint8)."""
        lines = [f"[Eval Step {step}]"]
        order = lambda k: FIRST_METRICS.index(k) if k in FIRST_METRICS else len(FIRST_METRICS)
        for key in sorted(metrics, key=order):
            value = metrics[key]
            shown = f"{value:.0f}" if key in INTEGER_METRICS or key.startswith("tokens_after") else (
                f"{value:.4g}" if "flops_baseline" in key or "flops_pruned" in key else f"{value:.3f}")
            lines.append(f"  - {key}: {shown}")
        self.log.block("\n".join(lines))
        self.scalars({f"eval/{key}": value for key, value in metrics.items()}, step)
        if self.writer is not None:
            for i, picture in enumerate(pictures):
                self.writer.add_image(f"kept_tokens/{i}", picture, step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer (train and eval modes both end here)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def summary(metrics: dict[str, float]) -> str:
    """Whether the quick-start guide's three targets were met."""
    if not metrics:
        return "[Summary] no evaluation ran"
    tokens = 1 - metrics["avg_vision_tokens_per_layer"] / metrics["avg_original_tokens"]
    flops = metrics["flops_reduction"]
    check = lambda ok: "met" if ok else "NOT met"
    chance = metrics.get("accuracy_majority", 0.0)
    baseline = metrics.get("accuracy_baseline")
    if baseline is None:
        accuracy = "  - accuracy drop: not measured (trainer_settings.eval_baseline: false)"
    elif baseline > chance:
        drop = baseline - metrics["accuracy_hard"]
        accuracy = f"  - accuracy drop (baseline - hard) {drop:.3f} < 0.03: {check(drop < 0.03)}"
    else:
        accuracy = (f"  - accuracy drop: not measured, the unpruned model scores {baseline:.3f}, no better than "
                    f"always giving the most frequent answer ({chance:.3f}); check the backbone and the data")
    return "\n".join([
        "[Summary] targets of the quick-start guide:",
        accuracy,
        f"  - vision tokens in the LLM reduced by {tokens:.1%} (mean over layers) > 60%: {check(tokens > 0.6)}",
        f"  - LLM prefill FLOPs reduced by {flops:.1%} > 60%: {check(flops > 0.6)}",
    ])
