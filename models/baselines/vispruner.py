"""VisPruner: important tokens by the vision encoder's CLS attention, then diverse ones, before the projector.

Zhang et al. 2025, "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs".
Part of the budget goes to the "important" tokens, those the CLS token of the vision encoder attends to most;
the rest of it to "diverse" tokens: among the remaining ones, duplicates are removed, the most similar first,
until the budget is met. Nothing reads the instruction or the language model.

What differs here:
- the CLS attention is that of the encoder layer that produces LLaVA's features, averaged over heads, recomputed
  through the adapter (LlavaBackbone.vision_features_with_attention) as VisionZip's is here; a tower without a CLS
  token (Qwen2-VL's) gives none, and VisPruner refuses it by name;
- how the budget splits is a setting of the method: here half goes to important tokens (rounded up, so a budget
  of one keeps the most attended token), ``IMPORTANT_SHARE``;
- duplicates are removed one token at a time, over all pairs of the remaining tokens (the cosine of their
  features): each step drops the token whose nearest remaining token is nearest, the rule at its finest grain
  (removing several per step is faster, and can differ where duplicates form chains);
- every image of a padded batch keeps the same share of its own tokens (LLaVA-NeXT: each crop's own CLS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.baselines.subset import SubsetSelector
from models.flops import similarity_flops

IMPORTANT_SHARE = 0.5  # of the budget, kept by CLS attention; the rest goes to diverse tokens


def important_counts(keep: torch.Tensor) -> torch.Tensor:
    """(B,) budgets -> (B,) important tokens: IMPORTANT_SHARE of each, rounded up."""
    return torch.ceil(keep.double() * IMPORTANT_SHARE).long()


def remove_duplicates(similarity: torch.Tensor, candidates: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, N, N) pairwise similarities, (B, N) candidate tokens, (B,) how many stay -> (B, N) the candidates left
    after dropping, one at a time, the one most similar to another remaining candidate, until target[b] remain."""
    N = similarity.shape[1]
    eye = torch.eye(N, dtype=torch.bool, device=similarity.device)
    pair = candidates[:, :, None] & candidates[:, None, :] & ~eye  # (B, N, N)
    similarity = similarity.masked_fill(~pair, float("-inf"))
    left, count = candidates.clone(), candidates.sum(dim=1)  # (B, N), (B,)
    while bool((count > target).any()):
        nearest = similarity.amax(dim=2).clamp_min(-2.0)  # (B, N); -2: a remaining token with no other left
        drop = nearest.masked_fill(~left, float("-inf")).argmax(dim=1)  # (B,)
        active = count > target  # (B,) rows that still drop
        left = left & ~(F.one_hot(drop, N).bool() & active[:, None])
        similarity.scatter_(2, drop[:, None, None].expand(-1, N, 1), float("-inf"))  # nobody's neighbour any more
        count = count - active.long()
    return left


class VisPruner(SubsetSelector):
    reads_vision_attention = True

    def __init__(self, num_keep: int, width: int, reference_tokens: int | None = None):
        super().__init__(num_keep, reference_tokens)
        self.width = width  # Dv, the features' width

    def flops(self, n: int, k: int | None = None, n_text: int = 0) -> int:
        """The n x n similarities of the features (the CLS attention is the tower's own)."""
        return similarity_flops(n, n, self.width)

    def choose(self, features, valid, keep, vision_attention, question, question_mask, question_ids=None):
        if vision_attention.cls_attention is None:
            raise ValueError("vispruner ranks the vision tokens by the vision tower's CLS attention, and this "
                             "backbone's tower has no CLS token (Qwen2-VL, Qwen2.5-VL); choose cdpruner, divpruner or "
                             "dart for it")
        important = important_counts(keep)  # (B,)
        attention = vision_attention.cls_attention.float().masked_fill(~valid, float("-inf"))  # (B, N)
        place = attention.argsort(dim=1, descending=True).argsort(dim=1)  # (B, N) each token's place by attention
        is_important = (place < important[:, None]) & valid
        tokens = F.normalize(features.float(), dim=-1)  # (B, N, Dv)
        diverse = remove_duplicates(tokens @ tokens.transpose(1, 2), valid & ~is_important, keep - important)
        return is_important | diverse
