"""Token merger: Gumbel-Top-K centre selection and soft-assignment merging, before the projector.

Given the N vision features of an image (576 x 1024 for llava-1.5), a scorer gives each token
a score s_i and a keep probability p_i = sigmoid(s_i). K tokens become centres: in
training, the top K of s + Gumbel noise (a sample of K without replacement from softmax(s));
in eval, the plain top K. Every other token is assigned to the centres by a softmax over
cosine similarity / tau, and each output token is the weighted mean of its centre and the
tokens assigned to it, so background is folded into the tokens that remain instead of being
thrown away (as in ToMe, Bolya et al. 2023). The output keeps the centres' spatial order and
their patch indices, so that RoPE positions do not shift.

Gradients reach the scorer through a straight-through relaxed top-K: the forward pass uses
the hard 0/1 selection, the backward pass the relaxed top-K at temperature tau
(models/gumbel.py).

Which tokens are merged (``similarity_threshold`` theta): token j joins the centres whose
cosine similarity to it is at least theta (softmax over those), and is dropped when no centre
is that close. theta = -1 is the plain soft assignment of every token; the default 0.9 merges
near-duplicates only, so a one-patch object kept as a centre is not averaged with the
background around it.

Ties among the centres (``spread_weight`` w): the centres are the top K of s_i + w * r_i (plus the Gumbel noise in
training), r_i in (0, 1] a fixed spatial prior (:func:`spread_prior`) whose any top m tokens are spread evenly over
the image in raster order. Background tokens score nearly alike: the noise of training picks them at random
places, but the plain top K of eval picks them by small differences, which may gather them in one part of the
image, so that the language model, which reads where an object sits from the image tokens before it, sees the
background mass bunched before the objects. w = 1 breaks such ties evenly over the image and leaves tokens w apart
in score ranked as they were; w = 0 is the plain top K.

docs/benchmark.md measures both: the threshold under "What made the learned method competitive", the spread
priority in the findings under the benchmark's main table.

Budget (``budget``):
- ``fixed``: K = ``num_keep`` for every image, the setting equal-budget benchmarks use;
- ``adaptive``: K_b = round(sum_i p_i) per image, clamped to [ceil(num_keep / 2), min(N,
  2 num_keep)], with p_i = sigmoid(s_i): an image with more salient tokens keeps more. A batch
  holds max_b K_b centre slots; the slots beyond an image's K_b are marked invalid
  (``MergeOutput.valid``) and the pruned forward masks them out like padding.
``merge_sparsity_loss`` = (mean_i p_i - merge_ratio)^2 pulls the mean keep probability, and so
the mean K_b, to the ratio; in ``fixed`` mode it only keeps the scores calibrated. p_i does
not depend on the temperature, so the budget does not drift as tau anneals; tau sharpens the
relaxed top-K that carries the scorer's gradient.
"""

from __future__ import annotations

import functools
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
    keep_prob: torch.Tensor  # (B, N) p_i = sigmoid(s_i)
    sparsity_loss: torch.Tensor  # scalar
    scores: torch.Tensor | None = None  # (B, N) the scorer's s_i (None for training-free mergers)
    valid: torch.Tensor | None = None  # (B, K) bool, False at the slots beyond an image's adaptive K; None: all valid
    assignment: torch.Tensor | None = None  # (B, N) output slot each token went into (a centre its own, a merged token
    #   its largest weight's), -1 where it was dropped; None for training-free mergers
    sizes: torch.Tensor | None = None  # (B, K) how many input tokens each output stands for (its merge weights' sum),
    #   when the language model should attend to it in proportion (proportional attention); None: as one token


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
        self.text_dim = text_dim
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


MERGE_BUDGETS = ("fixed", "adaptive")
PADDING_SCORE = -1e4  # the score of a padding token: ranked last, keep probability 0


