"""FastV: after layer K, drop the vision tokens that receive the least attention.

Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models". Decoder layers 0..K-1 see every token; before
layer K (default 2) the vision tokens are ranked by the attention they received in layer K-1,
averaged over heads and over the query positions, and only the top ones go on to layers K and
later.

What differs here:
- ``keep`` budgets count the tokens kept; the paper's R is the fraction *dropped* (its K=2, R=50%
  keeps half, as ``keep = 0.5`` does here);
- received attention is the average over every real query position of the prompt (the paper's
  "average attention received from all other tokens"); the official code ranks by the last
  token's row alone, which is what PyramidDrop does (models/baselines/pyramid_drop.py);
- layer K-1's attention rows are recomputed from its input through the adapter
  (LlavaBackbone.attention_probs) instead of switching the model to eager attention;
- batches stay batched (same count per sample) and kept tokens keep their RoPE positions.
"""

from __future__ import annotations

import torch

from models.baselines.base import AttentionRanker


def received_attention(probs: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) attention probabilities, (B, T) real queries -> (B, T) attention each key receives,
    averaged over heads and over the real query rows."""
    per_query = probs.mean(dim=1)  # (B, T, T)
    weights = query_mask.to(per_query.dtype)  # (B, T)
    return (per_query * weights[:, :, None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)  # (B, T)


class FastV(AttentionRanker):
    def forward(self, probe, layer: int, attention_mask: torch.Tensor, vision_index: torch.Tensor) -> torch.Tensor:
        if layer < 1:
            raise ValueError(f"FastV ranks by the previous layer's attention: its layer K must be >= 1, got {layer}")
        B, T = attention_mask.shape
        queries = torch.arange(T, device=attention_mask.device).expand(B, T)  # every position's row
        probs = probe(layer - 1, queries)  # (B, H, T, T)
        return received_attention(probs, attention_mask.bool()).gather(1, vision_index)  # (B, n)
