"""What the selectors that keep a subset of the vision tokens share (CDPruner, DivPrune, VisPruner).

Each decides, per image, which of its valid tokens stay (``choose``: a (B, N) keep mask); ``SubsetSelector.forward``
turns that into the merger's output for images of one size or of many (a padded batch), with the instruction's
embeddings passed along for the methods that read them. ``ProjectedSelector`` is for the methods that compare the
tokens as the language model reads them, after the projector: sitting where the learned merger sits, before the
projector, they project all N tokens themselves, and count that in their cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.baselines.base import PreProjectorSelector, gather_tokens
from models.flops import similarity_flops
from models.sequences import compact
from models.token_merger import MergeOutput


def linear_cost_per_token(module: nn.Module) -> int:
    """Multiply-adds per token of a module made of Linear layers applied token by token (LLaVA's and Qwen2-VL's
    projectors): the sum of their weights' sizes."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def first_picks(order: torch.Tensor, keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, K) tokens in the order a greedy selection picked them (-1: none was left), (B,) counts -> (B, N) bool,
    True at each image's first keep[b] picks."""
    B, K = order.shape
    take = (torch.arange(K, device=order.device) < keep[:, None]) & (order >= 0)  # (B, K)
    kept = torch.zeros(B, num_tokens + 1, dtype=torch.bool, device=order.device)  # the last column takes the rest
    return kept.scatter(1, torch.where(take, order, num_tokens), True)[:, :num_tokens]


class SubsetSelector(PreProjectorSelector):
    """Keep ``num_keep`` of each image's tokens (the same share of each image's own, in a padded batch), as chosen by
    :meth:`choose`; the kept tokens go on unchanged, in spatial order."""

    def choose(self, features: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor, vision_attention,
               question: torch.Tensor | None, question_mask: torch.Tensor | None,
               question_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, Dv) features, (B, N) valid tokens, (B,) how many each image keeps -> (B, N) bool, exactly keep[b]
        valid tokens of image b. ``question_ids`` (B, Tq): the instruction's ids, for a selector that
        ``reads_question_ids``."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor, tau: float = 1.0, question: torch.Tensor | None = None,
                question_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                vision_attention=None, valid: torch.Tensor | None = None,
                question_ids: torch.Tensor | None = None) -> MergeOutput:
        B, N, _ = features.shape
        if valid is None:
            if self.num_keep > N:
                raise ValueError(f"{type(self).__name__} keeps {self.num_keep} tokens but the image has {N}")
            valid = torch.ones(B, N, dtype=torch.bool, device=features.device)
            keep = torch.full((B,), self.num_keep, device=features.device)
        else:
            keep = self.keep_counts(valid).to(features.device)
        kept = self.choose(features, valid, keep, vision_attention, question, question_mask,
                           question_ids=question_ids)  # (B, N)
        positions, used = compact(kept)  # (B, K) in spatial order, (B, K)
        return self.padded_output(features, gather_tokens(features, positions), positions, used)


class ProjectedSelector(SubsetSelector):
    """A subset selector that compares the projected tokens: ``project`` maps (B, N, Dv) features to the LLM's
    (B, N, D) input space (LlavaBackbone.project) at ``project_cost`` multiply-adds per token."""

    def __init__(self, num_keep: int, project: Callable[[torch.Tensor], torch.Tensor], project_cost: int, width: int,
                 reference_tokens: int | None = None):
        super().__init__(num_keep, reference_tokens)
        self.project = project  # the backbone's bound method: no submodule, so no projector weights in a state_dict
        self.project_cost = project_cost
        self.width = width  # D

    def unit_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) features -> (B, N, D) their projected tokens, unit length, float32."""
        return F.normalize(self.project(features).float(), dim=-1)

    def projection_and_gram_flops(self, n: int) -> int:
        """Projecting n tokens and their n x n cosine similarities."""
        return n * self.project_cost + similarity_flops(n, n, self.width)
