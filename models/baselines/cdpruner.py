"""CDPruner: keep the set of vision tokens of greatest diversity conditioned on the instruction, before the projector.

Zhang et al. 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs".
The kept set is the MAP set of a determinantal point process over the vision tokens with the conditional kernel
L = diag(r) S diag(r): S the tokens' pairwise cosine similarity, r_i token i's relevance to the instruction, so
det(L_Y) = prod_{i in Y} r_i^2 det(S_Y) grows with the kept tokens' relevance and with how little they resemble
each other. The MAP set is found greedily (Chen et al. 2018, "Fast Greedy MAP Inference for Determinantal Point
Process to Improve Recommendation Diversity"): each step adds the token that most increases det(L_Y), read off
incremental Cholesky rows.

What differs here:
- relevance: the paper compares the vision encoder's image embeddings with the instruction embedded by that
  encoder's paired text encoder (CLIP's), negates the cosine (its reference code ranks the tokens least like the
  text first: OpenAI CLIP's patch-text similarity is higher on background) and min-max normalises it per image.
  That is what runs when a CLIP text tower is given (``text_relevance``; the tiny backbone ships one,
  models/clip_relevance.clip_folder_of), with the sign measured on that tower where its config records one
  (``patch_text_sign``), else the paper's.
  llava-hf checkpoints keep no text encoder. Without one, r_i is the cosine between the projected token i and
  each instruction token's word embedding, averaged over the instruction's tokens and min-max normalised per
  image: the projector was
  trained to map vision features into the language model's input space, where the word embeddings live, so that
  is the one space in which LLaVA compares an image token with a word. The instruction is the prompt's text after
  the image (before the answer where there is one), as the learned question-aware merger reads it;
- S is the cosine similarity of the projected tokens, the ones the language model reads; sitting before the
  projector like the learned merger, the selector projects all N tokens itself, and its cost counts it;
- the kernel adds ``RIDGE`` to S's diagonal, so that a set that already spans the tokens' space (a budget above
  the tokens' width, possible on small backbones) grows by relevance instead of by rounding noise;
- every image of a padded batch keeps the same share of its own tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.baselines.subset import ProjectedSelector, first_picks
from models.flops import dpp_greedy_map_flops, similarity_flops

RIDGE = 1e-3  # added to the similarity's diagonal: det(L_Y) of a set with a duplicate stays positive, not 0
TINY = 1e-12  # the smallest squared residual a division by it may meet


def minmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, N) scores -> (B, N) in [0, 1], min-max normalised over each image's valid tokens (all 1 where they do not
    differ), 0 at the others."""
    low = scores.masked_fill(~valid, float("inf")).min(dim=1, keepdim=True).values  # (B, 1)
    spread = scores.masked_fill(~valid, float("-inf")).max(dim=1, keepdim=True).values - low  # (B, 1)
    relevance = torch.where(spread > 1e-6, (scores - low) / spread.clamp_min(1e-6), torch.ones_like(scores))
    return relevance.masked_fill(~valid, 0.0)


def instruction_relevance(tokens: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor,
                          valid: torch.Tensor) -> torch.Tensor:
    """(B, N, D) unit tokens, (B, Tq, D) instruction embeddings, (B, Tq) real ones, (B, N) valid tokens -> (B, N)
    relevance in [0, 1]: the mean cosine to the instruction's tokens, min-max normalised over each image's tokens.
    An instruction that ranks no token above another (none at all, or every token alike) leaves all at 1."""
    words = F.normalize(question.float(), dim=-1)  # (B, Tq, D)
    weights = question_mask.float()  # (B, Tq)
    cosine = tokens @ words.transpose(1, 2)  # (B, N, Tq)
    mean = (cosine * weights[:, None, :]).sum(dim=2) / weights.sum(dim=1, keepdim=True).clamp_min(1)  # (B, N)
    return minmax(mean, valid)


