"""The learned method's schedule at equal FLOPs: the benchmark compares it with a training-free method at the FLOPs
that method spends.

``stage_ratios`` is the rule for the pruning stages (each keeps a share of what enters it, more only where needed to
end at the budget K), ``matched_schedule`` the merger's size that spends at most a FLOPs target under that rule (by
bisection, ``largest_fitting``), and ``flops_ratio`` the target itself: a model's hard-mode prefill FLOPs over the
unpruned model's, counted as the benchmark's table counts them (models/flops.py).
"""

from __future__ import annotations

import torch

from models.layer_pruner import geometric_ratios, stage_budgets
from models.pruned_llava import PrunedLlava
from trainers.inference.evaluation import sample_flops

STAGE_KEEP = 0.75  # default share of the tokens entering it that each pruning stage of a learned row keeps


def stage_ratios(merged: int, num_keep: int, stages: int, stage_keep: float = STAGE_KEEP) -> list[float]:
    """The learned rows' rule: each stage keeps ``stage_keep`` of what enters it, or, where that would leave more than
    ``num_keep`` after the last stage, the equal ratios that end at exactly ``num_keep``."""
    if stages == 0 or stage_budgets(merged, [stage_keep] * stages)[-1] <= num_keep:
        return [stage_keep] * stages
    return geometric_ratios(merged, num_keep, stages)


def matched_schedule(num_tokens: int, num_keep: int, stages: int, flops_of, target: float,
                     stage_keep: float = STAGE_KEEP) -> tuple[int, list[float]]:
    """(merger tokens, pruner keep ratios) of the learned row that spends at most ``target`` prefill FLOPs.

    The FLOPs go to the early layers first. The merger keeps the most tokens m in [K, N] whose schedule
    (:func:`stage_ratios`: m tokens, then the stages down to at most K) costs ``flops_of(m, ratios)`` <= ``target``;
    the cost grows with m, so m is found by bisection. When even m = N leaves FLOPs over, the stages keep more:
    the largest share in [``stage_keep``, 1], in steps of 1/200, that still fits. Raises ValueError when even
    m = K costs more.
    """
    def fits(m: int, keep: float = stage_keep) -> bool:
        return flops_of(m, stage_ratios(m, num_keep, stages, keep)) <= target

    if not fits(num_keep):
        raise ValueError(f"no learned schedule keeping at most {num_keep} tokens fits {target:.1%} of the unpruned "
                         f"FLOPs (the merger keeping {num_keep} already costs more)")
    merged = largest_fitting(num_keep, num_tokens, fits)
    keep = stage_keep
    if merged == num_tokens and stages:
        steps = [stage_keep + (1 - stage_keep) * i / 200 for i in range(201)]
        keep = round(steps[largest_fitting(0, 200, lambda i: fits(num_tokens, steps[i]))], 6)
    return merged, stage_ratios(merged, num_keep, stages, keep)


def largest_fitting(low: int, high: int, fits) -> int:
    """The largest i in [low, high] with ``fits(i)``, for a ``fits`` that holds at ``low`` and, once false, stays
    false (bisection)."""
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def flops_ratio(model: PrunedLlava, eval_batches: list[dict]) -> float:
    """``model``'s hard-mode prefill FLOPs over the unpruned model's on the eval batches (models/flops.py, the
    selection modules' own cost included), as the table reports them.

    Token counts do not depend on trained weights, and a sample's FLOPs depend only on its real length (the prompt
    around the question is fixed), so one sample of each length runs, weighted by how many samples have it.
    """
    bb = model.backbone
    seen: dict[int, int] = {}  # real length -> samples of that length
    picked = []  # (batch, rows): the first sample of each length
    for batch in eval_batches:
        rows = []
        for i, n in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
            if n not in seen:
                seen[n] = 0
                rows.append(i)
            seen[n] += 1
        if rows:
            picked.append((batch, rows))
    pruned = base = 0.0
    with torch.no_grad():
        for batch, rows in picked:
            ids, mask = batch["input_ids"][rows].to(bb.device), batch["attention_mask"][rows].to(bb.device)
            pixels = batch["pixel_values"][rows].to(bb.device, bb.dtype)
            f_base_all, f_pruned_all = sample_flops(model, model(ids, pixels, mask, mode="hard"), mask)
            for n, f_pruned, f_base in zip(mask.sum(dim=1).tolist(), f_pruned_all, f_base_all):
                pruned, base = pruned + seen[n] * f_pruned, base + seen[n] * f_base
    return pruned / base
