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
  a B token (docs/benchmark.md gives what that costs);
- the language model sees each merged token as one token, as the LLaVA pruning papers run ToMe (its merging, and
  so its proportional attention, inside the vision tower); ``proportional_attention=True`` (the benchmark's
  ``tome_pa``) applies the paper's proportional attention in the language model instead: a merged token of size s
  adds log s to every attention logit towards it;
- a merged token takes its B token's patch position (RoPE follows the image layout), and tokens
  are put back in spatial order after every step, so A and B alternate across the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.baselines.base import PreProjectorSelector, gather_tokens
from models.token_merger import MergeOutput


MAX_STEP_FRACTION = 0.1  # of the tokens left, merged away by one bipartite step


def merge_steps(num_tokens: int, num_keep: int) -> list[int]:
    """Tokens merged away by each bipartite step, from num_tokens down to num_keep (at most 10% per step)."""
    steps, n = [], num_tokens
    while n > num_keep:
        steps.append(step_size(n, num_keep))
        n -= steps[-1]
    return steps


def step_size(n, num_keep):
    """Tokens one bipartite step merges away when n are left and num_keep must remain (ints or (B,) tensors)."""
    if isinstance(n, torch.Tensor):
        rate = (n.double() * MAX_STEP_FRACTION).floor().long().clamp_min(1)
        return torch.where(n > num_keep, torch.minimum(n - num_keep, rate), torch.zeros_like(n))
    return min(n - num_keep, max(1, int(n * MAX_STEP_FRACTION)))


def bipartite_soft_matching(tokens: torch.Tensor, size: torch.Tensor, positions: torch.Tensor, metric: torch.Tensor,
                            r: int | torch.Tensor, alive: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe step: merge the r A tokens (even indices) most similar to a B token (odd indices) into it.

    tokens (B, n, C), size (B, n, 1) tokens merged so far, positions (B, n), metric (B, n, Ck); ``r`` an int or
    (B,) per sample; ``alive`` (B, n) False at padding (a sample with fewer tokens), which neither merges nor is
    merged into. Returns the same n slots, a merged token being the size-weighted mean, and the new ``alive``:
    False also at the r A tokens merged away.
    """
    B = tokens.shape[0]
    alive = torch.ones(positions.shape, dtype=torch.bool, device=tokens.device) if alive is None else alive
    r = torch.as_tensor(r, device=tokens.device).expand(B)  # (B,)
    a, b = F.normalize(metric[:, ::2], dim=-1), F.normalize(metric[:, 1::2], dim=-1)
    scores = (a @ b.transpose(1, 2)).masked_fill(~alive[:, None, 1::2], float("-inf"))  # (B, Na, Nb)
    node_max, node_idx = scores.max(dim=-1)  # (B, Na) each A token's best B partner
    node_max = node_max.masked_fill(~alive[:, ::2], float("-inf"))
    edge_idx = node_max.argsort(dim=-1, descending=True)  # (B, Na) most similar first
    width = int(r.max())
    src = edge_idx[:, :width]  # (B, width)
    merging = torch.arange(width, device=tokens.device) < r[:, None]  # (B, width): sample b merges its first r_b
    dst = node_idx.gather(1, src)  # (B, width)

    x = torch.cat([tokens * size, metric * size, size], dim=-1)  # sums (B, n, C + Ck + 1)
    x_a, x_b = x[:, ::2], x[:, 1::2]
    moved = gather_tokens(x_a, src) if bool(merging.all()) else gather_tokens(x_a, src) * merging[..., None]
    x_b = x_b.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, x.shape[-1]), moved)
    sums = torch.stack([x_a, x_b], dim=2).flatten(1, 2) if x_a.shape[1] == x_b.shape[1] else \
        torch.cat([torch.stack([x_a[:, :-1], x_b], dim=2).flatten(1, 2), x_a[:, -1:]], dim=1)  # interleaved again
    merged_away = torch.zeros_like(alive[:, ::2]).scatter(1, src, merging)  # (B, Na)
    alive = alive.clone()
    alive[:, ::2] &= ~merged_away
    new_size = sums[..., -1:]
    weighted = sums[..., :-1] / new_size
    return weighted[..., :tokens.shape[-1]], new_size, positions, weighted[..., tokens.shape[-1]:], alive


class ToMe(PreProjectorSelector):
    reads_vision_attention = True

    def __init__(self, num_keep: int, key_dim: int, reference_tokens: int | None = None,
                 proportional_attention: bool = False):
        super().__init__(num_keep, reference_tokens)
        self.key_dim = key_dim
        self.proportional_attention = proportional_attention

    def flops(self, n: int, k: int | None = None, n_text: int = 0) -> int:
        """The A x B similarity matrices of every step, from n tokens down to k (default: num_keep)."""
        total = 0
        for r in merge_steps(n, self.num_keep if k is None else k):
            total += ((n + 1) // 2) * (n // 2) * self.key_dim
            n -= r
        return total

    def forward(self, features: torch.Tensor, tau: float = 1.0, question: torch.Tensor | None = None,
                question_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                vision_attention=None, valid: torch.Tensor | None = None) -> MergeOutput:
        """The merger's output with each merged token's size (``MergeOutput.sizes``, for proportional attention)."""
        B, N, _ = features.shape
        if valid is None and self.num_keep > N:
            raise ValueError(f"{type(self).__name__} keeps {self.num_keep} tokens but the image has {N}")
        keep = torch.full((B,), self.num_keep) if valid is None else self.keep_counts(valid)
        tokens, positions, used, size = self.merge(features, vision_attention, valid, keep)  # spatial order
        return self.padded_output(features, tokens, positions, used,
                                  size[..., 0] * used if self.proportional_attention else None)

    def merge(self, features: torch.Tensor, vision_attention, valid: torch.Tensor | None,
              keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Merge each sample down to ``keep`` (B,) tokens: the steps run batched, a sample that has reached its
        count merges nothing more; the slots of merged-away tokens and of padding come last, marked False.
        Returns tokens (B, K, Dv), patch positions (B, K), alive (B, K) and sizes (B, K, 1), in spatial order."""
        B, N, _ = features.shape
        tokens, metric = features, vision_attention.keys  # (B, N, Dv) each
        size = torch.ones(B, N, 1, dtype=features.dtype, device=features.device)
        positions = torch.arange(N, device=features.device).expand(B, N)
        alive = torch.ones(B, N, dtype=torch.bool, device=features.device) if valid is None else valid
        keep = keep.to(features.device)
        left = alive.sum(dim=1)  # (B,)
        while bool((left > keep).any()):
            r = step_size(left, keep)  # (B,)
            tokens, size, positions, metric, alive = bipartite_soft_matching(tokens, size, positions, metric, r, alive)
            left = left - r
            # back to spatial order, so A and B alternate across the image; merged-away and padding slots last
            order = (positions + N * ~alive).argsort(dim=1)[:, :int(left.max())]
            tokens, size, metric = gather_tokens(tokens, order), gather_tokens(size, order), gather_tokens(metric, order)
            positions, alive = positions.gather(1, order), alive.gather(1, order)
        return tokens, positions, alive, size
