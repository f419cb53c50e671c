import pytest
import torch

from models.token_merger import TokenMerger, soft_assignment_merge, spread_prior


def merger(kind="simple", keep=6, n=16, dim=8):
    torch.manual_seed(0)
    m = TokenMerger(dim, 12, keep, keep / n, kind, hidden=16, num_heads=2)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return m


def test_output_shapes_order_and_determinism_in_eval():
    m = merger().eval()
    x = torch.randn(3, 16, 8)
    a, b = m(x, tau=1.0), m(x, tau=1.0)
    assert a.tokens.shape == (3, 6, 8) and a.positions.shape == (3, 6)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.tokens, b.tokens)
    assert (a.positions.diff(dim=1) > 0).all(), "centres keep their spatial order"
    scores = m.scorer(x)
    assert torch.equal(a.positions, scores.topk(6).indices.sort().values), "eval = plain top-K of the scores"


def test_training_samples_different_centres():
    m = merger().train()
    x = torch.randn(1, 16, 8).expand(64, -1, -1)
    positions = m(x, tau=1.0, generator=torch.Generator().manual_seed(0)).positions
    assert len({tuple(p.tolist()) for p in positions}) > 1


def test_merge_is_a_weighted_mean_and_identity_when_all_are_centres():
    x = torch.randn(2, 5, 4)
    everyone = torch.arange(5).expand(2, 5)
    torch.testing.assert_close(soft_assignment_merge(x, everyone, torch.ones(2, 5), tau=1.0), x)
    # one centre: the output is the plain mean of all tokens (each non-centre assigned to it with weight 1)
    centre = torch.tensor([[2], [0]])
    selection = torch.zeros(2, 5).scatter(1, centre, 1.0)
    torch.testing.assert_close(soft_assignment_merge(x, centre, selection, tau=0.5), x.mean(dim=1, keepdim=True))


def test_low_temperature_assigns_each_token_to_its_most_similar_centre():
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x = torch.stack([centres[0], centres[1], torch.tensor([2.0, 0.1]), torch.tensor([0.1, 3.0])])[None]  # (1, 4, 2)
    sel = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    out, slots, sizes = soft_assignment_merge(x, torch.tensor([[0, 1]]), sel, tau=0.01, return_slots=True)
    torch.testing.assert_close(out[0], torch.stack([(x[0, 0] + x[0, 2]) / 2, (x[0, 1] + x[0, 3]) / 2]))
    assert slots.tolist() == [[0, 1, 0, 1]]
    torch.testing.assert_close(sizes, torch.tensor([[2.0, 2.0]]))


@pytest.mark.parametrize("kind", ["simple", "question_aware"])
def test_gradients_reach_the_scorer_through_the_selection(kind):
    m = merger(kind).train()
    x, q = torch.randn(2, 16, 8), torch.randn(2, 5, 12)
    qmask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = m(x, tau=0.5, question=q, question_mask=qmask)
    (out.tokens.square().sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_starts_without_preference_and_sparsity_loss():
    m = TokenMerger(8, 12, 4, 0.25, hidden=16)
    out = m(torch.randn(2, 16, 8), tau=1.0)
    torch.testing.assert_close(out.keep_prob, torch.full((2, 16), 0.25))
    assert out.sparsity_loss.item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="keeps 20 tokens but the image has 16"):
        TokenMerger(8, 12, 20, 0.5, hidden=16)(torch.randn(1, 16, 8), tau=1.0)
    with pytest.raises(ValueError, match="merger_type"):
        TokenMerger(8, 12, 4, 0.25, "clever")


def test_bf16_features_with_float32_selection_merge_in_float32():
    # A bf16 backbone with float32 Gumbel maths (the GPU setting) once failed in the matmul.
    x = torch.randn(2, 5, 4)
    centre = torch.tensor([[2], [0]])
    selection = torch.zeros(2, 5).scatter(1, centre, 1.0)
    out = soft_assignment_merge(x.bfloat16(), centre, selection, tau=0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), x.bfloat16().float().mean(dim=1, keepdim=True), atol=1e-2, rtol=1e-2)


