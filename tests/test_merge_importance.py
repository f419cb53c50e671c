"""The merger's importance target: the teacher's attention from the answer-predicting token."""


import pytest
import torch

from data.collator import VQACollator
from data.relevance import Relevance
from data.synthetic_vqa import SyntheticVQADataset
from models.pruned_llava import PrunedLlava
from models.sequences import IGNORE_INDEX
from tests.helpers import sharp_llava_and_eager
from trainers.training.losses import (RELEVANCE_MARGIN, irrelevant_tokens, merge_importance_loss, pruner_importance_loss,
                             pruner_relevance_loss, relevance_loss)


@pytest.fixture(scope="module")
def models():
    return sharp_llava_and_eager(text_layers=3, seed=7)  # sharpened, so that a wrong query row or layer would show


@pytest.mark.parametrize("with_answers", [False, True])
def test_recorded_attention_is_the_answer_predicting_tokens_attention_averaged_over_heads_and_layers(models, with_answers):
    backbone, eager = models
    data = SyntheticVQADataset(3, "train", seed=2)
    batch = VQACollator(backbone.processor, with_answers=with_answers)([data[i] for i in range(3)])
    ids, pixels, mask = batch["input_ids"], batch["pixel_values"], batch["attention_mask"]
    labels = batch.get("labels")
    with torch.no_grad():
        out = PrunedLlava(backbone)(ids, pixels, mask, labels=labels, record_attention=True)
        ref = eager(input_ids=ids, pixel_values=pixels, attention_mask=mask, output_attentions=True, use_cache=False)
    is_image = ids == backbone.image_token_id
    for b in range(ids.shape[0]):
        # the prompt's last token predicts the answer: with answers, the token before the first label
        query = int((labels[b] != IGNORE_INDEX).nonzero()[0]) - 1 if with_answers else ids.shape[1] - 1
        row = torch.stack([a[b, :, query] for a in ref.attentions]).mean(dim=(0, 1))[is_image[b]]  # (N,)
        torch.testing.assert_close(out.vision_attention[b], row / row.sum(), rtol=1e-4, atol=1e-6)


def test_importance_loss_is_smallest_when_the_scores_match_the_attention():
    torch.manual_seed(0)
    attention = torch.softmax(torch.randn(2, 10) * 2, dim=-1)
    scores = attention.log().requires_grad_()
    loss = merge_importance_loss(scores, attention)
    loss.backward()
    torch.testing.assert_close(scores.grad, torch.zeros_like(scores), atol=1e-6, rtol=0)
    entropy = -(attention * attention.log()).sum(-1).mean()
    torch.testing.assert_close(loss.detach(), entropy)
    assert merge_importance_loss(attention.log().flip(-1), attention) > loss + 0.1


def test_pruner_importance_target_is_the_teachers_attention_at_each_stages_tokens():
    image_positions = torch.tensor([[3, 4, 5, 6, 7], [1, 2, 3, 4, 5]])  # (B, N): left padding shifts the image
    attention = torch.tensor([[0.1, 0.4, 0.2, 0.2, 0.1], [0.5, 0.1, 0.1, 0.1, 0.2]])
    logits = [torch.randn(2, 3), torch.randn(2, 2)]
    positions = [torch.tensor([[3, 5, 6], [2, 3, 5]]), torch.tensor([[5, 6], [1, 5]])]
    expected = []
    for lg, patches in zip(logits, [torch.tensor([[0, 2, 3], [1, 2, 4]]), torch.tensor([[2, 3], [0, 4]])]):
        target = attention.gather(1, patches)
        expected.append(merge_importance_loss(lg, target / target.sum(1, keepdim=True)))
    torch.testing.assert_close(pruner_importance_loss(logits, positions, attention, image_positions),
                               torch.stack(expected).mean())


def test_soft_forward_records_each_stages_logits_at_the_merged_tokens_positions(models):
    from models.layer_pruner import build_pruner
    from models.token_merger import TokenMerger
    from torch import nn

    backbone, _ = models
    data = SyntheticVQADataset(2, "train", seed=2)
    batch = VQACollator(backbone.processor)([data[i] for i in range(2)])
    merger = TokenMerger(backbone.vision_hidden_size, backbone.hidden_size, 40, 40 / 144, "simple", hidden=16)
    pruners = nn.ModuleList(build_pruner("cross_attention", backbone.hidden_size, 16, 2) for _ in range(2))
    model = PrunedLlava(backbone, merger, pruners, [1, 2], [30, 20]).eval()
    with torch.no_grad():
        out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], labels=batch["labels"])
    image_positions = (batch["input_ids"] == backbone.image_token_id).nonzero()[:, 1].view(2, -1)
    assert [lg.shape[1] for lg in out.stage_logits] == [40, 40]  # soft mode keeps every token, masked
    with pytest.raises(ValueError, match="without merger and pruners"):
        model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], record_attention=True)
    for positions in out.stage_positions:
        assert torch.equal(positions, image_positions.gather(1, out.merge.positions))


