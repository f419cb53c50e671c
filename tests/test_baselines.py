import itertools

import pytest
import torch

from models.baselines import BASELINES, build_baseline, kept_tokens
from models.baselines.fastv import received_attention
from models.baselines.pyramid_drop import pyramid_budgets
from models.baselines.random_pruning import RandomPruning
from models.baselines.spatial_pooling import SpatialPooling, pooling_grid
from models.baselines.tome import ToMe, bipartite_soft_matching, merge_steps
from models.baselines.visionzip import VisionZip
from models.llava_backbone import VisionAttention
from tests.helpers import padded_prompts, sharp_llava_and_eager
from trainers.inference.evaluation import module_flops

N = 144  # 96 px images, 8 px patches


@pytest.fixture(scope="module")
def models():
    """The tiny backbone (SDPA) and an eager copy of the same weights, for reference attention maps."""
    return sharp_llava_and_eager(text_layers=4, seed=5)


@pytest.fixture(scope="module")
def batch(models):
    return padded_prompts(models[0].processor)


@pytest.fixture(scope="module")
def eager_out(models, batch):
    with torch.no_grad():
        return models[1](input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                         attention_mask=batch["attention_mask"], output_attentions=True, output_hidden_states=True,
                         use_cache=False)


def positions_entering(backbone, model, batch, layer):
    """Original positions of the tokens that enter decoder ``layer`` in a hard-mode forward."""
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("pos", kwargs["position_ids"].clone())

    hook = backbone.layers[layer].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], mode="hard")
    finally:
        hook.remove()
    return seen["pos"]


def kept_vision_positions(backbone, model, batch, layer):
    image_slots = (batch["input_ids"] == backbone.image_token_id)
    pos = positions_entering(backbone, model, batch, layer)
    return [set(p[image_slots[b, p]].tolist()) for b, p in enumerate(pos)]


def test_attention_probs_equal_eager_attention(models, batch, eager_out):
    backbone, _ = models
    mask = batch["attention_mask"]
    B, T = mask.shape
    hidden = eager_out.hidden_states[1]  # entering decoder layer 1
    positions = torch.arange(T).expand(B, T)
    probs = backbone.attention_probs(1, hidden, mask, backbone.rotary(hidden, positions), positions)  # (B, H, T, T)
    real = mask.bool()
    for b in range(B):
        torch.testing.assert_close(probs[b][:, real[b]], eager_out.attentions[1][b][:, real[b]], rtol=1e-5, atol=1e-6)


def test_fastv_removes_exactly_the_least_attended_vision_tokens(models, batch, eager_out):
    backbone, _ = models
    K, keep = 2, 50
    model = build_baseline("fastv", backbone, keep, [], fastv_layer=K)
    image_slots = batch["input_ids"] == backbone.image_token_id
    expected = []
    for b in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][b].bool()
        attention = eager_out.attentions[K - 1][b].mean(dim=0)  # (T, T), heads averaged
        received = attention[real].mean(dim=0)  # (T,) averaged over the real query rows
        slots = image_slots[b].nonzero().squeeze(-1)
        order = received[slots].argsort()
        expected.append(set(slots[order[N - keep:]].tolist()))  # the N - keep least attended are dropped
    assert kept_vision_positions(backbone, model, batch, K) == expected
    assert kept_vision_positions(backbone, model, batch, K - 1) == [set(s.nonzero().squeeze(-1).tolist())
                                                                   for s in image_slots]  # all before K


def test_received_attention_ignores_padded_queries():
    probs = torch.zeros(1, 2, 3, 3)
    probs[0, :, 0, 2] = 1.0  # a padded query attends to key 2 only
    probs[0, :, 1:, 0] = 1.0  # the real queries attend to key 0
    received = received_attention(probs, torch.tensor([[False, True, True]]))
    assert received.tolist() == [[1.0, 0.0, 0.0]]


