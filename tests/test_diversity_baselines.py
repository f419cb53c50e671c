"""CDPruner, DivPrune, VisPruner and DART (models/baselines): each against its definition on hand-made inputs, their
own FLOPs against torch's counter, through the pruned forward of the tiny LLaVA, and on every backbone family."""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models.baselines import build_baseline
from models.baselines.cdpruner import CDPruner, conditional_kernel, dpp_greedy_map, instruction_relevance
from models.baselines.dart import DART, duplication_order, leading_run
from models.baselines.divprune import DivPrune, max_min_greedy
from models.baselines.subset import linear_cost_per_token
from models.baselines.vispruner import VisPruner, remove_duplicates
from models.llava_backbone import VisionAttention
from tests.helpers import padded_prompts, sharp_llava_and_eager
from tests.test_backbone_families import FAMILIES, batch_of, image_tokens, inputs_of

NEW = ("cdpruner", "divpruner", "vispruner", "dart")


def identity(x):
    return x


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


# ---------------------------------------------------------------------------------------------------- CDPruner
def test_dpp_greedy_map_adds_the_token_of_largest_determinant_each_step():
    """The Cholesky updates against determinants computed from scratch: every step adds argmax_j det(L_{Y+j})."""
    tokens = unit(2, 9, 4, seed=1)
    relevance = torch.rand(2, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kernel = conditional_kernel(tokens, relevance)
    order = dpp_greedy_map(kernel, 6, torch.ones(2, 9, dtype=torch.bool))
    for b in range(2):
        chosen = []
        for _ in range(6):
            dets = {j: torch.linalg.det(kernel[b][chosen + [j]][:, chosen + [j]]) for j in range(9) if j not in chosen}
            chosen.append(max(dets, key=dets.get))
        assert order[b].tolist() == chosen


def test_dpp_map_of_a_small_kernel_is_the_exhaustive_best():
    """Three pairs of near-duplicate tokens: the MAP set of three (exhaustive search over every subset) takes one
    of each pair, the more relevant one, and the greedy finds that set."""
    directions = torch.eye(3, dtype=torch.float64)
    tokens = F.normalize(directions.repeat_interleave(2, dim=0) + 0.05 * unit(6, 3, seed=3), dim=-1)[None]
    relevance = torch.tensor([[0.9, 0.6, 0.5, 0.8, 1.0, 0.7]], dtype=torch.float64)
    kernel = conditional_kernel(tokens, relevance)[0]
    best = max(itertools.combinations(range(6), 3), key=lambda s: torch.linalg.det(kernel[list(s)][:, list(s)]))
    assert set(best) == {0, 3, 4}
    assert set(dpp_greedy_map(kernel[None], 3, torch.ones(1, 6, dtype=torch.bool))[0].tolist()) == set(best)


def test_dpp_greedy_map_picks_only_selectable_tokens_and_marks_the_rest():
    kernel = conditional_kernel(unit(2, 5, 8, seed=4), torch.ones(2, 5, dtype=torch.float64))
    selectable = torch.tensor([[True, False, True, True, False], [True] * 5])
    order = dpp_greedy_map(kernel, 4, selectable)
    assert sorted(order[0, :3].tolist()) == [0, 2, 3] and order[0, 3] == -1
    assert len(set(order[1].tolist())) == 4 and (order[1] >= 0).all()


def test_instruction_relevance_follows_the_instruction_and_ignores_its_padding():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]]])  # unit tokens
    question = torch.tensor([[[2.0, 0.0], [0.0, -5.0]]])  # the second word is padding
    valid = torch.ones(1, 4, dtype=torch.bool)
    relevance = instruction_relevance(tokens, question, torch.tensor([[True, False]]), valid)
    torch.testing.assert_close(relevance, torch.tensor([[1.0, 0.5, 0.0, 0.8]]))
    without = instruction_relevance(tokens, question, torch.zeros(1, 2, dtype=torch.bool), valid)
    assert without.tolist() == [[1.0] * 4], "no instruction: diversity alone chooses"


# ---------------------------------------------------------------------------------------------------- DivPrune
def angle(tokens, subset):
    """The smallest angle between two tokens of ``subset``: max-min diversity in a true metric."""
    cosines = (float(tokens[i] @ tokens[j]) for i, j in itertools.combinations(subset, 2))
    return min(math.acos(max(-1.0, min(1.0, c))) for c in cosines)


