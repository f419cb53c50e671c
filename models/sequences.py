"""Padding masks, label conventions and index helpers over token sequences, shared by the models and the data.

Pure tensor functions with no other import from the project, so that ``data/`` (the collator's labels) and every
backbone adapter may use them without reaching into a model file.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # labels of tokens that are not supervised (and, for the pruners, part of the prompt)


def causal_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1/0 padding mask -> (B, 1, T, T) additive mask: 0 where query i may see key j (j <= i, j real)."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]  # (B, T, T)
    # A padded query sees no real key; let it see itself so softmax stays finite (its output is never used).
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=attention_mask.device)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def key_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) 1/0 mask of cached keys -> (B, 1, 1, S) additive mask for one new query that follows them all."""
    mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~attention_mask.bool(), torch.finfo(dtype).min)[:, None, None, :]


def compact(mask: torch.Tensor, right: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool -> the columns where it holds, in order, (B, c) with c the largest count of a row, and (B, c) bool
    ``valid``. A row with fewer is padded with some of its other columns (distinct, marked invalid): after its own
    (left-aligned, the default) or, with ``right=True``, before them, so that the last column stays last (what a
    left-padded sequence needs: its last slot predicts the next token). Batched: no loop over rows."""
    counts = mask.sum(dim=1)  # (B,)
    width = int(counts.max()) if mask.numel() else 0
    slots = torch.arange(width, device=mask.device)
    if right:
        index = mask.int().argsort(dim=1, stable=True)[:, mask.shape[1] - width:]  # unselected first, then selected
        return index, slots >= (width - counts).unsqueeze(1)
    index = (~mask).int().argsort(dim=1, stable=True)[:, :width]  # selected first, in order
    return index, slots < counts.unsqueeze(1)


def sorted_positions(index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`compact`'s (left-aligned) columns with the padding slots moved past every column, so that each row
    stays ascending (for ``torch.searchsorted``)."""
    if not index.numel():
        return index
    beyond = int(index.max()) + 1 + torch.arange(index.shape[1], device=index.device)  # (c,) past every column
    return torch.where(valid, index, beyond)