def test_similarity_threshold_merges_near_duplicates_and_drops_the_rest():
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    near, far = torch.tensor([1.0, 0.05]), torch.tensor([1.0, 1.0])  # cos 0.999 to centre 0; 0.71 to both
    x = torch.stack([centres[0], centres[1], near, far])[None]  # (1, 4, 2)
    sel = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    kept = soft_assignment_merge(x, torch.tensor([[0, 1]]), sel, tau=0.01, similarity_threshold=0.9)
    torch.testing.assert_close(kept[0], torch.stack([(centres[0] + near) / 2, centres[1]]))
    _, slots, sizes = soft_assignment_merge(x, torch.tensor([[0, 1]]), sel, tau=0.01, similarity_threshold=0.9,
                                            return_slots=True)
    assert slots.tolist() == [[0, 1, 0, -1]], "the far token is dropped"
    torch.testing.assert_close(sizes, torch.tensor([[2.0, 1.0]]), msg="a dropped token adds to no size")
    everything = soft_assignment_merge(x, torch.tensor([[0, 1]]), sel, tau=1.0, similarity_threshold=-1.0)
    assert not torch.allclose(everything[0, 1], centres[1]), "without a threshold the far token merges too"


def adaptive(keep=6, n=16, dim=8, ratio=None):
    torch.manual_seed(0)
    m = TokenMerger(dim, 12, keep, ratio or keep / n, hidden=16, budget="adaptive")
    torch.nn.init.normal_(m.scorer.net[-1].weight, std=2.0)  # scores that differ between tokens and images
    return m


def test_adaptive_budget_gives_each_image_round_sum_of_keep_probabilities():
    m = adaptive().eval()
    x = torch.randn(5, 16, 8)
    out = m(x, tau=0.5)
    p = torch.sigmoid(m.scorer(x))
    expected = p.sum(1).round().long().clamp(3, 12)  # [ceil(K / 2), 2K] for K = 6
    counts = out.valid.sum(1) if out.valid is not None else torch.full((5,), out.positions.shape[1])
    assert torch.equal(counts, expected) and len(set(expected.tolist())) > 1, "counts must differ between images"
    assert out.positions.shape[1] == int(expected.max())
    for b in range(5):  # the valid centres are the image's top-K_b scores, in spatial order
        k = int(expected[b])
        assert out.positions[b][out.valid[b]].tolist() == p[b].topk(k).indices.sort().values.tolist()
        assert (out.tokens[b][~out.valid[b]] == 0).all()


@pytest.mark.parametrize("weight", [0.0, 10.0])
def test_sparsity_weight_holds_the_mean_adaptive_budget(weight):
    """A pressure to keep more tokens (standing in for the task loss) against merge_sparsity_weight: without the
    sparsity loss the mean K runs to its upper bound, with it K stays at merge_ratio x N."""
    m = adaptive(keep=4, n=16).train()
    x = torch.randn(8, 16, 8)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(60):
        out = m(x, tau=1.0, generator=torch.Generator().manual_seed(0))
        loss = -0.05 * out.keep_prob.mean() + weight * out.sparsity_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    counts = m.eval()(x, tau=1.0)
    mean_k = counts.valid.sum(1).float().mean() if counts.valid is not None else float(counts.positions.shape[1])
    if weight == 0:
        assert mean_k > 6
    else:
        assert abs(float(mean_k) - 4) <= 1


def test_assignment_names_each_tokens_slot_and_an_adaptive_mergers_unused_slots_are_nobodys():
    m = adaptive().eval()
    x = torch.randn(5, 16, 8)
    out = m(x, tau=0.01)
    for b in range(5):
        valid = out.valid[b] if out.valid is not None else torch.ones(out.positions.shape[1], dtype=torch.bool)
        slots = out.assignment[b]
        centres = out.positions[b][valid]
        assert slots[centres].tolist() == torch.arange(len(valid))[valid].tolist(), "each centre is its own slot"
        assert set(slots.tolist()) <= set(torch.arange(len(valid))[valid].tolist()) | {-1}, "no unused slot"


