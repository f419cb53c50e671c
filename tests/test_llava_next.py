"""LLaVA-NeXT (any resolution) through the same pruned forward: images of different sizes in one batch.

The tiny model is random-init at toy widths (tests/helpers.llava_next_like: 48 px crops of 8 px patches,
tiles up to 2 x 2); images of different sizes get different numbers of vision tokens and row ends.
"""

import dataclasses

import pytest
import torch
from torch import nn

from data.collator import VQACollator
from data.synthetic_vqa import SyntheticVQADataset
from models.baselines import build_baseline
from models.layer_pruner import build_pruner
from models.llava_backbone import LlavaBackbone, read_backbone_shape
from models.llava_next_backbone import LlavaNextBackbone
from models.pruned_llava import IGNORE_INDEX, PrunedLlava
from models.token_merger import TokenMerger
from tests.helpers import llava_next_like

SIZES = [(40, 90), (96, 72), (96, 96)]  # (height, width): 1 + 2, 1 + 4 and 1 + 4 crops, different unpadding


class ChosenShare(nn.Module):
    """Keep logits +a for ``keep[b]`` tokens of sample b chosen by a fixed scatter over their ranks, -a for the
    rest: exactly the tokens hard mode keeps when its budget for sample b is ``keep[b]``."""

    def __init__(self, keep: list[int], tokens: list[int]):
        super().__init__()
        self.keep, self.tokens = torch.tensor(keep), torch.tensor(tokens)

    def forward(self, vision, question, question_mask):
        rank = torch.arange(vision.shape[1])
        priority = ((rank * 7919) % 1009).float().expand(vision.shape[0], -1)
        priority = priority.masked_fill(rank >= self.tokens[:, None], -1.0)  # a shorter sample's padding slots
        order = priority.argsort(dim=1, descending=True).argsort(dim=1)  # each token's place in the priority
        return torch.where(order < self.keep[:, None], 30.0, -30.0)


@pytest.fixture(scope="module")
def next_backbone():
    model, processor = llava_next_like(text_layers=3, seed=1)
    return LlavaNextBackbone(model, processor)


def row_ends(backbone, image_sizes) -> list[int]:
    """The image_newline placeholders of each image (one per row of its tile grid)."""
    return [int((layout.source < 0).sum()) for layout in backbone.layouts(image_sizes)]


def batch_of(backbone, sizes=SIZES, with_answers=True):
    """Synthetic questions whose images are resized to ``sizes``: different token counts, left padding."""
    data = SyntheticVQADataset(len(sizes), "eval", seed=4)
    samples = [dataclasses.replace(data[i], image=data[i].image.resize((w, h))) for i, (h, w) in enumerate(sizes)]
    return VQACollator(backbone.processor, with_answers=with_answers)(samples)


def test_images_of_different_sizes_take_different_numbers_of_placeholders(next_backbone):
    batch = batch_of(next_backbone)
    placeholders = (batch["input_ids"] == next_backbone.image_token_id).sum(dim=1)
    assert len(set(placeholders.tolist())) == len(SIZES) and (batch["attention_mask"] == 0).any()
    features = next_backbone.image_features(batch["pixel_values"], batch["image_sizes"])
    rows = row_ends(next_backbone, batch["image_sizes"])
    assert min(rows) > 0 and features.valid.sum(dim=1).tolist() == [int(p) - r for p, r in zip(placeholders, rows)]


