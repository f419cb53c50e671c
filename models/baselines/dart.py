"""DART: before decoder layer K, keep the vision tokens that duplicate a few pivot tokens least.

Wen et al. 2025, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More".
Before layer K (2 for LLaVA-1.5) a few pivot tokens are chosen by a norm, some among the vision tokens and some
among the instruction's; the vision pivots stay, and each pivot in turn keeps its share of the rest of the budget:
the vision tokens least similar to it (cosine of the hidden states entering layer K) among those not kept yet.
A token close to a pivot duplicates it and goes. No attention map is read, so any attention kernel can run.

What differs here:
- pivots are the tokens whose hidden states entering layer K have the largest L1 norm; the paper ranks by the
  norm of the attention keys, which stay inside the decoder layer here (the adapter hands out hidden states and
  attention rows, not keys);
- ``IMAGE_PIVOTS`` vision and ``TEXT_PIVOTS`` text pivots; the text pivots come from the prompt's tokens after the
  image (the instruction and the chat template: in generation the prompt ends before the answer);
- the shares of the pivots add up to the budget exactly (the first pivots take one more where it does not divide);
- K is FastV's K (``fastv_layer``); each sample of a batch keeps its share of its own vision tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.baselines.base import AttentionRanker, gather_tokens
from models.flops import similarity_flops
from models.pruned_llava import scaled_budgets

IMAGE_PIVOTS = 4
TEXT_PIVOTS = 4


def leading_run(vision_index: torch.Tensor) -> torch.Tensor:
    """(B, n) sequence positions of the vision slots -> (B, n) True at a sample's real vision tokens.

    PrunedLlava hands every sample the batch's widest set of vision slots; models/sequences.compact fills a shorter
    sample's extra slots, after its own, with its lowest other positions, so its real slots are the ascending run
    that starts the row (the prompt has text before the image, so the first filler breaks the run)."""
    rises = vision_index.diff(dim=1) > 0  # (B, n - 1)
    return torch.cat([torch.ones_like(vision_index[:, :1], dtype=torch.bool), rises], dim=1).cumprod(dim=1).bool()


def largest_l1(states: torch.Tensor, candidates: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) states, (B, T) candidates -> (B, c) the positions of the c = min(count, T) candidates of largest L1
    norm, largest first, and (B, c) False where a row has fewer candidates."""
    norms = states.float().abs().sum(dim=-1).masked_fill(~candidates, float("-inf"))  # (B, T)
    values, index = norms.topk(min(count, states.shape[1]), dim=1)
    return index, values > float("-inf")


def pivot_shares(found: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """(B, P) pivots that exist, (B,) tokens to share -> (B, P) each pivot's share: equal, the first ones one more."""
    count = found.sum(dim=1).clamp_min(1)  # (B,)
    place = found.long().cumsum(dim=1) - 1  # (B, P) rank among the pivots that exist
    share = extra[:, None] // count[:, None] + (place < (extra % count)[:, None]).long()
    return share * found


def duplication_order(similarity: torch.Tensor, alive: torch.Tensor, image_pivots: torch.Tensor,
                      found: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """DART's keep order: (B, P, n) cosine of each pivot to each vision token, (B, n) real vision tokens, (B, Pi)
    the vision pivots' slots (the first Pi pivots), (B, P) pivots that exist, (B,) tokens to keep -> (B, n) each
    token's place in the keep order, n for the tokens not kept.

    The vision pivots come first (at most keep[b] of them); then pivot p, in turn, keeps its share of the rest: the
    tokens least similar to it among those neither kept nor pivots."""
    B, P, n = similarity.shape
    Pi = image_pivots.shape[1]
    place = torch.full((B, n), n, dtype=torch.long, device=similarity.device)
    steps = torch.arange(Pi, device=similarity.device).expand(B, Pi)
    kept_pivots = found[:, :Pi] & (steps < keep[:, None])  # (B, Pi)
    place = place.scatter(1, image_pivots, torch.where(kept_pivots, steps, n))
    candidates = alive.scatter(1, image_pivots, ~found[:, :Pi] & alive.gather(1, image_pivots))  # (B, n)
    first = kept_pivots.sum(dim=1, keepdim=True)  # (B, 1) the first place after the vision pivots
    extra = keep - first[:, 0]  # (B,)
    ends = pivot_shares(found, extra).cumsum(dim=1)  # (B, P) where each pivot's turn ends
    for t in range(int(extra.max())):
        turn = torch.searchsorted(ends, torch.full((B, 1), t, device=ends.device), right=True)  # (B, 1) whose turn
        active = (t < extra)[:, None]  # (B, 1)
        row = similarity.gather(1, turn.clamp_max(P - 1)[:, :, None].expand(-1, 1, n))[:, 0]  # (B, n)
        j = row.masked_fill(~candidates, float("inf")).argmin(dim=1, keepdim=True)  # (B, 1) the least similar
        place = place.scatter(1, j, torch.where(active, first + t, place.gather(1, j)))
        candidates = candidates.scatter(1, j, ~active & candidates.gather(1, j))
    return place


class DART(AttentionRanker):
    """Reads the hidden states entering layer K from the probe (``layer_inputs``), no attention row."""

    def __init__(self, num_keep: int, reference_tokens: int, hidden_size: int):
        super().__init__()
        self.num_keep = num_keep  # for a sample with reference_tokens vision tokens (PrunedLlava's stage budget)
        self.reference_tokens = reference_tokens
        self.hidden_size = hidden_size

    def flops(self, n_vision: int, n_text: int) -> int:
        """The cosines of the pivots to the n_vision vision tokens (the norms are no matrix product)."""
        return similarity_flops(min(IMAGE_PIVOTS, n_vision) + TEXT_PIVOTS, n_vision, self.hidden_size)

    def forward(self, probe, layer: int, attention_mask: torch.Tensor, vision_index: torch.Tensor) -> torch.Tensor:
        hidden = probe.layer_inputs[layer]  # (B, T, D) entering layer K
        alive = leading_run(vision_index) & attention_mask.gather(1, vision_index).bool()  # (B, n)
        vision = gather_tokens(hidden, vision_index)  # (B, n, D)
        last = vision_index.masked_fill(~alive, -1).max(dim=1).values  # (B,) each sample's last vision position
        columns = torch.arange(hidden.shape[1], device=hidden.device)
        text = (columns > last[:, None]) & attention_mask.bool()  # (B, T) the prompt after the image
        image_pivots, image_found = largest_l1(vision, alive, IMAGE_PIVOTS)  # (B, Pi) slots
        text_pivots, text_found = largest_l1(hidden, text, TEXT_PIVOTS)  # (B, Pt) positions
        pivots = torch.cat([gather_tokens(vision, image_pivots), gather_tokens(hidden, text_pivots)], dim=1)
        unit = lambda x: F.normalize(x.float(), dim=-1)
        similarity = unit(pivots) @ unit(vision).transpose(1, 2)  # (B, P, n), P = Pi + Pt
        counts = alive.sum(dim=1)  # (B,)
        keep = scaled_budgets(self.num_keep, self.reference_tokens, counts, counts)
        place = duplication_order(similarity, alive, image_pivots, torch.cat([image_found, text_found], dim=1), keep)
        return -place.float()  # (B, n) the first places rank highest
