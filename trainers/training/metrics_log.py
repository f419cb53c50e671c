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

import numpy as np

from trainers.run_log import RunLog
from trainers.training.losses import LOSS_TERMS
from trainers.training.throughput import describe as describe_throughput

INTEGER_METRICS = ("avg_original_tokens", "avg_merged_tokens", "merged_tokens_min", "merged_tokens_max")
FIRST_METRICS = ("accuracy_baseline", "accuracy_soft", "accuracy_hard", "keep_ratio_merge", *INTEGER_METRICS)  # seed order


class MetricsLog:
    def __init__(self, log: RunLog, tensorboard_dir: str | Path):
        self.log, self.tensorboard_dir = log, Path(tensorboard_dir)
        self._writer = None

    @property
    def writer(self):
        """The TensorBoard writer, opened on first use (a run that logs nothing leaves no event file)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard_dir))
        return self._writer

    def training_step(self, step: int, values: dict[str, float], speed: dict[str, float],
                      learning_rates: dict[str, float] | None = None) -> None:
        """The seed's loss block per optimizer group, temperature and discriminator lines, then the throughput (and
        the run's ETA); each optimizer group's learning rate to TensorBoard (``lr/<group>``)."""
        lines = [f"[Step {step}] Losses:"]
        for group in dict.fromkeys(t.group for t in LOSS_TERMS):
            present = [t.name for t in LOSS_TERMS if t.group == group and t.name in values]
            if present:
                lines.append(f"  {group}:")
                lines += [f"    - {n}: {values[n]:.4f}" for n in present]
            for n in present:
                self.writer.add_scalar(f"loss/{group}/{n}", values[n], step)
        self.log.block("\n".join(lines))
        self.log.block(f"[Step {step}] Temperature: {values['temperature']:.2f}")
        self.log.info(f"disc_prob_real: {values['disc_prob_real']:.3f}")
        self.log.info(f"disc_prob_fake: {values['disc_prob_fake']:.3f}")
        self.log.block(f"[Step {step}] Throughput: {describe_throughput(speed)}")
        for key, value in speed.items():
            self.writer.add_scalar(f"throughput/{key}", value, step)
        for group, lr in (learning_rates or {}).items():
            self.writer.add_scalar(f"lr/{group}", lr, step)
        self.writer.add_scalar("temperature", values["temperature"], step)
        self.writer.add_scalar("discriminator/disc_prob_real", values["disc_prob_real"], step)
        self.writer.add_scalar("discriminator/disc_prob_fake", values["disc_prob_fake"], step)

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
            self.writer.add_scalar(f"eval/{key}", value, step)
        self.log.block("\n".join(lines))
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
