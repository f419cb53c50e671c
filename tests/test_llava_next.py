"""LLaVA-NeXT's own checks: each image's placeholder layout (patch features and row ends), the baselines that need
one square grid, the resolution bounds and the shipped config. What every family shares (stock forward, soft ==
hard, generation, baselines, main.py) is in tests/test_backbone_families.py.

The toy model is random-init (models/tiny_llava.toy_llava_next: 48 px crops of 8 px patches, tiles up to 2 x 2).
"""

import pytest
import torch

from models.backbones import load_backbone, read_backbone_shape
from models.baselines import build_baseline
from models.llava_next_backbone import LlavaNextBackbone
from models.pruned_llava import PrunedLlava
from models.tiny_llava import toy_llava_next
from tests.helpers import resized_batch

SIZES = [(40, 90), (96, 72), (96, 96)]  # (height, width): 1 + 2, 1 + 4 and 1 + 4 crops, different unpadding


@pytest.fixture(scope="module")
def next_backbone():
    model, processor = toy_llava_next(text_layers=3, seed=1)
    return LlavaNextBackbone(model, processor)


def row_ends(backbone, image_sizes) -> list[int]:
    """The image_newline placeholders of each image (one per row of its tile grid)."""
    return [int((layout.source < 0).sum()) for layout in backbone.layouts(image_sizes)]


def batch_of(backbone, sizes=SIZES, with_answers=True):
    return resized_batch(backbone.processor, sizes, with_answers)


def test_images_of_different_sizes_take_different_numbers_of_placeholders(next_backbone):
    batch = batch_of(next_backbone)
    placeholders = (batch["input_ids"] == next_backbone.image_token_id).sum(dim=1)
    assert len(set(placeholders.tolist())) == len(SIZES) and (batch["attention_mask"] == 0).any()
    features = next_backbone.image_features(batch["pixel_values"], batch["image_sizes"])
    rows = row_ends(next_backbone, batch["image_sizes"])
    assert min(rows) > 0 and features.valid.sum(dim=1).tolist() == [int(p) - r for p, r in zip(placeholders, rows)]


def test_pooling_is_refused_before_it_runs(next_backbone):
    with pytest.raises(ValueError, match="spatial pooling needs a square patch grid"):
        build_baseline("pooling", next_backbone, 36, [1, 2], fastv_layer=1)


def test_max_vision_tokens_and_image_max_size_bound_the_resolutions(tmp_path):
    """For LLaVA-NeXT the bounds are real: they keep the grid resolutions whose images stay within them, in the
    shape the checks read, in the loaded model and in its processor; none left is a one-line error."""
    model, processor = toy_llava_next(text_layers=2, seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert read_backbone_shape(str(tmp_path)).num_vision_tokens == 36 + 4 * 36
    shape = read_backbone_shape(str(tmp_path), max_vision_tokens=120)  # 1 x 2 tiles: 36 + 2 x 36 = 108
    assert (shape.num_vision_tokens, shape.image_size) == (108, 96)
    for bounds in [(100, None), (None, 95)]:  # every resolution of this grid has a 96 px side
        with pytest.raises(ValueError, match=r"leave none of LLaVA-NeXT's image_grid_pinpoints .* the smallest, "
                                             r"\[48, 96\], gives 108 vision tokens with sides up to 96 px"):
            read_backbone_shape(str(tmp_path), *bounds)
    backbone = load_backbone(str(tmp_path))
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


class KeepAll(torch.nn.Module):
    def forward(self, vision, question, question_mask):
        return torch.full(vision.shape[:2], 30.0)


def test_stage_positions_map_onto_the_feature_slots(next_backbone):
    """The pruners' importance targets look each scored token up among the placeholders that hold a feature
    (trainers/training/trainer.py): with the row ends among LLaVA-NeXT's placeholders, token k must find slot k."""
    from models.sequences import compact, sorted_positions

    bb = next_backbone
    batch = batch_of(bb)
    images = bb.image_inputs(batch)
    model = PrunedLlava(bb, None, torch.nn.ModuleList([KeepAll()]), [1], [bb.num_vision_tokens]).eval()
    with torch.no_grad():
        positions = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], mode="soft",
                          image_inputs=images).stage_positions[0]  # (B, n), -1 at padding
    slots = sorted_positions(*compact(bb.feature_slots(batch["input_ids"], **images)))
    found = torch.searchsorted(slots, positions.clamp_min(0))
    valid = positions >= 0
    assert min(row_ends(bb, batch["image_sizes"])) > 0
    assert torch.equal(found[valid], torch.arange(positions.shape[1]).expand_as(positions)[valid])