def test_no_merger_no_pruners_equals_stock_forward(next_backbone):
    batch = batch_of(next_backbone)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        stock = next_backbone.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                                    image_sizes=batch["image_sizes"], attention_mask=batch["attention_mask"],
                                    use_cache=False).logits
        pieces = next_backbone(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                               **next_backbone.image_inputs(batch))
        torch.testing.assert_close(pieces[real], stock[real], rtol=1e-5, atol=1e-5)
        for mode in ("soft", "hard"):
            out = PrunedLlava(next_backbone)(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                             mode=mode, image_inputs=next_backbone.image_inputs(batch))
            torch.testing.assert_close(out.logits[real], stock[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_soft_keep_zero_equals_hard_removal(next_backbone, tau):
    """A merger keeping half of each image's tokens, then a stage keeping 2/3 of them: each sample keeps its own
    share, and soft mode with m -> 0 at exactly the tokens hard mode drops gives hard mode's answer logits."""
    bb = next_backbone
    batch = batch_of(bb)
    torch.manual_seed(0)
    half = bb.num_vision_tokens // 2
    merger = TokenMerger(bb.vision_hidden_size, bb.hidden_size, half, half / bb.num_vision_tokens, hidden=16)
    nn.init.normal_(merger.scorer.net[-1].weight)
    inputs = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    with torch.no_grad():
        merged = PrunedLlava(bb, merger).eval()(*inputs, mode="hard", tau=tau,
                                                image_inputs=bb.image_inputs(batch)).vision_counts[0]
    placeholders = (batch["input_ids"] == bb.image_token_id).sum(dim=1)
    rows = row_ends(bb, batch["image_sizes"])
    assert merged.tolist() == [round((int(p) - r) / 2) for p, r in zip(placeholders, rows)]  # half of its own
    budget = round(half * 2 / 3)
    keep = [round(m * budget / half) for m in merged.tolist()]
    model = PrunedLlava(bb, merger, nn.ModuleList([ChosenShare(keep, merged.tolist())]), [1], [budget]).eval()
    with torch.no_grad():
        hard = model(*inputs, labels=batch["labels"], mode="hard", tau=tau, image_inputs=bb.image_inputs(batch))
        soft = model(*inputs, labels=batch["labels"], mode="soft", tau=tau, image_inputs=bb.image_inputs(batch))
    assert hard.vision_counts[1].tolist() == keep and len(set(keep)) == len(SIZES)
    assert ((soft.stage_keep_probs[0] > 0.5).sum(dim=1) == torch.tensor(keep)).all()
    torch.testing.assert_close(hard.logits[hard.labels != IGNORE_INDEX], soft.logits[soft.labels != IGNORE_INDEX],
                               rtol=1e-4, atol=1e-4)


def test_cached_generation_equals_stock_generate_and_recomputation(next_backbone):
    bb = next_backbone
    prompts = batch_of(bb, with_answers=False)
    ids, pixels, mask = prompts["input_ids"], prompts["pixel_values"], prompts["attention_mask"]
    pad = bb.processor.tokenizer.pad_token_id
    stock = bb.model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, **bb.image_inputs(prompts),
                              max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=pad)[:, ids.shape[1]:]
    tokens, _ = PrunedLlava(bb).generate(ids, pixels, mask, 4, -1, pad, image_inputs=bb.image_inputs(prompts))
    assert torch.equal(tokens, stock)

    torch.manual_seed(0)
    pruners = nn.ModuleList(build_pruner("cross_attention", bb.hidden_size, 16, 2) for _ in range(2))
    for p in pruners.parameters():
        nn.init.normal_(p, std=0.5)
    model = PrunedLlava(bb, None, pruners, [1, 2], [90, 45]).eval()
    tokens, prefill = model.generate(ids, pixels, mask, 3, -1, pad, image_inputs=bb.image_inputs(prompts))
    entering = prefill.vision_counts[0]
    assert prefill.vision_counts[2].tolist() == [round(int(n) * 45 / bb.num_vision_tokens) for n in entering]
    grown_ids, grown_mask = ids, mask
    with torch.no_grad():
        for step in range(3):
            logits = model(grown_ids, pixels, grown_mask, mode="hard", image_inputs=bb.image_inputs(prompts)).logits
            assert torch.equal(logits[:, -1].argmax(-1), tokens[:, step])
            grown_ids = torch.cat([grown_ids, tokens[:, step:step + 1]], dim=1)
            grown_mask = torch.cat([grown_mask, torch.ones_like(grown_mask[:, :1])], dim=1)


def test_a_batch_equals_each_sample_alone(next_backbone):
    """Padding a shorter sample's vision slots changes nothing: each sample's pruned logits equal its own run."""
    bb = next_backbone
    torch.manual_seed(0)
    merger = TokenMerger(bb.vision_hidden_size, bb.hidden_size, 60, 60 / bb.num_vision_tokens, hidden=16)
    pruners = nn.ModuleList(build_pruner("cross_attention", bb.hidden_size, 16, 2) for _ in range(2))
    for p in [*merger.parameters(), *pruners.parameters()]:
        nn.init.normal_(p, std=0.5)
    model = PrunedLlava(bb, merger, pruners, [1, 2], [40, 20]).eval()
    prompts = batch_of(bb, with_answers=False)
    with torch.no_grad():
        together = model(prompts["input_ids"], prompts["pixel_values"], prompts["attention_mask"], mode="hard",
                         image_inputs=bb.image_inputs(prompts))
        for b in range(len(SIZES)):
            real = prompts["attention_mask"][b].bool()  # the sample without its padding
            alone = model(prompts["input_ids"][b:b + 1, real], prompts["pixel_values"][b:b + 1],
                          torch.ones(1, int(real.sum())), mode="hard",
                          image_inputs={"image_sizes": prompts["image_sizes"][b:b + 1]})
            assert [int(c[b]) for c in together.vision_counts] == [int(c[0]) for c in alone.vision_counts]
            torch.testing.assert_close(together.logits[b, -1], alone.logits[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["fastv", "tome", "random", "pyramiddrop"])
def test_baselines_keep_the_same_share_of_every_image(next_backbone, method):
    bb = next_backbone
    prompts = batch_of(bb, with_answers=False)
    keep = bb.num_vision_tokens // 4
    model = build_baseline(method, bb, keep, [1, 2], fastv_layer=1)
    with torch.no_grad():
        out = model(prompts["input_ids"], prompts["pixel_values"], prompts["attention_mask"], mode="hard",
                    image_inputs=bb.image_inputs(prompts))
    features = bb.image_features(prompts["pixel_values"], prompts["image_sizes"]).valid.sum(dim=1).tolist()
    share = [round(n * keep / bb.num_vision_tokens) for n in features]
    assert out.vision_counts[-1].tolist() == share and len(set(share)) == len(SIZES)
    assert torch.isfinite(out.logits).all()


def test_pooling_and_visionzip_refuse_images_of_different_sizes(next_backbone):
    bb = next_backbone
    prompts = batch_of(bb, with_answers=False)
    with pytest.raises(ValueError, match="spatial pooling needs a square patch grid"):
        build_baseline("pooling", bb, 36, [1, 2], fastv_layer=1)
    model = build_baseline("visionzip", bb, 36, [1, 2], fastv_layer=1)
    with pytest.raises(NotImplementedError, match="same grid of tokens"):
        model(prompts["input_ids"], prompts["pixel_values"], prompts["attention_mask"], mode="hard",
              image_inputs=bb.image_inputs(prompts))


def test_the_family_is_chosen_from_the_saved_config(tmp_path):
    model, processor = llava_next_like(text_layers=2, seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    shape = read_backbone_shape(str(tmp_path))
    assert (shape.num_layers, shape.num_vision_tokens, shape.image_size) == (2, 36 + 144, 96)
    loaded = LlavaBackbone.from_pretrained(str(tmp_path))
    assert isinstance(loaded, LlavaNextBackbone) and loaded.image_input_keys == ("image_sizes",)


def test_main_trains_and_evaluates_on_a_llava_next_folder(tmp_path):
    """python main.py with --set overrides only, on a saved random-init LLaVA-NeXT: training, evaluation (the stock
    generate as the baseline, soft and hard decoding) and checkpoints, with merger and pruners."""
    import main as entry
    from tests.helpers import main_args

    model, processor = llava_next_like(text_layers=4, seed=2)
    model.save_pretrained(tmp_path / "next")
    processor.save_pretrained(tmp_path / "next")
    args, out = main_args(tmp_path, tmp_path / "next", **{"method_settings.target_merge_tokens": 90,
                                                           "method_settings.merge_ratio": 0.5})
    assert entry.main(args) == 0
    log = (out / "logs" / "training.log").read_text()
    assert "[Eval Step 4]" in log and "accuracy_hard" in log and "accuracy_baseline" in log
    from trainers.pruned_model import load_pruned

    pruned = load_pruned(out / "pruned_final")  # a saved model answers for images of any size
    data = SyntheticVQADataset(2, "eval", seed=4)
    images = [data[i].image.resize(size) for i, size in enumerate([(90, 40), (72, 96)])]
    answers = pruned.answer(images, ["what color is the square in row 2 ?", "how many red objects ?"], max_new_tokens=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_max_vision_tokens_and_image_max_size_bound_the_resolutions(tmp_path):
    """For LLaVA-NeXT the bounds are real: they keep the grid resolutions whose images stay within them, in the
    shape the checks read, in the loaded model and in its processor; none left is a one-line error."""
    model, processor = llava_next_like(text_layers=2, seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert read_backbone_shape(str(tmp_path)).num_vision_tokens == 36 + 4 * 36
    shape = read_backbone_shape(str(tmp_path), max_vision_tokens=120)  # 1 x 2 tiles: 36 + 2 x 36 = 108
    assert (shape.num_vision_tokens, shape.image_size) == (108, 96)
    for bounds in [(100, None), (None, 95)]:  # every resolution of this grid has a 96 px side
        with pytest.raises(ValueError, match=r"leave none of LLaVA-NeXT's image_grid_pinpoints .* the smallest, "
                                             r"\[48, 96\], gives 108 vision tokens with sides up to 96 px"):
            read_backbone_shape(str(tmp_path), *bounds)
    backbone = LlavaBackbone.from_pretrained(str(tmp_path))
    backbone.apply_bounds(120, None)
    batch = batch_of(backbone, with_answers=False)
    placeholders = (batch["input_ids"] == backbone.image_token_id).sum(dim=1)
    features = backbone.image_features(batch["pixel_values"], batch["image_sizes"]).valid.sum(dim=1)
    assert int(features.max()) <= 108 and int(placeholders.max()) < 108 + 12  # the 96 x 96 image: 1 x 2 tiles now
    with torch.no_grad():
        stock = backbone.model(**{k: batch[k] for k in ("input_ids", "pixel_values", "image_sizes", "attention_mask")},
                               use_cache=False).logits
        mine = PrunedLlava(backbone)(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], mode="hard",
                                     image_inputs=backbone.image_inputs(batch)).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(mine[real], stock[real], rtol=1e-5, atol=1e-5)


def test_the_shipped_llava_next_config_fits_llava_v1_6_shapes(tmp_path):
    """configs/llava_next_7b.yaml against llava-v1.6-vicuna-7b's config (LlavaNextConfig's defaults: CLIP-L/336,
    a 32-layer decoder, the five 336-px grid resolutions), read without weights, search space included."""
    import transformers

    from configs.schema import check_against_backbone, load_config

    transformers.LlavaNextConfig(text_config={"model_type": "llama"}).save_pretrained(tmp_path)
    config = load_config("configs/llava_next_7b.yaml", ["search_settings.enable=true"])
    bounds = config.data_settings.max_vision_tokens, config.data_settings.image_max_size
    shape = read_backbone_shape(str(tmp_path), *bounds)
    assert (shape.num_layers, shape.num_vision_tokens, shape.image_size) == (32, 576 * 4, 1008)  # 672 x 672 left out
    assert check_against_backbone(config, shape.num_layers, shape.num_vision_tokens, shape.image_size) == []