def test_max_min_greedy_follows_its_definition_and_is_within_half_of_the_exhaustive_best():
    """The picks: the token farthest from its nearest neighbour, then the farthest from the picked set (checked step
    by step). 1 - cos orders pairs as the angle does, a metric, so the greedy's smallest angle is at least half of the
    best subset's (the farthest-point guarantee), here against exhaustive search."""
    for seed in range(5):
        tokens = unit(10, 3, seed=seed)
        distance = 1 - tokens @ tokens.T
        order = max_min_greedy(distance[None], 4, torch.ones(1, 10, dtype=torch.bool))[0].tolist()
        nearest_other = (distance + torch.eye(10) * 9).min(dim=1).values
        expected = [int(nearest_other.argmax())]
        while len(expected) < 4:
            gaps = {j: min(float(distance[j, s]) for s in expected) for j in range(10) if j not in expected}
            expected.append(max(gaps, key=gaps.get))
        assert order == expected
        best = max(angle(tokens, s) for s in itertools.combinations(range(10), 4))
        assert angle(tokens, order) >= best / 2


def test_max_min_greedy_finds_one_token_per_cluster_and_never_repeats_a_duplicate():
    centres = torch.eye(4, dtype=torch.float64)
    tokens = F.normalize(centres.repeat(3, 1) + 0.05 * unit(12, 4, seed=6), dim=-1)  # 3 near-copies of each
    distance = 1 - tokens @ tokens.T
    order = max_min_greedy(distance[None], 4, torch.ones(1, 12, dtype=torch.bool))[0]
    assert sorted(int(j) % 4 for j in order) == [0, 1, 2, 3]
    same = torch.zeros(1, 5, 5, dtype=torch.float64)  # five exact duplicates
    assert sorted(max_min_greedy(same, 5, torch.ones(1, 5, dtype=torch.bool))[0].tolist()) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------- VisPruner
def test_vispruner_keeps_the_cls_attended_half_and_one_token_per_duplicate_group():
    """Tokens 0-11 form 4 groups of near-duplicates (token i in group i % 4); the CLS token attends most to group 0's
    three tokens. Budget 6: ceil(6 / 2) = 3 important tokens, group 0 (importance ignores duplication), then 3
    diverse ones: among the other groups, duplicates are dropped until one token of each is left."""
    features = (torch.eye(4, dtype=torch.float64).repeat(3, 1) + 0.05 * unit(12, 4, seed=7))[None].float()
    cls_attention = torch.full((1, 12), 0.01)
    cls_attention[0, [0, 4, 8]] = torch.tensor([0.5, 0.3, 0.2])
    out = VisPruner(6, 4)(features, vision_attention=VisionAttention(features, cls_attention, features))
    kept = out.positions[0].tolist()
    assert len(kept) == 6 and {0, 4, 8} <= set(kept)
    assert sorted(p % 4 for p in kept if p not in (0, 4, 8)) == [1, 2, 3]


def test_remove_duplicates_drops_the_closest_pair_member_first():
    tokens = F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [-1.0, 0.1]]), dim=-1)
    similarity = (tokens @ tokens.T)[None]
    left = remove_duplicates(similarity, torch.ones(1, 4, dtype=torch.bool), torch.tensor([3]))
    assert left[0, 2] and left[0, 3] and int(left[0, :2].sum()) == 1  # one of the near pair went
    two = remove_duplicates(similarity, torch.tensor([[True, True, True, False]]), torch.tensor([1]))
    assert int(two.sum()) == 1 and not two[0, 3]


def test_vispruner_refuses_a_tower_without_cls_token_by_name():
    features = torch.randn(1, 16, 4)
    with pytest.raises(ValueError, match="vispruner.*no CLS token"):
        VisPruner(4, 4)(features, vision_attention=VisionAttention(features, None, features))


