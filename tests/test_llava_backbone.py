import pytest
import torch
from transformers import LlavaForConditionalGeneration

from data.collator import VQACollator
from data.synthetic_vqa import SyntheticVQADataset
from models.backbones import load_backbone, read_backbone_shape
from models.llava_backbone import BackboneNotFoundError
from models.sequences import causal_padding_mask


def test_adapter_pieces_reproduce_stock_forward(llava15_folder):
    backbone = load_backbone(str(llava15_folder), dtype="float32")
    stock = LlavaForConditionalGeneration.from_pretrained(llava15_folder, dtype=torch.float32).eval()
    data = SyntheticVQADataset(3, "eval", seed=1)
    batch = VQACollator(backbone.processor)([data[i] for i in range(3)])  # questions differ in length: padding
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    assert (batch["input_ids"] == backbone.image_token_id).sum(1).tolist() == [576] * 3

    with torch.no_grad():
        expected = stock(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                         attention_mask=batch["attention_mask"], use_cache=False).logits
        got = backbone(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_vision_features_follow_llava_selection(llava15_folder):
    backbone = load_backbone(str(llava15_folder), dtype="float32")
    pixels = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        features = backbone.vision_features(pixels)
        stock = backbone.model.get_image_features(pixel_values=pixels).pooler_output
    assert features.shape == (2, 576, backbone.vision_hidden_size)  # CLS dropped
    torch.testing.assert_close(backbone.project(features), torch.stack(stock))


def test_backbone_is_frozen_and_stays_in_eval(llava15_folder):
    backbone = load_backbone(str(llava15_folder), dtype="float32")
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.model.training


def test_shape_is_read_without_weights(llava15_folder):
    shape = read_backbone_shape(str(llava15_folder))
    assert (shape.num_layers, shape.num_vision_tokens, shape.image_size) == (2, 576, 336)


@pytest.mark.parametrize("config_class", ["LlavaOnevisionConfig", "LlamaConfig", "IdeficsConfig"])
def test_other_model_families_are_refused_by_name_before_any_weight(tmp_path, config_class):
    """An unsupported family is one line naming its model_type and the supported ones, read from config.json alone
    (Qwen2-VL used to raise an AttributeError before it had an adapter)."""
    import transformers

    config = getattr(transformers, config_class)()
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        read_backbone_shape(str(tmp_path))
    assert f"is a {config.model_type!r} model; supported model types: llava, llava_next, qwen2_vl, qwen2_5_vl " in str(err.value)


def test_main_refuses_an_unsupported_family_with_one_line(tmp_path, capsys):
    import transformers

    import main as entry
    from tests.helpers import main_args

    from data.processors import word_level_processor

    transformers.LlavaOnevisionConfig().save_pretrained(tmp_path / "onevision")
    word_level_processor().save_pretrained(tmp_path / "onevision")  # a downloaded checkpoint has its processor's files
    args, out = main_args(tmp_path, tmp_path / "onevision")
    assert entry.main(args) == 2
    assert "is a 'llava_onevision' model; supported model types: llava, llava_next, qwen2_vl, qwen2_5_vl" in \
        capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("name", ["no-such-org/no-such-llava", "./missing/folder"])
def test_missing_backbone_names_what_was_looked_for(name):
    with pytest.raises(BackboneNotFoundError) as err:
        read_backbone_shape(name)
    message = str(err.value)
    assert name in message and "configs/tiny.yaml" in message
    assert ("hf download" in message) == (not name.startswith(".")), "download advice for a model id only"
    with pytest.raises(BackboneNotFoundError):
        load_backbone(name)


def test_causal_padding_mask_blocks_future_and_padding():
    mask = causal_padding_mask(torch.tensor([[0, 1, 1]]), torch.float32)[0, 0]  # left-padded
    allowed = mask == 0
    assert allowed.tolist() == [[True, False, False], [False, True, False], [False, True, True]]
