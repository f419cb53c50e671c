"""ToMe: bipartite soft matching, merging vision tokens down to K before the projector.

Bolya et al. 2023, "Token Merging: Your ViT But Faster". Tokens are split alternately into sets
A and B; each A token finds its most similar B token (cosine of the attention keys), the r most
similar pairs are merged (a size-weighted mean), and the unmerged A tokens stay. Nothing is
learned and no token is simply thrown away.

What differs here:
- ToMe merges r tokens inside every ViT block while the tower runs; here the merging runs once
  on the features of LLaVA's feature layer, in repeated bipartite steps until exactly K remain,
  with that layer's keys as the similarity (a merged token's key is the size-weighted mean of its
  parts'). A step merges at most 10% of the tokens, the order of ToMe's rate per block: a step
  that merges all of set A (half the tokens) would force every A token, however distinct, into
  a B token, and on the tiny benchmark that alone costs a third of the accuracy at 50%;
- the language model sees each merged token as one token (no proportional attention by size);
- a merged token takes its B token's patch position (RoPE follows the image layout), and tokens
  are put back in spatial order after every step, so A and B alternate across the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.baselines.base import PreProjectorSelector, gather_tokens


MAX_STEP_FRACTION = 0.1  # of the tokens left, merged away by one bipartite step


def merge_steps(num_tokens: int, num_keep: int) -> list[int]:
    """Tokens merged away by each bipartite step, from num_tokens down to num_keep (at most 10% per step)."""
    steps, n = [], num_tokens
    while n > num_keep:
        steps.append(min(n - num_keep, max(1, int(n * MAX_STEP_FRACTION))))
        n -= steps[-1]
    return steps


def bipartite_soft_matching(tokens: torch.Tensor, size: torch.Tensor, positions: torch.Tensor, metric: torch.Tensor,
                            r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe step: merge the r A tokens (even indices) most similar to a B token (odd indices) into it.

    tokens (B, n, C), size (B, n, 1) tokens merged so far, positions (B, n), metric (B, n, Ck) ->
    the same for n - r tokens: [unmerged A tokens; B tokens]; a merged token is the size-weighted mean.
    """
    a, b = F.normalize(metric[:, ::2], dim=-1), F.normalize(metric[:, 1::2], dim=-1)
    scores = a @ b.transpose(1, 2)  # (B, Na, Nb)
    node_max, node_idx = scores.max(dim=-1)  # (B, Na) each A token's best B partner
    edge_idx = node_max.argsort(dim=-1, descending=True)  # (B, Na) most similar first
    unmerged, src = edge_idx[:, r:], edge_idx[:, :r]  # (B, Na - r), (B, r)
    dst = node_idx.gather(1, src)  # (B, r)

    def merge(x: torch.Tensor) -> torch.Tensor:  # sums: (B, n, C) -> (B, n - r, C)
        x_a, x_b = x[:, ::2], x[:, 1::2]
        x_b = x_b.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, x.shape[-1]), gather_tokens(x_a, src))
        return torch.cat([gather_tokens(x_a, unmerged), x_b], dim=1)

    sums = merge(torch.cat([tokens * size, metric * size, size], dim=-1))  # (B, n - r, C + Ck + 1)
    new_size = sums[..., -1:]
    weighted = sums[..., :-1] / new_size
    new_positions = torch.cat([positions[:, ::2].gather(1, unmerged), positions[:, 1::2]], dim=1)  # (B, n - r)
    return weighted[..., :tokens.shape[-1]], new_size, new_positions, weighted[..., tokens.shape[-1]:]


class ToMe(PreProjectorSelector):
    reads_vision_attention = True

    def __init__(self, num_keep: int, key_dim: int):
        super().__init__(num_keep)
        self.key_dim = key_dim

    def flops(self, n: int, k: int | None = None, n_text: int = 0) -> int:
        """The A x B similarity matrices of every step."""
        total = 0
        for r in merge_steps(n, self.num_keep):
            total += ((n + 1) // 2) * (n // 2) * self.key_dim
            n -= r
        return total

    def select(self, features: torch.Tensor, vision_attention) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = features.shape
        tokens, metric = features, vision_attention.keys  # (B, N, Dv) each
        size = torch.ones(B, N, 1, dtype=features.dtype, device=features.device)
        positions = torch.arange(N, device=features.device).expand(B, N)
        for r in merge_steps(N, self.num_keep):
            tokens, size, positions, metric = bipartite_soft_matching(tokens, size, positions, metric, r)
            order = positions.argsort(dim=1)  # back to spatial order, so A and B alternate across the image
            tokens, size, metric = gather_tokens(tokens, order), gather_tokens(size, order), gather_tokens(metric, order)
            positions = positions.gather(1, order)
        return tokens, positions