# ---------------------------------------------------------------------------------------------------- DART
def test_dart_keeps_the_pivots_and_drops_their_duplicates():
    """Vision pivots at slots 0 and 1, one text pivot; slots 2-3 duplicate pivot 0, slot 4 pivot 1, slots 5-7 are
    like neither. Budget 5: the two pivots, then one token per pivot (the shares of 3), each the least similar to it
    among those left: 6 for pivot 0 (cosine -0.61), 7 for pivot 1 (-0.81), 5 for the text pivot (0.31)."""
    vision = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.98, 0.15, 0.1], [0.97, 0.05, 0.2], [0.15, 0.98, 0.05],
                           [0.0, 0.3, 1.0], [-0.6, -0.6, 0.5], [0.5, -0.8, -0.3]])
    pivots = torch.cat([vision[:2], torch.tensor([[0.6, 0.6, 0.1]])])
    similarity = (F.normalize(pivots, dim=-1) @ F.normalize(vision, dim=-1).T)[None]  # (1, 3, 8)
    place = duplication_order(similarity, torch.ones(1, 8, dtype=torch.bool), torch.tensor([[0, 1]]),
                              torch.ones(1, 3, dtype=torch.bool), torch.tensor([5]))
    assert place[0].tolist() == [0, 1, 8, 8, 8, 4, 2, 3]
    two = duplication_order(similarity, torch.ones(1, 8, dtype=torch.bool), torch.tensor([[0, 1]]),
                            torch.ones(1, 3, dtype=torch.bool), torch.tensor([1]))
    assert two[0].tolist() == [0] + [8] * 7, "a budget below the pivots keeps the first pivots only"


def test_dart_leading_run_marks_a_shorter_samples_padding_slots():
    index = torch.tensor([[5, 6, 8, 9], [7, 8, 0, 1], [4, 9, 2, 10]])
    assert leading_run(index).tolist() == [[True] * 4, [True, True, False, False], [True, True, False, False]]


# ---------------------------------------------------------------------------------------------------- padded batches
def selector(name, k, reference=None):
    return {"cdpruner": lambda: CDPruner(k, identity, 0, 6, reference_tokens=reference),
            "divpruner": lambda: DivPrune(k, identity, 0, 6, reference_tokens=reference),
            "vispruner": lambda: VisPruner(k, 6, reference_tokens=reference)}[name]()


@pytest.mark.parametrize("name", ["cdpruner", "divpruner", "vispruner"])
def test_selectors_on_padded_images_equal_each_image_alone(name):
    torch.manual_seed(0)
    counts = [64, 40, 23]
    valid = torch.arange(64) < torch.tensor(counts)[:, None]
    features = torch.randn(3, 64, 6) * valid[..., None]
    cls_attention = torch.rand(3, 64)
    question, question_mask = torch.randn(3, 5, 6), torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 5])
    out = selector(name, 16, 64)(features, question=question, question_mask=question_mask, valid=valid,
                                 vision_attention=VisionAttention(features, cls_attention, features, valid))
    used = out.valid if out.valid is not None else torch.ones(out.positions.shape, dtype=torch.bool)
    assert used.sum(dim=1).tolist() == [16, 10, 6]
    for b, n in enumerate(counts):
        one = features[b:b + 1, :n]
        alone = selector(name, round(n * 16 / 64))(
            one, question=question[b:b + 1], question_mask=question_mask[b:b + 1],
            vision_attention=VisionAttention(one, cls_attention[b:b + 1, :n], one))
        assert out.positions[b][used[b]].tolist() == alone.positions[0].tolist()
        torch.testing.assert_close(out.tokens[b][used[b]], alone.tokens[0])


# ---------------------------------------------------------------------------------------------------- the tiny LLaVA
@pytest.fixture(scope="module")
def models():
    """The tiny backbone (SDPA) and an eager copy of the same weights, for the hidden states entering each layer."""
    return sharp_llava_and_eager(text_layers=4, seed=5)


@pytest.fixture(scope="module")
def batch(models):
    return padded_prompts(models[0].processor)