class TokenMerger(nn.Module):
    def __init__(self, dim: int, text_dim: int, num_keep: int, merge_ratio: float, merger_type: str = "simple",
                 hidden: int = 256, num_heads: int = 4, budget: str = "fixed", similarity_threshold: float = 0.9,
                 proportional_attention: bool = False, spread_weight: float = 0.0):
        super().__init__()
        if merger_type == "simple":
            self.scorer = SimpleScorer(dim, hidden)
        elif merger_type == "question_aware":
            self.scorer = QuestionAwareScorer(dim, text_dim, hidden, num_heads)
        else:
            raise ValueError(f"merger_type must be 'simple' or 'question_aware', got {merger_type!r}")
        if budget not in MERGE_BUDGETS:
            raise ValueError(f"merge_budget must be one of {MERGE_BUDGETS}, got {budget!r}")
        self.merger_type, self.budget, self.similarity_threshold = merger_type, budget, similarity_threshold
        self.proportional_attention, self.spread_weight = proportional_attention, spread_weight
        self.dim, self.hidden = dim, hidden
        self.num_keep = num_keep
        self.merge_ratio = merge_ratio
        self._init_keep_ratio()

    def _init_keep_ratio(self) -> None:
        # Every p_i = merge_ratio at the start: no token is preferred, and an adaptive budget starts at K.
        last = self.scorer.net[-1] if isinstance(self.scorer, SimpleScorer) else self.scorer.head[-1]
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, torch.logit(torch.tensor(self.merge_ratio).clamp(1e-3, 1 - 1e-3)).item())

    def flops(self, n: int, k: int | None = None, n_text: int = 0) -> int:
        """Multiply-adds of one call on n tokens with k centres (default K) and n_text question tokens (models/flops.py)."""
        k = self.num_keep if k is None else k
        if isinstance(self.scorer, QuestionAwareScorer):
            return token_merger_flops(n, k, self.dim, self.hidden, n_text, self.scorer.text_dim)
        return token_merger_flops(n, k, self.dim, self.hidden)

    def forward(self, features: torch.Tensor, tau: float, question: torch.Tensor | None = None,
                question_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                valid: torch.Tensor | None = None) -> MergeOutput:
        """Merge (B, N, Dv) features into (B, K, Dv); Gumbel noise only in training mode.

        ``valid`` (B, N): False at the padding of images with fewer tokens than N (a backbone whose token count
        follows the image); such an image keeps ``merge_ratio`` of its own tokens (its fixed K), and its padding is
        never a centre nor merged."""
        B, N, _ = features.shape
        if valid is None and not 1 <= self.num_keep <= N:
            raise ValueError(f"the merger keeps {self.num_keep} tokens but the image has {N}; lower target_merge_tokens")
        scores = self.scorer(features, question, question_mask)  # (B, N)
        if valid is not None:
            scores = scores.masked_fill(~valid, PADDING_SCORE)
            tokens = valid.sum(dim=1)  # (B,)
            fixed = torch.round(tokens.double() * self.merge_ratio).long().clamp_min(1)  # (B,) each image's K
        else:
            tokens = torch.full((B,), N, device=features.device)
            fixed = torch.full((B,), self.num_keep, device=features.device)
        keep_prob = torch.sigmoid(scores.float())  # (B, N), 0 at padding
        if self.budget == "fixed":
            counts = torch.minimum(fixed, tokens)
        else:
            low, high = (fixed + 1) // 2, torch.minimum(2 * fixed, tokens)
            counts = torch.maximum(torch.minimum(keep_prob.detach().sum(dim=1).round().long(), high), low)  # (B,)
        k_max = int(counts.max())
        noisy = scores + sample_gumbel(scores, generator) if self.training else scores
        if self.spread_weight:
            noisy = noisy + self.spread_weight * spread_prior(N, scores.device)
        ranked = gumbel_top_k(noisy, k_max, noise=False, ranked=True)  # (B, k_max) best first; noise is in `noisy`
        used = torch.arange(k_max, device=features.device) < counts.unsqueeze(1)  # (B, k_max): image b's first K_b
        centres, order = ranked.sort(dim=1)  # spatial order
        used = used.gather(1, order)
        selection = top_k_mask(centres, N, used)  # (B, N), 1 at the used centres
        if torch.is_grad_enabled() and scores.requires_grad:  # the relaxation only carries gradients: skip it in eval
            selection = straight_through(selection, relaxed_top_k(noisy, counts, tau))
        merged, slots, sizes = soft_assignment_merge(features, centres, selection, tau, used, self.similarity_threshold,
                                                     return_slots=True, token_valid=valid)
        mean_keep = keep_prob.mean() if valid is None else keep_prob.sum() / tokens.sum()  # over real tokens
        sparsity = (mean_keep - self.merge_ratio) ** 2
        return MergeOutput(merged, centres, keep_prob, sparsity, scores, None if bool(used.all()) else used, slots,
                           sizes.detach() if self.proportional_attention else None)


