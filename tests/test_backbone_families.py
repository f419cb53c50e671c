"""Every backbone family whose token count follows the image, through the same pruned forward.

For LLaVA-NeXT (any resolution), Qwen2-VL and Qwen2.5-VL (dynamic resolution, 3-D rotary positions): a
random-init toy model built here (tests/helpers) and one batch of synthetic questions whose images have three
sizes, so its samples hold different numbers of vision tokens, with left padding. Family-specific checks (layout,
bounds, shipped configs) are in tests/test_llava_next.py and tests/test_qwen2_vl.py.
"""

import pytest
import torch
from torch import nn

from models.backbones import load_backbone, read_backbone_shape
from models.baselines import build_baseline
from models.layer_pruner import build_pruner
from models.llava_next_backbone import LlavaNextBackbone
from models.pruned_llava import PrunedLlava
from models.qwen2_vl_backbone import Qwen2_5_VLBackbone, Qwen2VLBackbone
from models.sequences import IGNORE_INDEX
from models.tiny_llava import toy_llava_next, toy_qwen2_vl
from models.token_merger import TokenMerger
from tests.helpers import ChosenShare, main_args, resized_batch, write_llava_665k_like

SIZES = [(40, 90), (96, 72), (96, 96)]  # (height, width)

# family -> (adapter, toy builder(text_layers, seed), main.py overrides for its toy model)
FAMILIES = {
    "llava_next": (LlavaNextBackbone, lambda layers, seed: toy_llava_next(layers, seed),
                   {"method_settings.target_merge_tokens": 90, "method_settings.merge_ratio": 0.5}),
    "qwen2_vl": (Qwen2VLBackbone, lambda layers, seed: toy_qwen2_vl("2", layers, seed),
                 {"method_settings.target_merge_tokens": "null", "method_settings.merge_ratio": 0.5,
                  "data_settings.max_vision_tokens": 36}),
    "qwen2_5_vl": (Qwen2_5_VLBackbone, lambda layers, seed: toy_qwen2_vl("2.5", layers, seed),
                   {"method_settings.target_merge_tokens": "null", "method_settings.merge_ratio": 0.5,
                    "data_settings.max_vision_tokens": 36}),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def backbone(request):
    family, build, _ = FAMILIES[request.param]
    return family(*build(3, 1))


def batch_of(backbone, with_answers=True, only=None):
    return resized_batch(backbone.processor, SIZES, with_answers, only=only)


def inputs_of(batch):
    return batch["input_ids"], batch["pixel_values"], batch["attention_mask"]


def image_tokens(backbone, batch) -> list[int]:
    """Vision tokens of each image (features, before any merging)."""
    return backbone.image_features(batch["pixel_values"], **backbone.image_inputs(batch)).valid.sum(dim=1).tolist()


def test_images_of_different_sizes_hold_different_numbers_of_tokens(backbone):
    batch = batch_of(backbone)
    assert len(set(image_tokens(backbone, batch))) == len(SIZES) and (batch["attention_mask"] == 0).any()


def test_no_merger_no_pruners_equals_stock_forward(backbone):
    batch = batch_of(backbone)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        stock = backbone.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                               attention_mask=batch["attention_mask"], **backbone.image_inputs(batch),
                               use_cache=False).logits
        pieces = backbone(*inputs_of(batch), **backbone.image_inputs(batch))
        torch.testing.assert_close(pieces[real], stock[real], rtol=1e-5, atol=1e-5)
        for mode in ("soft", "hard"):
            out = PrunedLlava(backbone)(*inputs_of(batch), mode=mode, image_inputs=backbone.image_inputs(batch))
            torch.testing.assert_close(out.logits[real], stock[real], rtol=1e-5, atol=1e-5)
            assert out.vision_counts[0].tolist() == image_tokens(backbone, batch)