def test_pyramiddrop_stage_counts_and_last_token_ranking(models, batch, eager_out):
    backbone, _ = models
    assert pyramid_budgets(N, 36, 3) == [91, 57, 36]
    assert pyramid_budgets(N, 16, 3) == [69, 33, 16]
    model = build_baseline("pyramiddrop", backbone, 36, [1, 2, 3])
    with torch.no_grad():
        out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], mode="hard")
    assert out.vision_tokens_per_layer == [144, 91, 57, 36]
    # stage 1 ranks by layer 1's attention from the last instruction token (the prompt's last token: left padding)
    image_slots = batch["input_ids"] == backbone.image_token_id
    expected = []
    for b in range(batch["input_ids"].shape[0]):
        row = eager_out.attentions[1][b, :, -1].mean(dim=0)  # (T,)
        slots = image_slots[b].nonzero().squeeze(-1)
        expected.append(set(slots[row[slots].argsort(descending=True)[:91]].tolist()))
    assert kept_vision_positions(backbone, model, batch, 1) == expected


def test_attention_rankers_refuse_soft_mode(models, batch):
    model = build_baseline("fastv", models[0], 36, [])
    with pytest.raises(ValueError, match="hard"):
        model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], mode="soft")


def test_pooling_counts_windows_and_positions():
    assert pooling_grid(N, 72) == (8, 9) and pooling_grid(N, 36) == (6, 6) and pooling_grid(N, 16) == (4, 4)
    with pytest.raises(ValueError, match="70 or 72"):
        pooling_grid(N, 71)
    features = torch.randn(2, N, 5)
    out = SpatialPooling(N, 36)(features)
    assert out.tokens.shape == (2, 36, 5) and out.positions.shape == (2, 36)
    grid = features.view(2, 12, 12, 5)
    torch.testing.assert_close(out.tokens[:, 0], grid[:, :2, :2].mean(dim=(1, 2)))  # window rows 0-1, cols 0-1
    torch.testing.assert_close(out.tokens[:, 7], grid[:, 2:4, 2:4].mean(dim=(1, 2)))
    assert out.positions[0, :2].tolist() == [0, 2] and out.positions[0, 6].item() == 24  # window centres
    assert out.keep_prob.sum(dim=1).tolist() == [36.0, 36.0]
    assert SpatialPooling(N, 16)(features).tokens.shape == (2, 16, 5)


def test_tome_counts_and_order():
    assert merge_steps(N, 100) == [14, 13, 11, 6]
    steps = merge_steps(N, 16)
    left = [N, *(N - merged for merged in itertools.accumulate(steps))]
    assert left[-1] == 16 and all(r <= 0.1 * n for r, n in zip(steps, left))  # at most 10% per step
    features, keys = torch.randn(2, N, 6), torch.randn(2, N, 4)
    attention = VisionAttention(features, torch.rand(2, N), keys)
    for k in (100, 72, 36, 16, 1):
        out = ToMe(k, 4, proportional_attention=True)(features, vision_attention=attention)
        assert out.tokens.shape == (2, k, 6)
        assert (out.positions.diff(dim=1) > 0).all()  # distinct, in spatial order
        assert out.sizes.sum(dim=1).tolist() == [N, N], "the sizes count every token once (proportional attention)"
        torch.testing.assert_close((out.tokens * out.sizes[..., None]).sum(dim=1), features.sum(dim=1))
    assert ToMe(16, 4)(features, vision_attention=attention).sizes is None


def test_tome_merges_the_most_similar_pairs_and_keeps_mass():
    tokens = torch.randn(2, 8, 3)
    metric = torch.randn(2, 8, 4)
    metric[:, 2] = metric[:, 3]  # A token 2 duplicates B token 3
    metric[:, 4] = metric[:, 5]  # A token 4 duplicates B token 5
    size = torch.ones(2, 8, 1)
    merged, new_size, positions, _, alive = bipartite_soft_matching(tokens, size, torch.arange(8).expand(2, 8),
                                                                    metric, 2)
    assert positions[0][alive[0]].tolist() == [0, 1, 3, 5, 6, 7]  # A tokens 2 and 4 merged away
    assert (new_size * alive[..., None]).sum(dim=1).squeeze(-1).tolist() == [8.0, 8.0]
    torch.testing.assert_close((merged * new_size * alive[..., None]).sum(dim=1), tokens.sum(dim=1))
    torch.testing.assert_close(merged[0, 3], (tokens[0, 2] + tokens[0, 3]) / 2)


