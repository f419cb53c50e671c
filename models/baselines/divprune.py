"""DivPrune: keep the most diverse vision tokens (greedy max-min diversity), before the projector.

Alvar et al. 2025, "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models". The kept set
should maximise the smallest distance between two of its tokens (the max-min diversity problem), the distance
being 1 - cosine similarity. It is built greedily: first the token farthest from its nearest neighbour, then each
time the token farthest from the set so far (whose nearest kept token is farthest). Nothing reads the instruction
or any attention.

What differs here:
- DivPrune prunes the projected tokens at the language model's input; here the selector sits before the projector
  (as the learned merger), projects all N tokens itself to measure the same distances, and its cost counts it;
- a token already kept is never picked again, even when every remaining distance is 0 (exact duplicates);
- every image of a padded batch keeps the same share of its own tokens.
"""

from __future__ import annotations

import torch

from models.baselines.subset import ProjectedSelector, first_picks


def max_min_greedy(distance: torch.Tensor, k: int, selectable: torch.Tensor) -> torch.Tensor:
    """(B, N, N) pairwise distances, (B, N) selectable tokens -> (B, k) tokens in the order picked, -1 once a row has
    none left: first the token whose nearest other token is farthest, then each time the token farthest from its
    nearest picked one."""
    B, N, _ = distance.shape
    inf = float("inf")
    eye = torch.eye(N, dtype=torch.bool, device=distance.device)
    others = distance.masked_fill(~selectable[:, None, :] | eye, inf)  # (B, N, N) no token is its own neighbour
    score = others.amin(dim=2).masked_fill(~selectable, -inf)  # (B, N) distance to the nearest other token
    left = selectable.clone()
    nearest_picked = torch.full_like(score, inf)  # (B, N)
    order = torch.full((B, k), -1, dtype=torch.long, device=distance.device)
    for i in range(k):
        best, j = score.max(dim=1)  # (B,)
        fresh = best > -inf  # a row with a token left
        order[:, i] = torch.where(fresh, j, -1)
        row = distance.gather(1, j[:, None, None].expand(-1, 1, N))[:, 0]  # (B, N) distance to the new pick
        nearest_picked = torch.where(fresh[:, None], torch.minimum(nearest_picked, row), nearest_picked)
        left = left.scatter(1, j[:, None], False)
        score = nearest_picked.masked_fill(~left, -inf)
    return order


class DivPrune(ProjectedSelector):
    def flops(self, n: int, k: int | None = None, n_text: int = 0) -> int:
        """Projection and the n x n similarities (the greedy steps only compare)."""
        return self.projection_and_gram_flops(n)

    def choose(self, features, valid, keep, vision_attention, question, question_mask, question_ids=None):
        tokens = self.unit_tokens(features)  # (B, N, D)
        distance = 1 - tokens @ tokens.transpose(1, 2)  # (B, N, N)
        return first_picks(max_min_greedy(distance, int(keep.max()), valid), keep, features.shape[1])