@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_soft_keep_zero_equals_hard_removal(backbone, tau):
    """A merger keeping half of each image's tokens, then a stage keeping 2/3 of them: each image keeps its own
    share, and soft mode with m -> 0 at exactly the tokens hard mode drops gives hard mode's answer logits (the kept
    tokens keep their positions: 1-D or 3-D)."""
    bb = backbone
    batch = batch_of(bb)
    images = bb.image_inputs(batch)
    torch.manual_seed(0)
    half = bb.num_vision_tokens // 2
    merger = TokenMerger(bb.vision_hidden_size, bb.hidden_size, half, half / bb.num_vision_tokens, hidden=16)
    nn.init.normal_(merger.scorer.net[-1].weight)
    with torch.no_grad():
        merged = PrunedLlava(bb, merger).eval()(*inputs_of(batch), mode="hard", tau=tau, image_inputs=images)
    merged = merged.vision_counts[0].tolist()
    assert merged == [round(n / 2) for n in image_tokens(bb, batch)]  # half of its own
    budget = round(half * 2 / 3)
    keep = [round(m * budget / half) for m in merged]
    model = PrunedLlava(bb, merger, nn.ModuleList([ChosenShare(keep, merged)]), [1], [budget]).eval()
    with torch.no_grad():
        hard = model(*inputs_of(batch), labels=batch["labels"], mode="hard", tau=tau, image_inputs=images)
        soft = model(*inputs_of(batch), labels=batch["labels"], mode="soft", tau=tau, image_inputs=images)
    assert hard.vision_counts[1].tolist() == keep and len(set(keep)) == len(SIZES)
    assert ((soft.stage_keep_probs[0] > 0.5).sum(dim=1) == torch.tensor(keep)).all()
    torch.testing.assert_close(hard.logits[hard.labels != IGNORE_INDEX], soft.logits[soft.labels != IGNORE_INDEX],
                               rtol=1e-4, atol=1e-4)


def random_pruners(backbone, stages: int = 2) -> nn.ModuleList:
    torch.manual_seed(0)
    pruners = nn.ModuleList(build_pruner("cross_attention", backbone.hidden_size, 16, 2) for _ in range(stages))
    for p in pruners.parameters():
        nn.init.normal_(p, std=0.5)  # away from the keep-everything start, so choices differ between tokens
    return pruners


