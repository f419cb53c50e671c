"""Losses on the answer tokens, shared by the trainer and the tiny backbone's builder, and the importance
losses that teach the merger and the pruners the unpruned model's attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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


RELEVANCE_MARGIN = 2.0  # how far below the reference tokens' median score an irrelevant token is pushed


def relevance_loss(logits: torch.Tensor, irrelevant: torch.Tensor, valid: torch.Tensor | None = None,
                   labelled: torch.Tensor | None = None, labelled_per_batch: float | None = None,
                   reference: torch.Tensor | None = None) -> torch.Tensor:
    """sigmoid(z_j - median + margin) averaged over each sample's tokens labelled irrelevant (``irrelevant`` (B, n)
    bool; 0 for a sample with none), then over the labelled samples (:func:`labelled_mean`). The median is over the
    sample's ``reference`` tokens (B, n) bool, detached: the tokens a relevant box covers (an irrelevant token is pushed
    below the typical asked one), or by default every other real token (``valid`` (B, n)), mostly background (it is
    pushed below nearly everything). A sample with no reference token adds 0. The level and order of the other tokens
    are left to the other losses. Bounded: a token the module cannot tell from a relevant one stops pulling once it
    is far above (a softplus here made the merger's scores diverge)."""
    return labelled_mean(_relevance_per_sample(logits, irrelevant, valid, reference), labelled, labelled_per_batch)


def _relevance_per_sample(logits: torch.Tensor, irrelevant: torch.Tensor, valid: torch.Tensor | None,
                          reference: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) :func:`relevance_loss` of each sample."""
    logits = logits.float()
    valid = torch.ones_like(irrelevant) if valid is None else valid
    reference = (~irrelevant if reference is None else reference) & valid
    anchor = logits.detach().masked_fill(~reference, float("nan")).nanmedian(dim=1, keepdim=True).values
    gap = torch.sigmoid(logits - anchor.nan_to_num(0.0) + RELEVANCE_MARGIN)
    weight = (irrelevant & valid & reference.any(dim=1, keepdim=True)).float()
    return (gap * weight).sum(1) / weight.sum(1).clamp_min(1)


def pruner_relevance_loss(stage_logits: list[torch.Tensor], stage_positions: list[torch.Tensor],
                          irrelevant: torch.Tensor, image_positions: torch.Tensor, labelled: torch.Tensor | None = None,
                          labelled_per_batch: float | None = None,
                          reference: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`relevance_loss` for each pruning stage at its tokens (``irrelevant`` and ``reference`` (B, N) over the
    image placeholders, as the teacher's attention is), averaged over the stages."""
    def at(mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor | None:
        return None if mask is None else at_stage(mask.float(), positions, image_positions) > 0

    per_sample = torch.stack([
        _relevance_per_sample(z, at(irrelevant, positions), positions >= 0, at(reference, positions))
        for z, positions in zip(stage_logits, stage_positions)]).mean(dim=0)  # (B,)
    return labelled_mean(per_sample, labelled, labelled_per_batch)


def labelled_mean(per_sample: torch.Tensor, labelled: torch.Tensor | None = None,
                  labelled_per_batch: float | None = None) -> torch.Tensor:
    """The sum of ``per_sample`` (B,) over the ``labelled`` samples (B,) bool (default: all) divided by
    ``labelled_per_batch`` (default: their number here): a sample without relevance labels adds nothing. In a step
    whose global batch is cut into micro-batches (accumulation steps x processes), whose losses accumulation and
    data parallelism average, ``labelled_per_batch`` is the global batch's labelled samples divided by the number of
    micro-batches, so that the average is the mean over all its labelled samples however they fall into the
    micro-batches. 0 (with its graph) when nothing is labelled."""
    labelled = torch.ones_like(per_sample, dtype=torch.bool) if labelled is None else labelled.to(per_sample.device)
    total = (per_sample * labelled).sum()
    count = float(labelled.sum()) if labelled_per_batch is None else labelled_per_batch
    return total / count if count > 0 else total * 0.0


class RelevanceLabels(NamedTuple):
    """A batch's relevance labels on its vision tokens (:func:`irrelevant_tokens`)."""

    irrelevant: torch.Tensor  # (B, N) bool: what the relevance losses push down
    relevant: torch.Tensor  # (B, N) bool: the tokens a relevant box covers
    labelled: torch.Tensor  # (B,) bool: the samples that carry labels


def irrelevant_tokens(box_tokens, relevance: list, image_sizes: list[tuple[int, int]],
                      valid: torch.Tensor) -> RelevanceLabels:
    """The relevance labels of a batch on its vision tokens.

    ``relevance``: each sample's data.relevance.Relevance or None; ``image_sizes``: each image's (width, height);
    ``valid`` (B, N): each sample's vision tokens (left-aligned, as the backbone's image features are);
    ``box_tokens(boxes, image_size)``: the backbone adapter's map from boxes to its tokens (models/box_tokens.py).
    Irrelevant: the tokens no relevant box covers, or, when the sample lists distractors, those a distractor box
    covers and no relevant box does. A sample is labelled when it carries boxes and some token of it is not
    irrelevant: one whose relevant boxes fall wholly outside what the backbone sees (a crop cut them away) has no
    label."""
    irrelevant = torch.zeros(valid.shape, dtype=torch.bool)
    relevant_tokens = torch.zeros(valid.shape, dtype=torch.bool)
    labelled = torch.zeros(valid.shape[0], dtype=torch.bool)
    for b, (boxes, size) in enumerate(zip(relevance, image_sizes)):
        if boxes is None:
            continue
        relevant = box_tokens(boxes.relevant, size)  # (n_b,)
        count = int(valid[b].sum())
        if len(relevant) != count:
            raise ValueError(f"sample {b}: its relevance boxes map onto {len(relevant)} vision tokens, but its image "
                             f"({size[0]} x {size[1]} px) has {count}: the adapter's patch_boxes and the processor "
                             "disagree about the image's geometry")
        marked = ~relevant if boxes.distractors is None else box_tokens(boxes.distractors, size) & ~relevant
        if not marked.all():
            irrelevant[b, :count], relevant_tokens[b, :count], labelled[b] = marked, relevant, True
    return RelevanceLabels(irrelevant, relevant_tokens, labelled)


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
