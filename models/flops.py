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


def cross_attention_flops(n_query: int, n_key: int, d_query: int, d_key: int, d: int) -> int:
    """Multiply-adds of models/cross_attention.py with its projections: n_q queries (width d_query) attending to
    n_k keys and values (width d_key), projected to d.

    n_q*d_query*d (queries) + 2*n_k*d_key*d (keys and values) + 2*n_q*n_k*d (scores and weighted sum)
    + n_q*d^2 (the output projection).
    """
    for name, value in (("n_query", n_query), ("n_key", n_key), ("d_query", d_query), ("d_key", d_key), ("d", d)):
        _check_count(name, value)
    return n_query * d_query * d + 2 * n_key * d_key * d + 2 * n_query * n_key * d + n_query * d * d


def mlp_scorer_flops(n: int, d_in: int, d_hidden: int) -> int:
    """Multiply-adds of a d_in -> d_hidden -> 1 MLP on n tokens: n*(d_in*d_hidden + d_hidden)."""
    for name, value in (("n", n), ("d_in", d_in), ("d_hidden", d_hidden)):
        _check_count(name, value)
    return n * (d_in * d_hidden + d_hidden)


def token_merger_flops(n: int, k: int, d_vision: int, d_hidden: int, n_text: int | None = None,
                       d_text: int = 0) -> int:
    """Multiply-adds of the token merger on n tokens with k centres.

    Scorer: the simple MLP (``n_text`` None), or the question-aware one: cross-attention of the n tokens to
    the n_text question embeddings, then an MLP 2*d_hidden -> d_hidden -> 1. Merge: n*k*d_vision for the
    similarities and n*k*d_vision for the weighted sums. Checked against torch's FlopCounterMode on the
    module (tests/test_flops.py).
    """
    _check_count("k", k)
    if n_text is None:
        scorer = mlp_scorer_flops(n, d_vision, d_hidden)
    else:
        scorer = cross_attention_flops(n, n_text, d_vision, d_text, d_hidden) + mlp_scorer_flops(n, 2 * d_hidden, d_hidden)
    return scorer + 2 * n * k * d_vision


def cross_attention_pruner_flops(n_vision: int, n_text: int, d: int, d_internal: int) -> int:
    """Multiply-adds of a cross-attention pruner: the cross-attention of the n_vision tokens to the n_text
    question tokens (width d, projected to d_internal), then an MLP 2*d_internal -> d_internal -> 1 per
    vision token. Checked against torch's FlopCounterMode on the module (tests/test_flops.py).
    """
    return cross_attention_flops(n_vision, n_text, d, d, d_internal) + mlp_scorer_flops(n_vision, 2 * d_internal,
                                                                                      d_internal)


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


def fold_flops(n: int, d: int) -> int:
    """A stage that folds its dropped tokens' attention weight into the kept ones: the n x n cosine similarities of
    the vision tokens' d-wide hidden states (models/pruned_llava.fold_weights)."""
    _check_count("n", n)
    return n * n * d


def vision_tower_flops(n: int, d: int, m: int, num_layers: int) -> int:
    """Multiply-adds of a CLIP-style ViT encoder on n tokens: num_layers * (4*n*d^2 + 2*n^2*d + 2*n*d*m).

    The decoder layer's terms with CLIP's two-matrix MLP (Radford et al. 2021); the patch embedding
    (a convolution once per image) is left out like the LLM's embeddings. Checked against torch's
    FlopCounterMode on transformers' CLIPEncoderLayer (tests/test_flops.py).
    """
    for name, value in (("n", n), ("d", d), ("m", m), ("num_layers", num_layers)):
        _check_count(name, value)
    return num_layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def projector_flops(n: int, d_vision: int, d: int) -> int:
    """Multiply-adds of LLaVA's two-layer MLP projector on n tokens: n * (d_vision*d + d*d)."""
    for name, value in (("n", n), ("d_vision", d_vision), ("d", d)):
        _check_count(name, value)
    return n * (d_vision * d + d * d)


def similarity_flops(n_a: int, n_b: int, d: int) -> int:
    """Multiply-adds of the n_a x n_b dot products (cosine similarities once normalised) of d-wide tokens: n_a*n_b*d.

    What the training-free selections of models/baselines pay for their own choice: a Gram matrix of the vision
    tokens (n_a = n_b = n), their similarity to the instruction's tokens, or to a few pivot tokens.
    """
    for name, value in (("n_a", n_a), ("n_b", n_b), ("d", d)):
        _check_count(name, value)
    return n_a * n_b * d


def dpp_greedy_map_flops(n: int, k: int) -> int:
    """Multiply-adds of the greedy MAP inference of a DPP choosing k of n items from a given kernel, by incremental
    Cholesky updates (Chen et al. 2018): step i projects the chosen item's kernel row onto the i rows found so far,
    i*n, so n*k*(k-1)/2 in all (the kernel itself is counted apart, with :func:`similarity_flops`)."""
    for name, value in (("n", n), ("k", k)):
        _check_count(name, value)
    return n * k * (k - 1) // 2