def test_cached_generation_equals_stock_generate_and_recomputation(backbone):
    bb = backbone
    prompts = batch_of(bb, with_answers=False)
    ids, pixels, mask = inputs_of(prompts)
    pad = bb.processor.tokenizer.pad_token_id
    stock = bb.stock_generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, **bb.image_inputs(prompts),
                              max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=pad)[:, ids.shape[1]:]
    tokens, _ = PrunedLlava(bb).generate(ids, pixels, mask, 4, -1, pad, image_inputs=bb.image_inputs(prompts))
    assert torch.equal(tokens, stock)

    # With pruning, cached decoding equals recomputing the pruned prefill over prompt + answer so far.
    n = bb.num_vision_tokens
    model = PrunedLlava(bb, None, random_pruners(bb), [1, 2], [n // 2, n // 4]).eval()
    tokens, prefill = model.generate(ids, pixels, mask, 3, -1, pad, image_inputs=bb.image_inputs(prompts))
    assert prefill.vision_counts[2].tolist() == [round(t * (n // 4) / n) for t in image_tokens(bb, prompts)]
    grown = dict(prompts)
    with torch.no_grad():
        for step in range(3):
            logits = model(*inputs_of(grown), mode="hard", image_inputs=bb.image_inputs(grown)).logits
            assert torch.equal(logits[:, -1].argmax(-1), tokens[:, step])
            new = tokens[:, step:step + 1]
            grown = {**grown, **bb.append_text(bb.image_inputs(grown), 1),
                     "input_ids": torch.cat([grown["input_ids"], new], dim=1),
                     "attention_mask": torch.cat([grown["attention_mask"], torch.ones_like(new)], dim=1)}


def test_a_batch_equals_each_sample_alone(backbone):
    """Padding a shorter sample's vision slots changes nothing: each sample's pruned logits equal its own run."""
    bb = backbone
    n = bb.num_vision_tokens
    torch.manual_seed(0)
    merger = TokenMerger(bb.vision_hidden_size, bb.hidden_size, n // 2, 0.5, hidden=16)
    for p in merger.parameters():
        nn.init.normal_(p, std=0.5)
    model = PrunedLlava(bb, merger, random_pruners(bb), [1, 2], [n // 3, n // 6]).eval()
    prompts = batch_of(bb, with_answers=False)
    with torch.no_grad():
        together = model(*inputs_of(prompts), mode="hard", image_inputs=bb.image_inputs(prompts))
        for b in range(len(SIZES)):
            one = batch_of(bb, with_answers=False, only=b)
            assert torch.equal(one["input_ids"][0], prompts["input_ids"][b, prompts["attention_mask"][b].bool()])
            alone = model(*inputs_of(one), mode="hard", image_inputs=bb.image_inputs(one))
            assert [int(c[b]) for c in together.vision_counts] == [int(c[0]) for c in alone.vision_counts]
            torch.testing.assert_close(together.logits[b, -1], alone.logits[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["fastv", "tome", "random", "pyramiddrop"])
def test_baselines_keep_the_same_share_of_every_image(backbone, method):
    prompts = batch_of(backbone, with_answers=False)
    keep = backbone.num_vision_tokens // 4
    model = build_baseline(method, backbone, keep, [1, 2], fastv_layer=1)
    with torch.no_grad():
        out = model(*inputs_of(prompts), mode="hard", image_inputs=backbone.image_inputs(prompts))
    share = [round(t * keep / backbone.num_vision_tokens) for t in image_tokens(backbone, prompts)]
    assert out.vision_counts[-1].tolist() == share and len(set(share)) == len(SIZES)
    assert torch.isfinite(out.logits).all()


def test_visionzip_refuses_images_of_different_sizes(backbone):
    model = build_baseline("visionzip", backbone, 8, [1, 2], fastv_layer=1)
    prompts = batch_of(backbone, with_answers=False)
    with pytest.raises(NotImplementedError, match="same grid of tokens"):
        model(*inputs_of(prompts), mode="hard", image_inputs=backbone.image_inputs(prompts))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_main_trains_and_evaluates_on_a_saved_folder(tmp_path, name):
    """python main.py with --set overrides only, on a random-init checkpoint folder saved with save_pretrained:
    training with merger and pruners, evaluation (the stock generate as the baseline, soft and hard decoding),
    checkpoints, and the saved pruned model answering for images of any size."""
    import main as entry
    from data.synthetic_vqa import SyntheticVQADataset
    from trainers.inference.pruned_model import load_pruned

    family, build, overrides = FAMILIES[name]
    model, processor = build(4, 2)
    model.save_pretrained(tmp_path / name)
    processor.save_pretrained(tmp_path / name)
    assert type(load_backbone(str(tmp_path / name))) is family  # chosen from config.json
    assert read_backbone_shape(str(tmp_path / name)).num_layers == 4
    args, out = main_args(tmp_path, tmp_path / name, **overrides)
    assert entry.main(args) == 0
    log = (out / "logs" / "training.log").read_text()
    assert "[Eval Step 4]" in log and "accuracy_hard" in log and "accuracy_baseline" in log
    pruned = load_pruned(out / "pruned_final")
    data = SyntheticVQADataset(2, "eval", seed=4)
    images = [data[i].image.resize(size) for i, size in enumerate([(90, 40), (72, 96)])]
    answers = pruned.answer(images, ["what color is the square in row 2 ?", "how many red objects ?"], max_new_tokens=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_relevance_boxes_train_on_llava_json_data(tmp_path, name):
    """python main.py with relevance_weight on a LLaVA instruction file of images of odd sizes, a third of its records
    with relevance boxes: the boxes map onto the family's vision tokens and the relevance losses train."""
    import main as entry

    _, build, overrides = FAMILIES[name]
    model, processor = build(4, 2)
    model.save_pretrained(tmp_path / name)
    processor.save_pretrained(tmp_path / name)
    odd = [(91, 57), (45, 77), (96, 96)]  # (width, height)
    train = write_llava_665k_like(tmp_path / "data", image_records=9, text_only=1, boxed_every=3, sizes=odd)
    evaluation = write_llava_665k_like(tmp_path / "data", image_records=3, text_only=0, split="eval",
                                       name="eval.json", sizes=odd)
    assert train.labelled >= 2
    data = {"data_settings.source": "llava_json", "data_settings.train_json": str(train.json_path),
            "data_settings.eval_json": str(evaluation.json_path), "data_settings.image_folder": str(train.image_folder),
            "data_settings.on_bad_sample": "skip", "trainer_settings.max_steps": 2, "trainer_settings.log_every": 1,
            "trainer_settings.eval_every": 2, "trainer_settings.save_every": 2}
    args, out = main_args(tmp_path, tmp_path / name, **overrides, **data, **{"method_settings.relevance_weight": 1})
    assert entry.main(args) == 0
    log = (out / "logs" / "training.log").read_text()
    assert f"{train.labelled} with relevance boxes" in log and "pruner_relevance_loss" in log
    assert "[Eval Step 2]" in log