def test_proportional_attention_sizes_count_what_each_merged_token_holds():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8)
    everything = TokenMerger(8, 12, 4, 0.25, hidden=16, similarity_threshold=-1.0, proportional_attention=True).eval()
    out = everything(x, tau=0.5)
    torch.testing.assert_close(out.sizes.sum(dim=1), torch.full((2,), 16.0), msg="every token merges somewhere")
    assert (out.sizes >= 1).all()
    near = TokenMerger(8, 12, 4, 0.25, hidden=16, similarity_threshold=0.5, proportional_attention=True).eval()
    out = near(x, tau=0.5)
    merged = (out.assignment >= 0).sum(dim=1).float()  # centres and the tokens merged into them
    torch.testing.assert_close(out.sizes.sum(dim=1), merged, msg="a dropped token adds to no size")
    assert TokenMerger(8, 12, 4, 0.25, hidden=16)(x, tau=0.5).sizes is None


@pytest.mark.parametrize("n", [1, 7, 144, 577])
def test_spread_prior_ranks_every_token_and_any_top_m_is_spread(n):
    prior = spread_prior(n)
    assert prior.shape == (n,) and len(set(prior.tolist())) == n and prior[0] == 1 and (prior > 0).all()
    order = prior.argsort(descending=True)
    for m in range(1, n + 1):
        picked = order[:m].sort().values.tolist()
        gaps = [b - a for a, b in zip([-1, *picked], [*picked, n])]
        assert max(gaps) <= 3 * n / m, (m, picked)


class FixedScores(torch.nn.Module):
    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def forward(self, features, question=None, question_mask=None):
        return self.scores.expand(features.shape[0], -1)


def test_spread_weight_spreads_near_tied_centres_and_keeps_clear_winners():
    n, keep = 144, 16
    objects = torch.tensor([30, 77, 100, 141])
    scores = -5 + 0.05 * torch.linspace(1, 0, n)  # background nearly tied, the first rows a little ahead (as trained)
    scores[objects] = 0.0
    x = torch.randn(1, n, 8)
    centres = {}
    for weight in (0.0, 1.0):
        m = TokenMerger(8, 12, keep, keep / n, hidden=16, spread_weight=weight).eval()
        m.scorer = FixedScores(scores)
        centres[weight] = m(x, tau=0.5).positions[0]
        assert set(objects.tolist()) <= set(centres[weight].tolist()), "tokens clearly ahead stay centres"
    background = [c for c in centres[1.0].tolist() if c not in objects.tolist()]
    assert max(centres[0.0].tolist()) == 141 and sorted(set(centres[0.0].tolist()) - set(objects.tolist())) == list(range(12))
    gaps = [b - a for a, b in zip([-1, *background], [*background, n])]
    assert max(gaps) <= 3 * n / len(background), background


def test_spread_weight_only_reorders_tokens_within_the_weight():
    torch.manual_seed(0)
    for weight in (0.3, 1.0, 3.0):
        m = merger(keep=6, n=40).eval()
        m.spread_weight = weight
        x = torch.randn(5, 40, 8)
        scores, chosen = m.scorer(x), m(x, tau=1.0).positions
        taken = torch.zeros_like(scores, dtype=torch.bool).scatter(1, chosen, True)
        worst_taken = scores.masked_fill(~taken, float("inf")).min(dim=1).values
        best_left = scores.masked_fill(taken, float("-inf")).max(dim=1).values
        assert (worst_taken >= best_left - weight).all()
        if weight == 3.0:
            assert not torch.equal(chosen, scores.topk(6).indices.sort().values), "the weight changes some choice"
