"""Layer pruners: a keep score for every surviving vision token, before a chosen decoder layer.

``cross_attention`` (the method's pruner): queries from the vision tokens' hidden states,
keys and values from the question tokens' hidden states at the same layer, projected to
``d_internal`` with ``num_heads`` heads, then a small MLP gives one keep logit per vision
token: a token is kept when the question needs it. ``attention_aware``: the same, with one more
input per token, the log of the attention the last question token paid it in the decoder layer
before (FastV's ranking signal, read from the frozen model), so the learned ranking starts from
what the model itself attends to. ``mlp``: the logit from the vision token's own hidden state
(question-blind), a simpler baseline.

Keep decisions (DESIGN 4.4):
- soft (training): q_j = sigmoid((z_j + L_j) / tau), L_j logistic noise (a Gumbel-sigmoid,
  models/gumbel.py), accumulated as log q_j; each stage has a sparsity loss that pulls the mean
  cumulative keep probability to the stage's budget, so q_j > 0.5 comes to mark the tokens hard
  mode keeps;
- hard (inference): the top k logits of the stage's budget, in their original order.

Both pruners start by keeping everything: their output layer starts at zero weight and a
positive bias, so the logits are equal and large before training.
"""

from __future__ import annotations

import torch
from torch import nn

from models.cross_attention import CrossAttention
from models.flops import cross_attention_pruner_flops, mlp_scorer_flops

INITIAL_KEEP_LOGIT = 4.0  # sigmoid(4) = 0.98: start by keeping almost every token


class CrossAttentionPruner(nn.Module):
    def __init__(self, hidden_size: int, d_internal: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.query = nn.Linear(hidden_size, d_internal)
        self.key_value = nn.Linear(hidden_size, 2 * d_internal)
        self.attention = CrossAttention(d_internal, num_heads)
        self.head = nn.Sequential(nn.Linear(2 * d_internal, d_internal), nn.GELU(), nn.Linear(d_internal, 1))
        _init_keep_all(self.head[-1])
        self.hidden_size, self.d_internal = hidden_size, d_internal

    def flops(self, n_vision: int, n_text: int) -> int:
        """Multiply-adds of one call (models/flops.py)."""
        return cross_attention_pruner_flops(n_vision, n_text, self.hidden_size, self.d_internal)

    def forward(self, vision: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        """(B, n, D) vision hidden states, (B, Tq, D) question hidden states -> (B, n) keep logits."""
        q = self.query(self.norm(vision))  # (B, n, d)
        k, v = self.key_value(self.norm(question)).chunk(2, dim=-1)  # (B, Tq, d) each
        context = self.attention(q, k, v, question_mask)  # (B, n, d)
        return self.head(torch.cat([q, context], dim=-1)).squeeze(-1)


class AttentionAwarePruner(CrossAttentionPruner):
    """:class:`CrossAttentionPruner` whose head also reads log(n * a_j), a_j the attention the last question token
    paid vision token j in the previous decoder layer (PrunedLlava passes it: ``reads_received_attention``)."""

    reads_received_attention = True

    def __init__(self, hidden_size: int, d_internal: int, num_heads: int):
        super().__init__(hidden_size, d_internal, num_heads)
        self.head = nn.Sequential(nn.Linear(2 * d_internal + 1, d_internal), nn.GELU(), nn.Linear(d_internal, 1))
        _init_keep_all(self.head[-1])

    def flops(self, n_vision: int, n_text: int) -> int:
        """The cross-attention pruner's, plus the head's weights on the extra input; the attention row it reads is
        part of the previous layer's own attention (counted as for FastV)."""
        return super().flops(n_vision, n_text) + n_vision * self.d_internal

    def forward(self, vision: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor,
                received: torch.Tensor) -> torch.Tensor:
        """... and (B, n) received attention -> (B, n) keep logits."""
        q = self.query(self.norm(vision))  # (B, n, d)
        k, v = self.key_value(self.norm(question)).chunk(2, dim=-1)  # (B, Tq, d) each
        context = self.attention(q, k, v, question_mask)  # (B, n, d)
        signal = torch.log(received.float().clamp_min(1e-8) * received.shape[1]).to(q.dtype)  # (B, n), 0 = uniform
        return self.head(torch.cat([q, context, signal.unsqueeze(-1)], dim=-1)).squeeze(-1)


class MLPPruner(nn.Module):
    def __init__(self, hidden_size: int, d_internal: int, num_heads: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, d_internal), nn.GELU(),
                                 nn.Linear(d_internal, 1))
        _init_keep_all(self.net[-1])
        self.hidden_size, self.d_internal = hidden_size, d_internal

    def flops(self, n_vision: int, n_text: int) -> int:
        """Multiply-adds of one call: the MLP on every vision token."""
        return mlp_scorer_flops(n_vision, self.hidden_size, self.d_internal)

    def forward(self, vision: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        return self.net(vision).squeeze(-1)  # (B, n)


PRUNER_TYPES = {"cross_attention": CrossAttentionPruner, "attention_aware": AttentionAwarePruner, "mlp": MLPPruner}


def build_pruner(pruner_type: str, hidden_size: int, d_internal: int, num_heads: int) -> nn.Module:
    if pruner_type not in PRUNER_TYPES:
        raise ValueError(f"pruner_type must be one of {sorted(PRUNER_TYPES)}, got {pruner_type!r}")
    return PRUNER_TYPES[pruner_type](hidden_size, d_internal, num_heads)


def _init_keep_all(layer: nn.Linear) -> None:
    nn.init.zeros_(layer.weight)
    nn.init.constant_(layer.bias, INITIAL_KEEP_LOGIT)


def hard_keep(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the k largest keep logits, ascending (the kept tokens stay in order)."""
    return logits.topk(k, dim=-1).indices.sort(dim=-1).values


def stage_budgets(num_tokens: int, keep_ratios: list[float]) -> list[int]:
    """Tokens kept after each stage: round(previous * ratio), at least 1."""
    budgets, n = [], num_tokens
    for ratio in keep_ratios:
        n = max(1, round(n * ratio))
        budgets.append(n)
    return budgets


def geometric_ratios(merged: int, num_keep: int, stages: int) -> list[float]:
    """Equal keep ratios, the last one rounded so that the budgets (:func:`stage_budgets`) go
    from ``merged`` tokens to exactly ``num_keep`` after ``stages`` stages."""
    if stages == 0:
        return []
    ratio = round((num_keep / merged) ** (1 / stages), 6)
    before_last = stage_budgets(merged, [ratio] * (stages - 1))[-1] if stages > 1 else merged
    ratios = [ratio] * (stages - 1) + [round(num_keep / before_last, 6)]
    assert stage_budgets(merged, ratios)[-1] == num_keep, (merged, ratios, num_keep)
    return ratios