def multiply_adds(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def test_own_flops_match_the_flop_counter(models):
    """Each method's ``flops`` against torch's FlopCounterMode on one image (the projection through the tiny
    backbone's real projector): what the benchmark adds to the LLM prefill for its choice."""
    bb, _ = models
    n, d, dv, k, n_text = bb.num_vision_tokens, bb.hidden_size, bb.vision_hidden_size, 20, 7
    features, question = torch.randn(1, n, dv), torch.randn(1, n_text, d)
    every_word = torch.ones(1, n_text, dtype=torch.bool)
    cost = linear_cost_per_token(bb.projector)
    for module in (CDPruner(k, bb.project, cost, d), DivPrune(k, bb.project, cost, d), VisPruner(k, dv)):
        counted = multiply_adds(lambda: module(features, question=question, question_mask=every_word,
                                               vision_attention=VisionAttention(features, torch.rand(1, n), features)))
        assert counted == module.flops(n, k, n_text), type(module).__name__
    T = n + 12  # 4 tokens before the image, 8 after
    probe = SimpleNamespace(layer_inputs={2: torch.randn(1, T, d)})
    dart = DART(k, n, d)
    counted = multiply_adds(lambda: dart(probe, 2, torch.ones(1, T, dtype=torch.long), torch.arange(4, 4 + n)[None]))
    assert counted == dart.flops(n, 8)


def dart_reference(hidden, image_slots, text_slots, keep):
    """DART's rule written plainly: pivots by L1 norm (4 of the image, 4 of the text after it), the image pivots kept,
    then each pivot in turn keeps its share of the rest, the least similar to it among those left."""
    norm = lambda s: float(hidden[s].abs().sum())
    image_pivots = sorted(image_slots, key=norm, reverse=True)[:4]
    pivots = image_pivots + sorted(text_slots, key=norm, reverse=True)[:4]
    kept = image_pivots[:keep]
    rest = keep - len(kept)
    left = [s for s in image_slots if s not in image_pivots]
    for i, p in enumerate(pivots):
        for _ in range(rest // len(pivots) + (i < rest % len(pivots))):
            j = min(left, key=lambda s: float(F.cosine_similarity(hidden[p], hidden[s], dim=0)))
            kept.append(j)
            left.remove(j)
    return set(kept)


def test_dart_keeps_what_its_rule_keeps_on_the_hidden_states_entering_layer_k(models, batch):
    backbone, eager = models
    K, keep = 2, 30
    with torch.no_grad():
        hidden = eager(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], use_cache=False,
                       attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states[K]  # entering K
    model = build_baseline("dart", backbone, keep, [], fastv_layer=K)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], mode="hard")
    assert out.vision_tokens_per_layer == [144] * K + [keep] * (backbone.num_layers - K)
    image = batch["input_ids"] == backbone.image_token_id
    for b in range(batch["input_ids"].shape[0]):
        slots = image[b].nonzero().squeeze(-1).tolist()
        text = [t for t in range(slots[-1] + 1, image.shape[1]) if batch["attention_mask"][b, t]]
        assert set(out.kept_positions[-1][b].tolist()) == dart_reference(hidden[b], slots, text, keep)


def test_dart_layer_out_of_range_names_the_fix(models):
    with pytest.raises(ValueError, match="DART's layer K=4.*outside 1..3"):
        build_baseline("dart", models[0], 36, [], fastv_layer=4)


# ---------------------------------------------------------------------------------------------------- every family
@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    adapter, build, _ = FAMILIES[request.param]
    return request.param, adapter(*build(3, 1))


@pytest.mark.parametrize("method", NEW)
def test_each_keeps_the_same_share_of_every_image(family, method):
    name, backbone = family
    prompts = batch_of(backbone, with_answers=False)
    keep = backbone.num_vision_tokens // 4
    model = build_baseline(method, backbone, keep, [1, 2], fastv_layer=1)
    run = lambda: model(*inputs_of(prompts), mode="hard", image_inputs=backbone.image_inputs(prompts))
    if method == "vispruner" and name.startswith("qwen"):
        with pytest.raises(ValueError, match="vispruner.*no CLS token"):
            run()
        return
    with torch.no_grad():
        out = run()
    share = [round(t * keep / backbone.num_vision_tokens) for t in image_tokens(backbone, prompts)]
    assert out.vision_counts[-1].tolist() == share and len(set(share)) > 1
    assert torch.isfinite(out.logits).all()


def test_dart_in_a_batch_keeps_what_it_keeps_for_each_sample_alone(family):
    """The padding slots of a shorter sample are no candidates and no pivots: each sample keeps the tokens it keeps
    alone (the same prompt columns, shifted by its left padding)."""
    _, backbone = family
    model = build_baseline("dart", backbone, backbone.num_vision_tokens // 4, [], fastv_layer=1)
    prompts = batch_of(backbone, with_answers=False)
    with torch.no_grad():
        together = model(*inputs_of(prompts), mode="hard", image_inputs=backbone.image_inputs(prompts))
        for b in range(prompts["input_ids"].shape[0]):
            one = batch_of(backbone, with_answers=False, only=b)
            alone = model(*inputs_of(one), mode="hard", image_inputs=backbone.image_inputs(one))
            shift = prompts["input_ids"].shape[1] - one["input_ids"].shape[1]
            mine = together.kept_positions[-1][b]
            assert sorted((mine[mine >= 0] - shift).tolist()) == sorted(alone.kept_positions[-1][0].tolist())