def test_relevance_boxes_label_the_tokens_no_relevant_box_covers_or_the_distractors():
    """irrelevant_tokens over a backbone's map from boxes to tokens (here: a 1 x 4 strip, a box covers the tokens its
    x range overlaps): without distractors every uncovered token is irrelevant; with them, only the distractors'."""
    def box_tokens(boxes, size):
        strip = torch.arange(4)
        return torch.tensor([any(b[0] < (t + 1) / 4 and b[2] > t / 4 for b in boxes) for t in strip.tolist()]
                            + [False] * (size[0] - 4), dtype=torch.bool)

    relevance = [Relevance(((0.0, 0, 0.25, 1),)),  # the first token; all the others irrelevant
                 Relevance(((0.0, 0, 0.25, 1),), ((0.5, 0, 1.0, 1),)),  # distractors: the last two
                 None,  # no boxes: no label
                 Relevance((), ((0.25, 0, 0.5, 1),)),  # nothing relevant, one distractor (a count of zero)
                 Relevance(((0.0, 0, 1.0, 0.5),)),  # everything relevant: labelled, nothing to push down
                 Relevance(((2.0, 0, 3.0, 1),))]  # a box no token sees (cut away by a crop): no label
    valid = torch.ones(6, 5, dtype=torch.bool)
    valid[:, 4] = False  # images of 4 tokens in a batch of 5
    irrelevant, relevant, labelled = irrelevant_tokens(box_tokens, relevance, [(4, 4)] * 6, valid)
    assert irrelevant.int().tolist() == [[0, 1, 1, 1, 0], [0, 0, 1, 1, 0], [0] * 5, [0, 1, 0, 0, 0], [0] * 5, [0] * 5]
    assert relevant.int().tolist() == [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0] * 5, [0] * 5, [1, 1, 1, 1, 0], [0] * 5]
    assert labelled.tolist() == [True, True, False, True, True, False]
    with pytest.raises(ValueError, match="map onto 5 vision tokens, but its image .* has 4"):
        irrelevant_tokens(box_tokens, relevance[:1], [(5, 5)], valid[:1])


def test_a_stage_whose_every_target_is_zero_adds_no_loss_and_no_nan():
    logits = torch.randn(2, 5, requires_grad=True)
    positions = torch.arange(5).repeat(2, 1)
    target = torch.rand(2, 5)
    target[1] = 0  # every token of sample 1 labelled irrelevant
    loss = pruner_importance_loss([logits], [positions], target, positions)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and not logits.grad[1].any()