def conditional_kernel(tokens: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """(B, N, D) unit tokens, (B, N) relevance -> (B, N, N) L = diag(r) (S + RIDGE I) diag(r), S their cosines."""
    N = tokens.shape[1]
    similarity = tokens @ tokens.transpose(1, 2) + RIDGE * torch.eye(N, device=tokens.device)  # (B, N, N)
    return relevance[:, :, None] * similarity * relevance[:, None, :]


def dpp_greedy_map(kernel: torch.Tensor, k: int, selectable: torch.Tensor) -> torch.Tensor:
    """Greedy MAP inference of a DPP: (B, N, N) positive semi-definite kernel, (B, N) selectable items -> (B, k) the
    items in the order chosen, -1 once a row has none left.

    Step i adds the item j of the largest d_j^2 = det(L_{Y+j}) / det(L_Y), the squared residual of j's kernel
    column after projecting out the chosen items: with c the Cholesky rows found so far, e = (L_j - c_j c) / d_j
    is the new row and every d^2 drops by e^2 (Chen et al. 2018, Algorithm 1).
    """
    B, N, _ = kernel.shape
    residual = torch.diagonal(kernel, dim1=1, dim2=2).masked_fill(~selectable, float("-inf"))  # (B, N) d^2
    rows = kernel.new_zeros(B, k, N)  # c
    order = torch.full((B, k), -1, dtype=torch.long, device=kernel.device)
    for i in range(k):
        best, j = residual.max(dim=1)  # (B,)
        fresh = best > float("-inf")  # a row with an item left
        order[:, i] = torch.where(fresh, j, -1)
        column = kernel.gather(1, j[:, None, None].expand(-1, 1, N))  # (B, 1, N) L_j
        c_j = rows[:, :i].gather(2, j[:, None, None].expand(-1, i, 1))  # (B, i, 1)
        e = (column - c_j.transpose(1, 2) @ rows[:, :i]) / best.clamp_min(TINY).sqrt()[:, None, None]  # (B, 1, N)
        rows[:, i] = e[:, 0] * fresh[:, None]
        residual = (residual - rows[:, i] ** 2).scatter(1, j[:, None], float("-inf"))
    return order


class CDPruner(ProjectedSelector):
    """``text_relevance`` (models/clip_relevance.ClipTextRelevance): read the relevance from the backbone's CLIP text
    tower as the paper does (the signed cosine, min-max normalised); without it, from the word embeddings."""

    def __init__(self, num_keep: int, project, project_cost: int, width: int, reference_tokens: int | None = None,
                 text_relevance: nn.Module | None = None):
        super().__init__(num_keep, project, project_cost, width, reference_tokens)
        self.text_relevance = text_relevance

    @property
    def reads_question_ids(self) -> bool:
        """The CLIP text tower reads the instruction's text, so PrunedLlava passes its ids."""
        return self.text_relevance is not None

    def flops(self, n: int, k: int | None = None, n_text: int = 0) -> int:
        """Projection, the n x n similarities, the relevance to n_text instruction tokens (or the CLIP text tower's)
        and the greedy MAP."""
        k = self.num_keep if k is None else k
        relevance = (similarity_flops(n, n_text, self.width) if self.text_relevance is None
                     else self.text_relevance.flops(n, n_text))
        return self.projection_and_gram_flops(n) + relevance + dpp_greedy_map_flops(n, k)

    def choose(self, features, valid, keep, vision_attention, question, question_mask, question_ids=None):
        if question is None:
            raise ValueError("CDPruner conditions its choice on the instruction: pass question= (B, Tq, D) embeddings "
                             "and question_mask= (PrunedLlava passes the prompt's)")
        tokens = self.unit_tokens(features)  # (B, N, D)
        if self.text_relevance is None:
            relevance = instruction_relevance(tokens, question, question_mask, valid)  # (B, N)
        elif question_ids is None:
            raise ValueError("CDPruner with a CLIP text tower reads the instruction's text: pass question_ids= "
                             "(PrunedLlava passes the prompt's)")
        else:
            relevance = minmax(self.text_relevance(features, question_ids, question_mask), valid)  # (B, N)
        order = dpp_greedy_map(conditional_kernel(tokens, relevance), int(keep.max()), valid)  # (B, K)
        return first_picks(order, keep, features.shape[1])
