"""Analytic FLOPs of LLaVA's prefill, counted in multiply-adds as in PyramidDrop and FastV.

Only the matrix products that scale with the number of tokens are counted (norms, rotary
embeddings, softmax and activations are ignored), so numbers compare with the papers' tables.
Callers report two variants by passing the matching per-layer token counts:
- "all tokens": n = text + vision tokens in each decoder layer (the real prefill cost);
- "vision tokens only": n = vision tokens in each layer, the convention papers compare.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def decoder_layer_flops(n: int, d: int, m: int) -> int:
    """Multiply-adds of one LLM decoder layer on n tokens: 4*n*d^2 + 2*n^2*d + 3*n*d*m.

    4*n*d^2: q, k, v and o projections; 2*n^2*d: attention scores and their weighted sum;
    3*n*d*m: the gated (SwiGLU) MLP's three d x m matrices. d is the hidden size, m the MLP
    width. The formula of PyramidDrop (Xing et al. 2024); FastV (Chen et al. 2024) counts the
    same terms with 2*n*d*m for a two-matrix MLP.
    """
    for name, value in (("n", n), ("d", d), ("m", m)):
        _check_count(name, value)
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def llm_prefill_flops(tokens_per_layer: Sequence[int], d: int, m: int) -> int:
    """Multiply-adds of the decoder's prefill: sum over layers i of decoder_layer_flops(n_i, d, m).

    tokens_per_layer[i] is the number of tokens layer i processes, which drops after each pruning
    stage (PyramidDrop, Xing et al. 2024; FastV, Chen et al. 2024).
    """
    for i, n in enumerate(tokens_per_layer):
        _check_count(f"tokens_per_layer[{i}]", n)
    return sum(decoder_layer_flops(n, d, m) for n in tokens_per_layer)


def vision_tower_flops(n: int, d: int, m: int, num_layers: int) -> int:
    """Multiply-adds of a CLIP-style ViT encoder: num_layers * (4*n*d^2 + 2*n^2*d + 2*n*d*m).

    Same terms as a decoder layer (PyramidDrop, Xing et al. 2024; FastV, Chen et al. 2024) with
    CLIP's two-matrix MLP (Radford et al. 2021) instead of the gated one.
    """
    _check_count("num_layers", num_layers)
    for name, value in (("n", n), ("d", d), ("m", m)):
        _check_count(name, value)
    return num_layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def projector_flops(n: int, d_vision: int, d: int) -> int:
    """Multiply-adds of LLaVA-1.5's two-layer MLP projector on n tokens: n * (d_vision*d + d*d).

    Liu et al. 2024, "Improved Baselines with Visual Instruction Tuning" (LLaVA-1.5).
    """
    for name, value in (("n", n), ("d_vision", d_vision), ("d", d)):
        _check_count(name, value)
    return n * (d_vision * d + d * d)


def token_merger_flops(n: int, k: int, d_vision: int, d_hidden: int) -> int:
    """Multiply-adds of the token merger: n*(d_vision*d_hidden + d_hidden) + 2*n*k*d_vision.

    A scorer MLP d_vision -> d_hidden -> 1 on n tokens, then a soft assignment of the n tokens
    to k centres: n*k*d_vision for the similarities and n*k*d_vision for the weighted sum. Counted
    in the multiply-add convention of PyramidDrop (Xing et al. 2024).
    """
    for name, value in (("n", n), ("k", k), ("d_vision", d_vision), ("d_hidden", d_hidden)):
        _check_count(name, value)
    return n * (d_vision * d_hidden + d_hidden) + 2 * n * k * d_vision


def cross_attention_pruner_flops(n_vision: int, n_text: int, d: int, d_internal: int) -> int:
    """Multiply-adds of a text-to-vision cross-attention scorer.

    n_v*d*d_i + 2*n_t*d*d_i + 2*n_v*n_t*d_i + n_v*d_i: queries from the n_v vision tokens, keys
    and values from the n_t text tokens (projected d -> d_i), attention scores and weighted sum,
    and an output layer d_i -> 1 per vision token. Counted in the multiply-add convention of
    PyramidDrop (Xing et al. 2024).
    """
    for name, value in (("n_vision", n_vision), ("n_text", n_text), ("d", d), ("d_internal", d_internal)):
        _check_count(name, value)
    projections = n_vision * d * d_internal + 2 * n_text * d * d_internal
    attention = 2 * n_vision * n_text * d_internal
    return projections + attention + n_vision * d_internal


@dataclass(frozen=True)
class PrefillFlops:
    """Prefill multiply-adds of the unpruned model and of the pruned one (pruning modules included)."""

    baseline: int
    pruned: int

    @property
    def reduction(self) -> float:
        """1 - pruned / baseline, the fraction of FLOPs saved; 0.0 when the baseline is empty."""
        return 1.0 - self.pruned / self.baseline if self.baseline else 0.0


def compare_prefill(baseline_tokens: Sequence[int], pruned_tokens: Sequence[int], d: int, m: int,
                    extra_pruned: int = 0) -> PrefillFlops:
    """Prefill FLOPs with and without pruning: llm_prefill_flops of each token schedule.

    `extra_pruned` is the cost of the modules pruning adds (token merger, cross-attention
    pruners), charged to the pruned side so the reduction is net of their cost.
    """
    if len(baseline_tokens) != len(pruned_tokens):
        raise ValueError(f"baseline_tokens and pruned_tokens must have one entry per decoder layer, got "
                         f"{len(baseline_tokens)} and {len(pruned_tokens)} layers; pass the same depth for both")
    _check_count("extra_pruned", extra_pruned)
    return PrefillFlops(baseline=llm_prefill_flops(baseline_tokens, d, m),
                        pruned=llm_prefill_flops(pruned_tokens, d, m) + extra_pruned)
