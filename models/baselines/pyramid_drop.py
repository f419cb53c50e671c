"""PyramidDrop: drop vision tokens stage by stage, ranked by the last instruction token's attention.

Xing et al. 2024, "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction". The decoder is split into stages; where a stage starts, a
lightweight attention pass of that layer (its input norm, the last instruction token's query,
every token's key, RoPE, softmax over the causal row) ranks the vision tokens, and the fraction
λ of those left goes on. Redundancy grows with depth, so later stages hold fewer tokens.

What differs here:
- the stages start at the configured pruning layers (the paper: layers 8, 16, 24 of LLaVA-1.5's
  32 with λ = 0.5); λ follows from the budget: stage s keeps round(N * (K / N)^(s / S)) of the
  N vision tokens, so the last of the S stages keeps exactly K (``pyramid_budgets``);
- the scores come through the adapter (LlavaBackbone.attention_probs), averaged over heads;
- batches stay batched (the last real token of each sample, with any padding) and kept tokens
  keep their RoPE positions.
"""

from __future__ import annotations

import torch

from models.baselines.base import AttentionRanker, last_token_index


def pyramid_budgets(num_tokens: int, num_keep: int, stages: int) -> list[int]:
    """Vision tokens kept after each of ``stages`` stages: a geometric schedule from N down to exactly num_keep."""
    if not 1 <= num_keep <= num_tokens:
        raise ValueError(f"PyramidDrop keeps {num_keep} of {num_tokens} vision tokens; choose 1..{num_tokens}")
    ratio = num_keep / num_tokens
    return [max(num_keep, round(num_tokens * ratio ** (s / stages))) for s in range(1, stages)] + [num_keep]


class PyramidDrop(AttentionRanker):
    def forward(self, probe, layer: int, attention_mask: torch.Tensor, vision_index: torch.Tensor) -> torch.Tensor:
        last = last_token_index(attention_mask)  # (B,) the instruction's last token
        probs = probe(layer, last[:, None])  # (B, H, 1, T)
        return probs.mean(dim=1)[:, 0].gather(1, vision_index)  # (B, n)
