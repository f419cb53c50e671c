"""Gumbel noise, Gumbel-Top-k sampling and its continuous relaxations.

Pure tensor functions shared by the pruning modules: hard sampling of k tokens to keep
(`gumbel_top_k`, `top_k_mask`), a differentiable soft top-k (`relaxed_top_k`), the
straight-through estimator that joins the two, and the log of a relaxed Bernoulli gate
(`gumbel_log_sigmoid`), which the pruned forward's soft masks accumulate.
Every random function takes an optional `torch.Generator` so tests and runs can fix the noise.
"""

from __future__ import annotations

import torch


def _uniform_open(shape_like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U ~ Uniform(0, 1) shaped like `shape_like`, clamped away from 0 and 1 so log(U) and log(1 - U) stay finite."""
    finfo = torch.finfo(shape_like.dtype)
    u = torch.rand(shape_like.shape, generator=generator, device=shape_like.device, dtype=shape_like.dtype)
    return u.clamp(min=finfo.tiny, max=1.0 - finfo.eps)


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of scores per row), got {k}")


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be > 0 (it divides the logits), got {tau}; use a small positive value such as 0.1")


def sample_gumbel(shape_like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise G = -log(-log(U)), U ~ Uniform(0, 1), shaped like `shape_like`.

    Gumbel (1954); used for sampling by the Gumbel-max trick (Maddison et al. 2014, "A* Sampling").
    Drawn on `shape_like`'s device and in its dtype.
    """
    return -torch.log(-torch.log(_uniform_open(shape_like, generator)))  # same shape as shape_like


def gumbel_top_k(scores: torch.Tensor, k: int, noise: bool, generator: torch.Generator | None = None,
                 ranked: bool = False) -> torch.Tensor:
    """Indices (B, k) of the k largest of `scores + G`, G ~ Gumbel(0, 1) i.i.d., sorted ascending.

    Gumbel-Top-k trick (Vieira 2014; Kool, van Hoof & Welling 2019, "Stochastic Beams and Where
    to Find Them"): the top k of log-probabilities perturbed by Gumbel noise are k items drawn
    without replacement from softmax(scores). With `noise=False` this is the plain top-k.
    Indices are sorted ascending so kept tokens keep their original spatial order; with
    ``ranked=True`` they come in the draw's order instead (best first).
    """
    _check_k(k, scores.shape[-1])
    perturbed = scores + sample_gumbel(scores, generator) if noise else scores  # (B, N)
    indices = torch.topk(perturbed, k, dim=-1).indices  # (B, k), best first
    return indices if ranked else indices.sort(dim=-1).values  # (B, k)


def top_k_mask(indices: torch.Tensor, n: int, values: torch.Tensor | None = None) -> torch.Tensor:
    """Hard mask (B, n) in the default float dtype: m[b, j] = 1 (or ``values[b, i]``) if j = indices[b, i], else 0."""
    mask = torch.zeros(indices.shape[0], n, device=indices.device)  # (B, n)
    return mask.scatter(1, indices, 1.0 if values is None else values.to(mask.dtype))  # (B, n)


def relaxed_top_k(scores: torch.Tensor, k: int | torch.Tensor, tau: float) -> torch.Tensor:
    """Differentiable soft top-k mask (B, N) whose rows sum to k, at temperature tau > 0.

    Successive-softmax relaxation (Plötz & Roth 2018, "Neural Nearest Neighbors Networks";
    Xie & Ermon 2019, "Reparameterizable Subset Sampling via Continuous Relaxations"):
        khot = 0, w = scores
        for j = 1..k:  a = softmax(w / tau);  khot += a;  w += log(max(1 - a, eps))
    Each step is a relaxed arg-max; the log(1 - a) term pushes down what earlier steps chose.
    As tau -> 0 the result tends to the hard top-k mask of `scores`. Entries are >= 0, but an
    entry can exceed 1 when two leading scores are close relative to tau (e.g. scores
    log([0.6, 0.4]), k = 2, tau = 1 gives [1.1, 0.9]). Adds no noise: add Gumbel noise to
    `scores` first to relax Gumbel-Top-k sampling. ``k`` may be a (B,) tensor of per-row counts
    (an adaptive budget): row b then sums the first k[b] relaxed arg-maxes.
    """
    per_row = torch.as_tensor(k, device=scores.device).expand(scores.shape[:-1])  # (B,)
    _check_k(int(per_row.min()), scores.shape[-1])
    _check_k(int(per_row.max()), scores.shape[-1])
    _check_tau(tau)
    # tiny rather than eps: once an item is taken (a == 1) its logit must drop far below any other
    eps = torch.finfo(scores.dtype).tiny
    khot = torch.zeros_like(scores)  # (B, N)
    w = scores  # (B, N)
    for j in range(int(per_row.max())):
        onehot = torch.softmax(w / tau, dim=-1)  # (B, N)
        khot = khot + onehot * (j < per_row).unsqueeze(-1)  # (B, N)
        w = w + torch.log(torch.clamp(1.0 - onehot, min=eps))  # (B, N)
    return khot


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """hard + soft - stop_gradient(soft): forward value `hard`, gradient that of `soft`.

    Straight-through estimator (Bengio, Léonard & Courville 2013, "Estimating or Propagating
    Gradients Through Stochastic Neurons").
    """
    if hard.shape != soft.shape:
        raise ValueError(f"hard and soft must have the same shape, got {tuple(hard.shape)} and {tuple(soft.shape)}; "
                         "broadcasting here would silently change the forward value")
    # bracketed so the forward value is exactly `hard`: x - x is exactly 0, (hard + x) - x is not
    return hard + (soft - soft.detach())


def _logistic_perturbed(logits: torch.Tensor, noise: bool, generator: torch.Generator | None) -> torch.Tensor:
    """logits + L, L = log(U) - log(1 - U) ~ Logistic(0, 1) (the difference of two Gumbel(0, 1) draws); L = 0 without noise."""
    if not noise:
        return logits
    u = _uniform_open(logits, generator)  # same shape as logits
    return logits + torch.log(u) - torch.log1p(-u)


def gumbel_log_sigmoid(logits: torch.Tensor, tau: float, noise: bool,
                       generator: torch.Generator | None = None,
                       with_complement: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log q of a relaxed Bernoulli sample q = sigmoid((logits + L) / tau), in float32, L ~ Logistic(0, 1).

    Binary Concrete / Gumbel-Softmax with two classes (Maddison, Mnih & Teh 2017, "The Concrete
    Distribution"; Jang, Gu & Poole 2017): L = log(U) - log(1 - U) is the difference of two
    Gumbel(0, 1) draws, so P(logits + L > 0) = sigmoid(logits). With ``noise=False``, L = 0.
    Computed as logsigmoid(x) = -softplus(-x): exact far into the tail, where log(sigmoid(x))
    underflows to -inf and a clamp such as log(1e-6) would cap how much a dropped token is
    suppressed; its gradient, sigmoid(-x) / tau, stays bounded by 1 / tau.
    ``with_complement``: also log(1 - q) = logsigmoid(-x) of the same sample, as exact.
    """
    _check_tau(tau)
    x = _logistic_perturbed(logits.float(), noise, generator) / tau
    if with_complement:
        return torch.nn.functional.logsigmoid(x), torch.nn.functional.logsigmoid(-x)
    return torch.nn.functional.logsigmoid(x)
