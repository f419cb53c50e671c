"""Random pruning before the projector: keep K of the N vision tokens, drawn uniformly.

The floor a pruning method has to beat; FastV (Chen et al. 2024) and PyramidDrop (Xing et al.
2024) report random dropping as their ablation. Here the draw happens before the projector, each
image of a batch gets its own draw, and the generator is reseeded on every call, so an evaluation
is repeatable (the same batch position gets the same draw in every batch).
"""

from __future__ import annotations

import torch

from models.baselines.base import PreProjectorSelector, gather_tokens


class RandomPruning(PreProjectorSelector):
    def __init__(self, num_keep: int, seed: int = 0, reference_tokens: int | None = None):
        super().__init__(num_keep, reference_tokens)
        self.seed = seed

    def select(self, features: torch.Tensor, vision_attention=None) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = features.shape
        noise = torch.rand(B, N, generator=torch.Generator().manual_seed(self.seed)).to(features.device)  # (B, N)
        positions = noise.topk(self.num_keep, dim=1).indices  # (B, K)
        return gather_tokens(features, positions), positions

    def select_padded(self, features, vision_attention, valid, keep):
        B, N, _ = features.shape
        noise = torch.rand(B, N, generator=torch.Generator().manual_seed(self.seed)).to(features.device)
        positions = noise.masked_fill(~valid, -1.0).topk(int(keep.max()), dim=1).indices  # (B, K), padding last
        used = torch.arange(positions.shape[1], device=keep.device) < keep[:, None]  # (B, K): sample b's first K_b
        return gather_tokens(features, positions), positions, used
