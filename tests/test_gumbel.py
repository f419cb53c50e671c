import itertools
import math

import pytest
import torch

from models.gumbel import gumbel_log_sigmoid, gumbel_top_k, relaxed_top_k, straight_through, top_k_mask

SCORES = [2.0, 1.0, 0.5, 0.0, -1.0]
DRAWS = 20000


def exact_inclusion(scores: list[float], k: int) -> list[float]:
    """P(item i is among k sequential draws without replacement from softmax(scores)), by enumeration."""
    p = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0).tolist()
    inclusion = [0.0] * len(p)
    for tuple_ in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in tuple_:
            prob *= p[i] / left
            left -= p[i]
        for i in tuple_:
            inclusion[i] += prob
    return inclusion


def within_bound(freq: list[float], expected: list[float], n: int, sigmas: float = 5.0) -> bool:
    return all(abs(f - e) <= sigmas * math.sqrt(e * (1 - e) / n) for f, e in zip(freq, expected))


def inclusion_frequencies(k: int, noise: bool) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    scores = torch.tensor(SCORES).expand(DRAWS, -1)  # (DRAWS, N)
    indices = gumbel_top_k(scores, k, noise=noise, generator=generator)  # (DRAWS, k)
    return top_k_mask(indices, len(SCORES)).mean(dim=0).tolist()


def test_gumbel_top_k_samples_without_replacement_from_softmax():
    k = 2
    expected = exact_inclusion(SCORES, k)
    assert sum(expected) == pytest.approx(k)
    assert within_bound(inclusion_frequencies(k, noise=True), expected, DRAWS)
    # the check discriminates: deterministic top-k and the naive k * p_i both fail it
    assert not within_bound(inclusion_frequencies(k, noise=False), expected, DRAWS)
    naive = (k * torch.softmax(torch.tensor(SCORES), dim=0)).tolist()
    assert not within_bound(naive, expected, DRAWS)


def test_gumbel_top_k_without_noise_is_sorted_topk():
    scores = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))  # (4, 12)
    first = gumbel_top_k(scores, 5, noise=False, generator=torch.Generator().manual_seed(2))
    second = gumbel_top_k(scores, 5, noise=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    assert torch.equal(first, torch.topk(scores, 5).indices.sort(dim=-1).values)


def test_gumbel_top_k_with_noise_is_sorted_and_distinct():
    scores = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))  # (64, 12)
    indices = gumbel_top_k(scores, 5, noise=True, generator=torch.Generator().manual_seed(2))
    assert indices.shape == (64, 5)
    assert (indices.diff(dim=-1) > 0).all()
    assert not torch.equal(indices, gumbel_top_k(scores, 5, noise=False))


def test_seeded_noise_is_reproducible():
    scores = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))  # (8, 12)
    a = gumbel_top_k(scores, 3, noise=True, generator=torch.Generator().manual_seed(7))
    b = gumbel_top_k(scores, 3, noise=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("k", [0, 6, -1])
def test_k_out_of_range_raises(k):
    scores = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=rf"k must be in \[1, 5\].*got {k}"):
        gumbel_top_k(scores, k, noise=False)
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        relaxed_top_k(scores, k, tau=1.0)


def test_top_k_mask():
    mask = top_k_mask(torch.tensor([[0, 3], [1, 2]]), 4)
    assert torch.equal(mask, torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]]))


def test_relaxed_top_k_sums_to_k_and_hardens_as_tau_shrinks():
    scores = torch.tensor([[0.3, -1.2, 2.0, 0.9, -0.4, 1.5], [1.0, 0.0, -1.0, 2.0, -2.0, 0.5]])  # (2, 6)
    for tau in (2.0, 0.5, 0.01):
        soft = relaxed_top_k(scores, 3, tau)  # (2, 6)
        assert soft.sum(dim=-1) == pytest.approx([3.0, 3.0], abs=1e-4)
        assert (soft >= 0).all()
    hard = top_k_mask(gumbel_top_k(scores, 3, noise=False), 6)  # (2, 6)
    soft = relaxed_top_k(scores, 3, tau=0.01)
    assert ((soft >= 0) & (soft <= 1 + 1e-6)).all()
    assert torch.allclose(soft, hard, atol=1e-4)
    assert not torch.allclose(relaxed_top_k(scores, 3, tau=1.0), hard, atol=1e-2)