def test_tome_on_padded_images_equals_each_image_alone():
    """Images of different sizes in one batch (padding at the end): each keeps the same share of its own tokens,
    and its merged tokens equal a run on that image alone."""
    torch.manual_seed(0)
    counts = [144, 100, 57]
    features, keys = torch.randn(3, 144, 6), torch.randn(3, 144, 4)
    valid = torch.arange(144) < torch.tensor(counts)[:, None]
    features, keys = features * valid[..., None], keys * valid[..., None]
    tome = ToMe(36, 4, reference_tokens=144, proportional_attention=True)
    out = tome(features, vision_attention=VisionAttention(features, torch.rand(3, 144), keys, valid), valid=valid)
    used = out.valid if out.valid is not None else torch.ones(out.positions.shape, dtype=torch.bool)
    assert used.sum(dim=1).tolist() == [36, round(100 * 36 / 144), round(57 * 36 / 144)]
    for b, n in enumerate(counts):
        one = VisionAttention(features[b:b + 1, :n], None, keys[b:b + 1, :n])
        alone = ToMe(round(n * 36 / 144), 4, proportional_attention=True)(features[b:b + 1, :n], vision_attention=one)
        mine = out.positions[b][used[b]]
        order = mine.argsort()
        assert mine[order].tolist() == alone.positions[0].tolist()
        torch.testing.assert_close(out.tokens[b][used[b]][order], alone.tokens[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.sizes[b][used[b]][order], alone.sizes[0])
        assert out.sizes[b].sum().item() == n, "padding stands for nothing"


def test_visionzip_keeps_the_cls_attended_tokens_and_merges_the_rest():
    features, keys = torch.randn(2, N, 6), torch.randn(2, N, 4)
    cls_attention = torch.rand(2, N)
    zip_ = VisionZip(36, 4)
    assert (zip_.num_dominant, zip_.num_contextual) == (30, 6)
    out = zip_(features, vision_attention=VisionAttention(features, cls_attention, keys))
    assert out.tokens.shape == (2, 36, 6)
    for b in range(2):
        dominant = set(cls_attention[b].topk(30).indices.tolist())
        assert dominant <= set(out.positions[b].tolist())
        for j, p in enumerate(out.positions[b].tolist()):
            if p in dominant:
                torch.testing.assert_close(out.tokens[b, j], features[b, p])  # kept as is
    assert (out.positions.diff(dim=1) > 0).all()


def test_cls_attention_equals_the_eager_vision_tower(models, batch):
    backbone, eager = models
    with torch.no_grad():
        attention = backbone.vision_features_with_attention(batch["pixel_values"])
        reference = eager.model.vision_tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    layer = backbone.config.vision_feature_layer  # -2: the attention of the layer that produces the features
    torch.testing.assert_close(attention.cls_attention, reference.attentions[layer][:, :, 0, 1:].mean(dim=1))
    torch.testing.assert_close(attention.features, backbone.vision_features(batch["pixel_values"]))


def test_random_pruning_is_repeatable_and_differs_per_image():
    features = torch.randn(2, N, 5)
    first, again = RandomPruning(36, seed=1)(features), RandomPruning(36, seed=1)(features)
    assert first.tokens.shape == (2, 36, 5)
    assert torch.equal(first.positions, again.positions)
    assert not torch.equal(first.positions[0], first.positions[1])
    assert (first.positions.diff(dim=1) > 0).all()


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_generates_batched_at_its_budget(models, batch, name):
    backbone, _ = models
    tok = backbone.processor.tokenizer
    model = build_baseline(name, backbone, 16, [1, 2, 3], fastv_layer=1)
    answers, prefill = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], 3,
                                      tok.eos_token_id, tok.pad_token_id)
    assert answers.shape[0] == 3 and 1 <= answers.shape[1] <= 3
    assert prefill.vision_tokens_per_layer[-1] == 16
    assert module_flops(model, 10) >= 0


def test_budget_errors_name_the_fix(models):
    assert kept_tokens(N, 0.11) == 16 and kept_tokens(N, 0.5) == 72
    with pytest.raises(ValueError, match="smallest budget"):
        kept_tokens(N, 0.001)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        kept_tokens(N, 1.5)
    with pytest.raises(ValueError, match="outside 1..3"):
        build_baseline("fastv", models[0], 36, [], fastv_layer=4)
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baseline("sparsevlm", models[0], 36, [])
