"""Qwen2-VL's and Qwen2.5-VL's own checks: the resize bounds, the attention rows under multimodal rotary positions
and the shipped config. What every family shares (stock forward, soft == hard, generation, baselines, main.py) is
in tests/test_backbone_families.py.

The toy models are random-init (models/tiny_llava.toy_qwen2_vl: 8 px patches merged 2 x 2, 4 to 64 tokens per image).
"""

import pytest
import torch

from models.backbones import load_backbone, read_backbone_shape
from models.qwen2_vl_backbone import Qwen2_5_VLBackbone, Qwen2VLBackbone
from models.tiny_llava import toy_qwen2_vl
from tests.helpers import resized_batch

SIZES = [(40, 90), (96, 72), (96, 96)]  # (height, width): 12, 24 and 36 tokens
FAMILIES = {"2": Qwen2VLBackbone, "2.5": Qwen2_5_VLBackbone}


@pytest.fixture(scope="module", params=["2", "2.5"], ids=["qwen2_vl", "qwen2_5_vl"])
def qwen(request):
    model, processor = toy_qwen2_vl(request.param, text_layers=3, seed=1)
    return FAMILIES[request.param](model, processor)


def batch_of(backbone, sizes=SIZES, with_answers=True):
    return resized_batch(backbone.processor, sizes, with_answers)


def test_max_vision_tokens_bounds_the_resize(tmp_path):
    """For Qwen2-VL the bounds are real: the processor resizes every image to at most max_vision_tokens tokens
    (image_max_size: at most that side squared in area), and the shape the checks read says so."""
    model, processor = toy_qwen2_vl("2", text_layers=2, seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert read_backbone_shape(str(tmp_path), max_vision_tokens=16).num_vision_tokens == 16
    assert read_backbone_shape(str(tmp_path), 64, image_max_size=64).num_vision_tokens == 16  # 64^2 px / 16^2 px
    backbone = load_backbone(str(tmp_path))
    assert isinstance(backbone, Qwen2VLBackbone)
    backbone.apply_bounds(16, None)
    batch = batch_of(backbone, with_answers=False)
    counts = (batch["image_grid_thw"].prod(dim=-1) // 4).tolist()
    assert max(counts) <= 16 < 36 and backbone.num_vision_tokens == 16


def test_attention_rows_equal_the_eager_decoder(qwen):
    """FastV's and PyramidDrop's rows (LlavaBackbone.attention_probs with the multimodal rotary positions) equal
    what eager attention computes inside the layer."""
    batch = batch_of(qwen, with_answers=False)
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    qwen.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = qwen.model(**{k: batch[k] for k in keys}, output_attentions=True, output_hidden_states=True,
                             use_cache=False)
    finally:
        qwen.model.set_attn_implementation("sdpa")
        qwen.model.model.rope_deltas = None
    hidden = out.hidden_states[1]  # what enters decoder layer 1
    positions = qwen.prompt_positions(batch["input_ids"], batch["attention_mask"], **qwen.image_inputs(batch))
    T = batch["input_ids"].shape[1]
    query = torch.tensor([[T - 1, T - 3]]).expand(len(SIZES), -1)
    with torch.no_grad():
        rows = qwen.attention_probs(1, hidden, batch["attention_mask"], qwen.rotary(hidden, positions), query)
    eager = out.attentions[1].gather(2, query[:, None, :, None].expand(-1, rows.shape[1], -1, T))
    real = batch["attention_mask"].bool()[:, None, None, :].expand_as(rows)
    torch.testing.assert_close(rows[real], eager[real], rtol=1e-5, atol=1e-6)


def test_the_shipped_qwen_config_fits_qwen2_5_vl_7b_shapes(tmp_path):
    """configs/qwen2_5_vl_7b.yaml against Qwen2.5-VL-7B's config (28 decoder layers, 14 px patches merged 2 x 2),
    read without weights, search space included: 800 px squared bounds the images at 816 tokens."""
    import transformers

    from configs.schema import check_against_backbone, load_config

    transformers.Qwen2_5_VLConfig(text_config={"num_hidden_layers": 28}).save_pretrained(tmp_path)
    config = load_config("configs/qwen2_5_vl_7b.yaml", ["search_settings.enable=true"])
    shape = read_backbone_shape(str(tmp_path), config.data_settings.max_vision_tokens, config.data_settings.image_max_size)
    assert (shape.num_layers, shape.num_vision_tokens) == (28, 800 * 800 // 28 ** 2)
    assert check_against_backbone(config, shape.num_layers, shape.num_vision_tokens, shape.image_size) == []