def test_the_relevance_loss_pushes_down_exactly_the_irrelevant_tokens_of_each_stage():
    # 6 image placeholders at sequence positions 3..8; stage 0 scores 4 tokens, the last slot padding (-1)
    image_positions = torch.arange(3, 9).repeat(2, 1)
    positions = [torch.tensor([[3, 5, 6, -1], [4, 5, 7, 8]]), torch.tensor([[5, 6], [4, 8]])]
    irrelevant = torch.zeros(2, 6, dtype=torch.bool)
    irrelevant[0, 2] = irrelevant[1, 5] = irrelevant[1, 0] = True  # placeholders 5 (sample 0), 8 and 3 (sample 1)
    logits = [torch.randn(2, 4, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
    loss = pruner_relevance_loss(logits, positions, irrelevant, image_positions)
    loss.backward()
    assert logits[0].grad[0].gt(0).tolist() == [False, True, False, False]
    assert logits[0].grad[1].gt(0).tolist() == [False, False, False, True]
    assert logits[1].grad.gt(0).tolist() == [[True, False], [False, True]]
    assert not logits[0].grad.lt(0).any() and not logits[1].grad.lt(0).any()  # nothing else is pushed either way
    # sigmoid(z - median of the stage's other real tokens + margin), averaged per stage, then over the stages
    z0, z1 = logits[0].detach(), logits[1].detach()
    stage0 = (torch.sigmoid(z0[0, 1] - z0[0, [0, 2]].median() + RELEVANCE_MARGIN)
              + torch.sigmoid(z0[1, 3] - z0[1, :3].median() + RELEVANCE_MARGIN)) / 2
    stage1 = (torch.sigmoid(z1[0, 0] - z1[0, 1] + RELEVANCE_MARGIN) + torch.sigmoid(z1[1, 1] - z1[1, 0] + RELEVANCE_MARGIN)) / 2
    assert loss.item() == pytest.approx(((stage0 + stage1) / 2).item(), rel=1e-6)
    none = pruner_relevance_loss(logits, positions, torch.zeros(2, 6, dtype=torch.bool), image_positions)
    assert none.item() == 0


def test_the_relevance_loss_pushes_below_the_median_of_the_reference_tokens_only():
    # below_relevant: the anchor is the asked tokens' median, not the background's; a sample with no asked token left
    # (at a stage that dropped them all) adds nothing
    z = torch.tensor([[4.0, 6.0, 0.0, 0.0, 0.0, 3.0], [1.0, 0.0, 0.0, 2.0, 2.0, 2.0]], requires_grad=True)
    irrelevant = torch.tensor([[0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    asked = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    loss = relevance_loss(z, irrelevant, reference=asked)
    # sample 0: median of [4, 6] is 4 (the lower middle, as torch's); sample 1 has no reference: 0
    assert loss.item() == pytest.approx(torch.sigmoid(torch.tensor(3.0 - 4.0 + RELEVANCE_MARGIN)).item() / 2, rel=1e-6)
    everything_else = relevance_loss(z, irrelevant)  # the default anchor: median of [4, 6, 0, 0, 0] is 0
    assert everything_else.item() > loss.item()
    loss.backward()
    assert z.grad[0].gt(0).tolist() == [False] * 5 + [True] and not z.grad[1].any()
    # the same at a pruning stage: the reference is read at the stage's tokens
    image_positions = torch.arange(6).repeat(2, 1)
    staged = pruner_relevance_loss([z.detach()], [image_positions], irrelevant, image_positions, reference=asked)
    assert staged.item() == pytest.approx(loss.item(), rel=1e-6)


def test_the_relevance_loss_is_a_per_sample_mean():
    # as the other losses are, so that data-parallel shards average to the whole batch's: a sample with two labelled
    # tokens weighs as much as a sample with one, and a sample with none adds 0
    z = torch.tensor([[0.0, 0.0, 5.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [3.0, 0.0, 1.0]])
    irrelevant = torch.tensor([[True, True, False], [True, False, False], [False, False, False], [True, False, False]])
    per_sample = [torch.sigmoid(torch.tensor(-5.0 + RELEVANCE_MARGIN)), torch.sigmoid(torch.tensor(RELEVANCE_MARGIN)),
                  torch.tensor(0.0), torch.sigmoid(torch.tensor(3.0 - 0.0 + RELEVANCE_MARGIN))]  # median of [0, 1]: 0
    assert relevance_loss(z, irrelevant).item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-6)
    halves = (relevance_loss(z[:2], irrelevant[:2]) + relevance_loss(z[2:], irrelevant[2:])) / 2
    assert relevance_loss(z, irrelevant).item() == pytest.approx(halves.item(), rel=1e-6)


def test_samples_without_labels_add_nothing_and_shards_still_average_to_the_whole_batch():
    """A mixed batch: the loss is the mean over the labelled samples only; cut into micro-batches holding different
    numbers of them, their losses (divided by the global count per micro-batch) average to the same value, as
    accumulation and data parallelism average them."""
    torch.manual_seed(0)
    z = torch.randn(8, 5, requires_grad=True)
    irrelevant = torch.rand(8, 5) < 0.4
    labelled = torch.tensor([True, False, False, False, True, True, False, True])
    whole = relevance_loss(z, irrelevant, labelled=labelled)
    per_sample = [relevance_loss(z[b:b + 1], irrelevant[b:b + 1]) for b in range(8)]
    assert whole.item() == pytest.approx(torch.stack(per_sample)[labelled].mean().item(), rel=1e-6)
    shards = [slice(0, 4), slice(4, 8)]  # one labelled sample in the first, three in the second
    share = labelled.sum().item() / len(shards)
    averaged = sum(relevance_loss(z[s], irrelevant[s], labelled=labelled[s], labelled_per_batch=share)
                   for s in shards) / len(shards)
    assert averaged.item() == pytest.approx(whole.item(), rel=1e-6)
    whole.backward()
    assert not z.grad[~labelled].any() and z.grad[labelled].any()
    nothing = relevance_loss(z, irrelevant, labelled=torch.zeros(8, dtype=torch.bool), labelled_per_batch=0.0)
    assert nothing.item() == 0 and nothing.requires_grad  # a global batch without labels: a zero with its graph