def test_relaxed_top_k_passes_gradients_to_scores():
    scores = torch.tensor([[0.3, -1.2, 2.0, 0.9, -0.4, 1.5]], requires_grad=True)  # (1, 6)
    # rows always sum to k, so weight the entries: a plain .sum() has zero gradient by construction
    weights = torch.arange(6.0)
    (relaxed_top_k(scores, 3, tau=0.5) * weights).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 1e-3


def test_relaxed_top_k_rejects_bad_tau():
    with pytest.raises(ValueError, match="tau must be > 0"):
        relaxed_top_k(torch.zeros(1, 4), 2, tau=0.0)


def test_straight_through_forward_is_hard_gradient_is_soft():
    logits = torch.tensor([[0.2, -0.5, 1.0]], requires_grad=True)  # (1, 3)
    soft = torch.softmax(logits, dim=-1)  # (1, 3)
    hard = torch.tensor([[0.0, 0.0, 1.0]])  # (1, 3)
    out = straight_through(hard, soft)
    assert torch.equal(out, hard)
    weights = torch.tensor([1.0, 2.0, 3.0])
    (out * weights).sum().backward()
    via_st = logits.grad.clone()
    logits.grad = None
    (torch.softmax(logits, dim=-1) * weights).sum().backward()
    assert torch.allclose(via_st, logits.grad)
    assert via_st.abs().sum() > 0


def test_straight_through_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        straight_through(torch.zeros(2, 3), torch.zeros(1, 3))


def test_gumbel_log_sigmoid_without_noise_is_the_log_of_a_tempered_sigmoid():
    logits = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0])
    torch.testing.assert_close(gumbel_log_sigmoid(logits, 0.5, noise=False).exp(), torch.sigmoid(logits / 0.5))


def test_gumbel_log_sigmoid_is_exact_far_into_the_tail():
    """A dropped token's bias must keep growing with its logit: no floor, no -inf, a bounded gradient."""
    logits = torch.tensor([-1e4, -100.0, 1e4], requires_grad=True)
    log_q = gumbel_log_sigmoid(logits, 0.1, noise=False)
    torch.testing.assert_close(log_q.detach(), torch.tensor([-1e5, -1000.0, 0.0]))
    log_q.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() <= 10.0


def test_gumbel_log_sigmoid_hard_decision_is_bernoulli_of_sigmoid():
    logits = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0])
    samples = gumbel_log_sigmoid(logits.expand(DRAWS, -1), 0.3, noise=True,
                                 generator=torch.Generator().manual_seed(0)).exp()  # (DRAWS, 5)
    freq = (samples > 0.5).float().mean(dim=0).tolist()
    expected = torch.sigmoid(logits).tolist()
    assert within_bound(freq, expected, DRAWS)
    assert not within_bound(freq, torch.sigmoid(logits / 0.3).tolist(), DRAWS)


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_gumbel_log_sigmoid_rejects_bad_tau(tau):
    with pytest.raises(ValueError, match=rf"tau must be > 0.*got {tau}"):
        gumbel_log_sigmoid(torch.zeros(3), tau, noise=True)


def test_relaxed_top_k_matches_hand_computation():
    # step 1: a = [0.6, 0.4]; step 2: softmax(log([0.6*0.4, 0.4*0.6])) = [0.5, 0.5]; an entry can pass 1
    soft = relaxed_top_k(torch.tensor([[0.6, 0.4]]).log(), 2, tau=1.0)  # (1, 2)
    assert torch.allclose(soft, torch.tensor([[1.1, 0.9]]))