def spread_prior(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(n,) priorities in (0, 1], all distinct: 1 at token 0, then the tokens in the order the base-2 van der Corput
    sequence (1/2, 1/4, 3/4, 1/8, ...) first lands in them (token floor(v * n)), each new one 1/n lower. The m tokens
    of highest priority are spread evenly over 0..n-1 for every m (no gap, the ends included, over 3 n / m), so ties
    among m centres are broken evenly across the image in raster order, whatever n is."""
    return _spread_prior(n).to(device)


@functools.lru_cache(maxsize=8)
def _spread_prior(n: int) -> torch.Tensor:
    order, seen, i = [], set(), 0
    while len(order) < n:
        v, f, j = 0.0, 0.5, i
        while j:  # v = the bits of i mirrored behind the binary point
            v, f, j = v + f * (j & 1), f / 2, j >> 1
        token = min(int(v * n), n - 1)
        if token not in seen:
            seen.add(token)
            order.append(token)
        i += 1
    prior = torch.empty(n)
    prior[torch.tensor(order)] = 1 - torch.arange(n, dtype=torch.float32) / n
    return prior


def soft_assignment_merge(features: torch.Tensor, centres: torch.Tensor, selection: torch.Tensor, tau: float,
                          valid: torch.Tensor | None = None, similarity_threshold: float = -1.0,
                          return_slots: bool = False, token_valid: torch.Tensor | None = None
                          ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of each centre and the non-centre tokens softly assigned to it.

    a_jk = softmax_k(cos(x_j, c_k) / tau) over the valid centres k with cos(x_j, c_k) >= theta
    (``similarity_threshold``; a token with no such centre is dropped, a_j = 0) assigns token j;
    it takes part with weight (1 - selection_j), so a centre is not merged into another centre.
    Output k is (selection_{c_k} * c_k + sum_j (1 - selection_j) a_jk x_j) / (selection_{c_k} +
    sum_j (1 - selection_j) a_jk); an invalid slot (``valid`` False) comes out as zeros.
    ``selection`` is 0/1 in value; its straight-through gradient reaches the scorer. Computed in
    float32 (a softmax of cos / tau at small tau loses too much in bf16), returned in the features' dtype.
    ``return_slots``: also (B, N) the output each token went into (MergeOutput.assignment) and (B, K) each output's
    size, its weights' sum (1 for a centre that absorbed nothing, 0 at an invalid slot).
    ``token_valid`` (B, N): False at padding tokens, which merge into nothing.
    """
    dtype = features.dtype
    features, selection = features.float(), selection.float()
    B, N, D = features.shape
    idx = centres.unsqueeze(-1).expand(-1, -1, D)  # (B, K, D)
    centre_feats = features.gather(1, idx)  # (B, K, D)
    sim = F.normalize(features, dim=-1) @ F.normalize(centre_feats, dim=-1).transpose(1, 2)  # (B, N, K)
    allowed = sim >= similarity_threshold  # (B, N, K)
    if valid is not None:
        allowed &= valid.unsqueeze(1)
    if token_valid is not None:
        allowed &= token_valid.unsqueeze(-1)
    logits = (sim / tau).masked_fill(~allowed, torch.finfo(sim.dtype).min)
    assign = torch.softmax(logits, dim=-1) * allowed * (1 - selection).unsqueeze(-1)  # (B, N, K)
    centre_weight = selection.gather(1, centres)  # (B, K), 1 in value at valid centres, 0 at invalid slots
    numerator = centre_weight.unsqueeze(-1) * centre_feats + assign.transpose(1, 2) @ features  # (B, K, D)
    denominator = (centre_weight + assign.sum(dim=1)).clamp_min(torch.finfo(sim.dtype).tiny)  # (B, K)
    merged = (numerator / denominator.unsqueeze(-1)).to(dtype)
    if not return_slots:
        return merged
    slots = assign.argmax(dim=-1).masked_fill(assign.sum(dim=-1) == 0, -1)  # (B, N)
    own = torch.arange(centres.shape[1], device=centres.device).expand_as(centres)
    # a valid centre is its own slot; an unused adaptive slot's position stays the ordinary token it is
    slots = slots.scatter(1, centres, torch.where(centre_weight > 0, own, slots.gather(1, centres)))
    return merged, slots, denominator * (centre_weight > 0)
