"""What every training-free baseline shares: the two places a method can act in PrunedLlava.

- ``PreProjectorSelector`` sits where the learned token merger sits: N vision features in,
  ``num_keep`` tokens out (kept or merged), each with the patch index whose placeholder slot (and
  RoPE position) it takes, returned as the merger's ``MergeOutput``.
- ``AttentionRanker`` sits where a learned layer pruner sits: at a pruning layer it scores the
  surviving vision tokens from attention probabilities it requests through an ``AttentionProbe``
  (models/pruned_llava.py); PrunedLlava keeps the stage's budget of top-scored tokens.

Neither has parameters; both run in hard mode, through the same forward, generation, token
counting and FLOPs as the learned method.
"""

from __future__ import annotations

import torch
from torch import nn

from models.token_merger import MergeOutput


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens, (B, K) indices -> (B, K, C)."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1/0 mask -> (B,) index of each row's last real token (left or right padding)."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(1).long().argmax(dim=1)


class PreProjectorSelector(nn.Module):
    """Keep or merge N vision features into ``num_keep`` tokens before the projector."""

    reads_vision_attention = False  # True: PrunedLlava passes the feature layer's VisionAttention
    reads_question_ids = False  # True: PrunedLlava passes the instruction's ids (question_ids=, (B, Tq))

    def __init__(self, num_keep: int, reference_tokens: int | None = None):
        super().__init__()
        if num_keep < 1:
            raise ValueError(f"{type(self).__name__} must keep at least 1 vision token, got {num_keep}")
        self.num_keep = num_keep
        self.reference_tokens = reference_tokens  # the image size num_keep is for (images of other sizes: same share)

    def keep_counts(self, valid: torch.Tensor) -> torch.Tensor:
        """(B,) tokens each image keeps when images hold different numbers (``valid`` (B, N)): the share
        ``num_keep / reference_tokens`` of its own, at least 1."""
        if self.reference_tokens is None:
            raise ValueError(f"{type(self).__name__} got images of different sizes but no reference_tokens "
                             "(the image size num_keep is for)")
        keep = torch.round(valid.sum(dim=1).double() * self.num_keep / self.reference_tokens).long()
        return torch.minimum(keep.clamp_min(1), valid.sum(dim=1))

    @staticmethod
    def padded_output(features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, used: torch.Tensor,
                      sizes: torch.Tensor | None = None) -> MergeOutput:
        """The merger's output for ``select_padded``'s (B, K, Dv) tokens, (B, K) positions and (B, K) ``used`` slots;
        ``sizes`` (B, K): the tokens each stands for (proportional attention)."""
        B, N, _ = features.shape
        kept = torch.zeros(B, N, dtype=features.dtype, device=features.device)
        kept = kept.scatter(1, positions, used.to(features.dtype))  # (B, N)
        return MergeOutput(tokens, positions, kept, features.new_zeros(()), valid=None if bool(used.all()) else used,
                           sizes=sizes)

    def select(self, features: torch.Tensor, vision_attention) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, Dv) features -> (B, K, Dv) tokens and (B, K) patch indices, in any order."""
        raise NotImplementedError

    def select_padded(self, features: torch.Tensor, vision_attention, valid: torch.Tensor,
                      keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images of different sizes: (B, N, Dv) features padded at the end (``valid`` (B, N)) -> each sample's
        ``keep`` (B,) tokens in (B, K, Dv), their (B, K) patch indices (distinct per sample) and (B, K) bool, False
        at the slots a sample does not use."""
        raise NotImplementedError(f"{type(self).__name__} needs every image to hold the same grid of tokens; with a "
                                  "backbone whose token count follows the image use the learned merger, ToMe, random, "
                                  "FastV or PyramidDrop")

    def flops(self, n: int, k: int | None = None, n_text: int = 0) -> int:
        """Multiply-adds of one call on n tokens (counted like models/flops.py: matrix products only); the
        learned merger's signature (k: the tokens kept, ``num_keep`` here; n_text: question tokens, unread)."""
        return 0

    def forward(self, features: torch.Tensor, tau: float = 1.0, question: torch.Tensor | None = None,
                question_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                vision_attention=None, valid: torch.Tensor | None = None) -> MergeOutput:
        B, N, _ = features.shape
        if valid is not None:
            if type(self).select_padded is PreProjectorSelector.select_padded:
                self.select_padded(features, vision_attention, valid, valid.sum(dim=1))  # raises: not supported
            return self.padded_output(features, *self.select_padded(features, vision_attention, valid,
                                                                    self.keep_counts(valid)))
        if self.num_keep > N:
            raise ValueError(f"{type(self).__name__} keeps {self.num_keep} tokens but the image has {N}")
        tokens, positions = self.select(features, vision_attention)  # (B, K, Dv), (B, K)
        order = positions.argsort(dim=1)  # the placeholder slots are filled in spatial order
        positions = positions.gather(1, order)
        kept = torch.zeros(B, N, dtype=features.dtype, device=features.device).scatter(1, positions, 1.0)  # (B, N)
        return MergeOutput(gather_tokens(tokens, order), positions, kept, features.new_zeros(()))


class AttentionRanker(nn.Module):
    """Scores (B, n) for the vision tokens at a pruning layer, from that layer's (or the previous one's) attention."""

    reads_attention = True  # PrunedLlava calls forward(probe, layer, attention_mask, vision_index)

    def flops(self, n_vision: int, n_text: int) -> int:
        """0: in the papers the scores are a by-product of the layer's own attention (here they are recomputed,
        which the measured time includes)."""
        return 0

    def forward(self, probe, layer: int, attention_mask: torch.Tensor, vision_index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
