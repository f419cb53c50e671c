"""Multi-head cross-attention from vision tokens to question tokens (the merger's and pruners' core)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, N, h) over keys/values (B, T, h), keys masked by (B, T) bool."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"internal width {hidden} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.out = nn.Linear(hidden, hidden)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, N, h = q.shape
        split = lambda x: x.view(B, x.shape[1], self.num_heads, h // self.num_heads).transpose(1, 2)  # (B, H, L, h/H)
        mask = key_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, T)
        # A sample without question tokens attends to nothing: give it an all-zero context, not NaN.
        mask = mask | ~key_mask.any(dim=1)[:, None, None, None]
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)  # (B, H, N, h/H)
        out = out * key_mask.any(dim=1)[:, None, None, None]
        return self.out(out.transpose(1, 2).reshape(B, N, h))
