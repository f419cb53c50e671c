"""Losses on the answer tokens, shared by the trainer and the tiny backbone's builder, and the importance
losses that teach the merger and the pruners the unpruned model's attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.sequences import IGNORE_INDEX


def next_token_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions whose next token is supervised (where the answer is predicted)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def distillation_loss(student_logits, student_labels, teacher_logits, teacher_labels) -> torch.Tensor:
    """KL(teacher || student) over the answer positions (same count and order in both: text is never pruned)."""
    s = student_logits[next_token_positions(student_labels)].float().log_softmax(-1)
    t = teacher_logits[next_token_positions(teacher_labels)].float().log_softmax(-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def merge_importance_loss(scores: torch.Tensor, teacher_attention: torch.Tensor) -> torch.Tensor:
    """Cross-entropy H(a, softmax(s)) of the merger's scores s (B, N) against the teacher's attention a (B, N).

    The centre choice is a discrete top-K, so the task loss reaches the scores only through a
    straight-through estimate; this dense target ranks every token by how much the unpruned
    model's answer-predicting token attends to it (the ranking FastV and PyramidDrop use at
    inference, distilled into the merger's scorer, which sees the vision features only).
    """
    return -(teacher_attention.float() * scores.float().log_softmax(dim=-1)).sum(dim=-1).mean()


def pruner_importance_loss(stage_logits: list[torch.Tensor], stage_positions: list[torch.Tensor],
                           teacher_attention: torch.Tensor, image_positions: torch.Tensor) -> torch.Tensor:
    """:func:`merge_importance_loss` for each pruning stage, averaged over the stages.

    Stage s scores n_s vision tokens (B, n_s) at original sequence positions (B, n_s); the
    teacher's attention (B, N) is over the N image placeholders at ``image_positions`` (B, N,
    ascending). The target of a stage is the teacher's attention at its tokens, renormalised
    (a merged token stands at its centre's position); a padding slot (position -1) gets no target.
    """
    losses = []
    for logits, positions in zip(stage_logits, stage_positions):
        target = at_stage(teacher_attention, positions, image_positions)
        losses.append(merge_importance_loss(logits, target / target.sum(dim=1, keepdim=True).clamp_min(1e-30)))
    return torch.stack(losses).mean()


def at_stage(values: torch.Tensor, positions: torch.Tensor, image_positions: torch.Tensor) -> torch.Tensor:
    """``values`` (B, N) over the N image placeholders at ``image_positions`` (B, N, ascending), read at a stage's
    tokens, given by their original sequence positions (B, n_s); 0 at a padding slot (position -1)."""
    patch = torch.searchsorted(image_positions, positions.clamp_min(0))  # (B, n_s)
    return values.gather(1, patch.clamp_max(values.shape[1] - 1)) * (positions >= 0)


RELEVANCE_MARGIN = 2.0  # how far below the relevant tokens' median score an irrelevant token is pushed


def relevance_loss(logits: torch.Tensor, irrelevant: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """sigmoid(z_j - median + margin) averaged over each sample's tokens labelled irrelevant (``irrelevant`` (B, n)
    bool; 0 for a sample with none), then over the samples: a per-sample mean, as every loss here, so that the
    data-parallel shards' losses average to the whole batch's. The median is over the sample's other real tokens
    (``valid`` (B, n)), detached: an irrelevant token's keep logit (or merger score) is pushed below the typical
    relevant token's (mostly background), so hard mode's top-k drops it first, while the level and order of the
    relevant tokens are left to the other losses. Bounded: a token the module cannot tell from a relevant one stops
    pulling once it is far above (a softplus here made the merger's scores diverge)."""
    logits = logits.float()
    valid = torch.ones_like(irrelevant) if valid is None else valid
    others = logits.detach().masked_fill(irrelevant | ~valid, float("nan")).nanmedian(dim=1, keepdim=True).values
    gap = torch.sigmoid(logits - others.nan_to_num(0.0) + RELEVANCE_MARGIN)
    weight = (irrelevant & valid).float()
    return ((gap * weight).sum(1) / weight.sum(1).clamp_min(1)).mean()


def pruner_relevance_loss(stage_logits: list[torch.Tensor], stage_positions: list[torch.Tensor],
                          irrelevant: torch.Tensor, image_positions: torch.Tensor) -> torch.Tensor:
    """:func:`relevance_loss` for each pruning stage at its tokens (``irrelevant`` (B, N) over the image
    placeholders, as the teacher's attention is), averaged over the stages."""
    return torch.stack([relevance_loss(z, at_stage(irrelevant.float(), positions, image_positions) > 0, positions >= 0)
                        for z, positions in zip(stage_logits, stage_positions)]).mean()


def irrelevant_tokens(grids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, num_tokens) bool: the relevance labels (B, h, w) (True at the image patches the question does not need)
    on the backbone's square patch grid of ``num_tokens`` tokens, resized by nearest neighbour."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"relevance labels need a square patch grid; the backbone has {num_tokens} vision tokens")
    if grids.shape[1:] == (side, side):
        return grids.flatten(1)
    return F.interpolate(grids[:, None].float(), size=(side, side), mode="nearest")[:, 0].flatten(1) > 0.5


@dataclass(frozen=True)
class LossTerm:
    """One logged loss: the optimizer group it trains (and the log block it is printed in) and the
    ``method_settings`` key of its weight (None: the discriminator's own losses, summed unweighted)."""

    name: str
    group: str
    weight_key: str | None


# The one table of loss terms: the generator's weighted sum, the seed-format log blocks and the TensorBoard tags
# (loss/<group>/<name>) all read it, in this order.
LOSS_TERMS = (
    LossTerm("merge_sparsity_loss", "token_merger", "merge_sparsity_weight"),
    LossTerm("merge_importance_loss", "token_merger", "merge_importance_weight"),
    LossTerm("merge_relevance_loss", "token_merger", "relevance_weight"),
    LossTerm("adv_loss", "layer_pruners", "adv_loss_weight"),
    LossTerm("task_loss", "layer_pruners", "task_loss_weight"),
    LossTerm("pruner_sparsity_loss", "layer_pruners", "pruner_sparsity_weight"),
    LossTerm("distill_loss", "layer_pruners", "distill_weight"),
    LossTerm("pruner_importance_loss", "layer_pruners", "pruner_importance_weight"),
    LossTerm("pruner_relevance_loss", "layer_pruners", "relevance_weight"),
    LossTerm("real_loss", "discriminator", None),
    LossTerm("fake_loss", "discriminator", None),
)


def weighted_sum(terms: dict[str, torch.Tensor], method) -> torch.Tensor:
    """The loss one backward takes: weight x value over the generator's terms present in ``terms`` (weights from
    ``method``) plus the discriminator's own losses; other entries (its probabilities) are not losses."""
    weights = {t.name: 1.0 if t.weight_key is None else getattr(method, t.weight_key) for t in LOSS_TERMS}
    return sum(weights[name] * value for name, value in terms.items() if name in weights)
