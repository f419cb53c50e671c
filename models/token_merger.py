"""Token merger: Gumbel-Top-K centre selection and soft-assignment merging, before the projector.

Given the N vision features of an image (576 x 1024 for llava-1.5), a scorer gives each token
a score s_i and a keep probability p_i = sigmoid(s_i / tau). K tokens become centres: in
training, the top K of s + Gumbel noise (a sample of K without replacement from softmax(s));
in eval, the plain top K. Every other token is assigned to the centres by a softmax over
cosine similarity / tau, and each output token is the weighted mean of its centre and the
tokens assigned to it, so background is folded into the tokens that remain instead of being
thrown away (as in ToMe, Bolya et al. 2023). The output keeps the centres' spatial order and
their patch indices, so that RoPE positions do not shift.

Gradients reach the scorer through a straight-through relaxed top-K: the forward pass uses
the hard 0/1 selection, the backward pass the relaxed top-K at temperature tau
(models/gumbel.py).

Budget: K = ``num_keep`` for every image (``fixed``), the setting equal-budget benchmarks
use. ``merge_sparsity_loss`` = (mean_i p_i - merge_ratio)^2 keeps the keep probabilities
calibrated to the budget (it falls and settles as the scorer learns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.cross_attention import CrossAttention
from models.flops import token_merger_flops
from models.gumbel import gumbel_top_k, relaxed_top_k, sample_gumbel, straight_through, top_k_mask


@dataclass
class MergeOutput:
    tokens: torch.Tensor  # (B, K, Dv) merged features, in the centres' spatial order
    positions: torch.Tensor  # (B, K) patch index of each centre in 0..N-1, ascending
    keep_prob: torch.Tensor  # (B, N) p_i = sigmoid(s_i / tau)
    sparsity_loss: torch.Tensor  # scalar
    scores: torch.Tensor | None = None  # (B, N) the scorer's s_i (None for training-free mergers)


class SimpleScorer(nn.Module):
    """s_i = MLP(LayerNorm(x_i)): the score depends on the token alone."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor, question: torch.Tensor | None = None,
                question_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(features).squeeze(-1)  # (B, N)


class QuestionAwareScorer(nn.Module):
    """s_i = MLP([x_i ; CrossAttn(x_i -> question)]): vision tokens attend to the question's word embeddings."""

    def __init__(self, dim: int, text_dim: int, hidden: int, num_heads: int):
        super().__init__()
        self.vision_norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, hidden)
        self.text_norm = nn.LayerNorm(text_dim)
        self.key_value = nn.Linear(text_dim, 2 * hidden)
        self.attention = CrossAttention(hidden, num_heads)
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        q = self.query(self.vision_norm(features))  # (B, N, h)
        k, v = self.key_value(self.text_norm(question)).chunk(2, dim=-1)  # (B, Tq, h) each
        context = self.attention(q, k, v, question_mask)  # (B, N, h)
        return self.head(torch.cat([q, context], dim=-1)).squeeze(-1)  # (B, N)


class TokenMerger(nn.Module):
    def __init__(self, dim: int, text_dim: int, num_keep: int, merge_ratio: float, merger_type: str = "simple",
                 hidden: int = 256, num_heads: int = 4):
        super().__init__()
        if merger_type == "simple":
            self.scorer = SimpleScorer(dim, hidden)
        elif merger_type == "question_aware":
            self.scorer = QuestionAwareScorer(dim, text_dim, hidden, num_heads)
        else:
            raise ValueError(f"merger_type must be 'simple' or 'question_aware', got {merger_type!r}")
        self.merger_type = merger_type
        self.dim, self.hidden = dim, hidden
        self.num_keep = num_keep
        self.merge_ratio = merge_ratio
        self._init_keep_all()

    def _init_keep_all(self) -> None:
        # Start with p_i close to merge_ratio for every token: no token is preferred before training.
        last = self.scorer.net[-1] if isinstance(self.scorer, SimpleScorer) else self.scorer.head[-1]
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, torch.logit(torch.tensor(self.merge_ratio).clamp(1e-3, 1 - 1e-3)).item())

    def flops(self, n: int) -> int:
        """Multiply-adds of one call on n tokens (the simple scorer's count; models/flops.py)."""
        return token_merger_flops(n, self.num_keep, self.dim, self.hidden)

    def forward(self, features: torch.Tensor, tau: float, question: torch.Tensor | None = None,
                question_mask: torch.Tensor | None = None, generator: torch.Generator | None = None) -> MergeOutput:
        """Merge (B, N, Dv) features into (B, K, Dv); Gumbel noise only in training mode."""
        B, N, _ = features.shape
        K = self.num_keep
        if not 1 <= K <= N:
            raise ValueError(f"the merger keeps {K} tokens but the image has {N}; lower target_merge_tokens")
        scores = self.scorer(features, question, question_mask)  # (B, N)
        keep_prob = torch.sigmoid(scores / tau)
        noisy = scores + sample_gumbel(scores, generator) if self.training else scores
        centres = gumbel_top_k(noisy, K, noise=False)  # (B, K) ascending; the noise is already in `noisy`
        selection = straight_through(top_k_mask(centres, N), relaxed_top_k(noisy, K, tau))  # (B, N), 1 at centres
        merged = soft_assignment_merge(features, centres, selection, tau)
        sparsity = (keep_prob.mean() - self.merge_ratio) ** 2
        return MergeOutput(merged, centres, keep_prob, sparsity, scores)


def soft_assignment_merge(features: torch.Tensor, centres: torch.Tensor, selection: torch.Tensor,
                          tau: float) -> torch.Tensor:
    """Weighted mean of each centre and the non-centre tokens softly assigned to it.

    a_jk = softmax_k(cos(x_j, c_k) / tau) assigns token j over the K centres; token j takes part
    with weight (1 - selection_j), so a centre is not merged into another centre. Output k is
    (selection_{c_k} * c_k + sum_j (1 - selection_j) a_jk x_j) / (selection_{c_k} + sum_j (1 - selection_j) a_jk).
    ``selection`` is 0/1 in value; its straight-through gradient reaches the scorer. Computed in
    float32 (a softmax of cos / tau at small tau loses too much in bf16), returned in the features' dtype.
    """
    dtype = features.dtype
    features, selection = features.float(), selection.float()
    B, N, D = features.shape
    idx = centres.unsqueeze(-1).expand(-1, -1, D)  # (B, K, D)
    centre_feats = features.gather(1, idx)  # (B, K, D)
    sim = F.normalize(features, dim=-1) @ F.normalize(centre_feats, dim=-1).transpose(1, 2)  # (B, N, K)
    assign = torch.softmax(sim / tau, dim=-1) * (1 - selection).unsqueeze(-1)  # (B, N, K)
    centre_weight = selection.gather(1, centres)  # (B, K), 1 in value
    numerator = centre_weight.unsqueeze(-1) * centre_feats + assign.transpose(1, 2) @ features  # (B, K, D)
    denominator = centre_weight + assign.sum(dim=1)  # (B, K)
    return (numerator / denominator.unsqueeze(-1)).to(dtype)
