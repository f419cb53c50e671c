"""Uniform spatial pooling before the projector: average the patch grid down to h x w = K tokens.

The content-blind pooling baseline of the token-reduction literature (average pooling of the
vision features, as compared against in VisionZip, Yang et al. 2024). Here K must factor as
h x w with both sides at most the grid's side (the most square pair is used); windows are those
of ``adaptive_avg_pool2d``, and each pooled token takes the position id of its window's centre
patch, so RoPE positions keep the image's layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.baselines.base import PreProjectorSelector


def pooling_grid(num_tokens: int, num_keep: int) -> tuple[int, int]:
    """(h, w) with h * w = num_keep, h <= w <= the side of the square grid of num_tokens, most square first."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"spatial pooling needs a square patch grid, got {num_tokens} vision tokens")
    pairs = [(h, num_keep // h) for h in range(1, side + 1) if num_keep % h == 0 and h <= num_keep // h <= side]
    if not pairs:
        fits = [k for k in range(1, num_tokens + 1)
                if any(k % h == 0 and h <= k // h <= side for h in range(1, side + 1))]
        nearest = sorted(fits, key=lambda k: abs(k - num_keep))[:2]
        raise ValueError(f"spatial pooling cannot keep {num_keep} tokens: it is not h x w with h, w <= {side} "
                         f"(the {side} x {side} grid); choose a budget that keeps {' or '.join(map(str, sorted(nearest)))}")
    return pairs[-1]


def window_centres(size: int, out: int) -> torch.Tensor:
    """Index of the centre cell of each of adaptive_avg_pool's ``out`` windows over ``size`` cells."""
    starts = [(i * size) // out for i in range(out)]
    ends = [-((-(i + 1) * size) // out) for i in range(out)]  # ceil
    return torch.tensor([(s + e - 1) // 2 for s, e in zip(starts, ends)])


class SpatialPooling(PreProjectorSelector):
    def __init__(self, num_tokens: int, num_keep: int):
        super().__init__(num_keep)
        self.side = math.isqrt(num_tokens)
        self.grid = pooling_grid(num_tokens, num_keep)
        rows, cols = window_centres(self.side, self.grid[0]), window_centres(self.side, self.grid[1])
        self.register_buffer("positions", (rows[:, None] * self.side + cols[None, :]).flatten(), persistent=False)

    def select(self, features: torch.Tensor, vision_attention=None) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, D = features.shape
        grid = features.transpose(1, 2).reshape(B, D, self.side, self.side)  # (B, Dv, S, S)
        pooled = F.adaptive_avg_pool2d(grid, self.grid).flatten(2).transpose(1, 2)  # (B, K, Dv)
        return pooled, self.positions.expand(B, -1)
