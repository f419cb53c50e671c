"""Shared fixtures: tiny LLaVA models built from configs, like transformers' own tests."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor  # noqa: E402

from data.synthetic_vqa import vocabulary  # noqa: E402
from data.word_tokenizer import build_word_tokenizer  # noqa: E402
from trainers.tiny_backbone import build_processor  # noqa: E402


@pytest.fixture(scope="session")
def processor():
    """The tiny backbone's processor: 96 px images, 8 px patches, 144 image placeholders."""
    return build_processor()


def llava_like(image_size: int, patch_size: int, text_layers: int = 2, seed: int = 0):
    """A random-init LLaVA with llava-1.5's structure (feature layer -2, `default` strategy) at toy widths."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(vocabulary())
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(image_size // patch_size) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return LlavaForConditionalGeneration(config).eval(), processor


def sharpen_attention(layers, std: float = 0.5) -> None:
    """Peaked, content-dependent attention in these decoder layers: a random init attends almost
    uniformly, so attention rankings would be positional and an attention target flat."""
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.q_proj.weight.normal_(std=std)
            layer.self_attn.k_proj.weight.normal_(std=std)


SHIPPED_BACKBONE = "backbones/tiny-llava"


@pytest.fixture(scope="session")
def shipped_backbone():
    """The shipped, trained tiny backbone (read only): its attention is sharp, as a real model's is."""
    from models.llava_backbone import LlavaBackbone

    return LlavaBackbone.from_pretrained(SHIPPED_BACKBONE)


@pytest.fixture(scope="session")
def llava15_folder(tmp_path_factory):
    """llava-1.5's layout (336 px, 14 px patches: 576 vision tokens) at toy widths, saved with save_pretrained."""
    model, processor = llava_like(336, 14)
    folder = tmp_path_factory.mktemp("llava15-like")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A random-init tiny LLaVA (96 px / 8 px patches = 144 vision tokens, 4 decoder layers) saved to disk."""
    model, processor = llava_like(96, 8, text_layers=4, seed=3)
    folder = tmp_path_factory.mktemp("tiny-random")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_run_config(tmp_path, backbone_folder, **overrides):
    """configs/tiny.yaml shrunk to seconds on the random tiny backbone; ``overrides`` are dotted keys."""
    from configs.schema import apply_overrides, config_from_dict, read_yaml

    data = read_yaml("configs/tiny.yaml")
    settings = {
        "manager_settings.output_dir": str(tmp_path / "out"),
        "backbone_settings.name_or_path": str(backbone_folder),
        "method_settings.pruning_layers": [1, 2, 3],
        "method_settings.pruner_d_internal": 16,
        "method_settings.merger_d_internal": 16,
        "method_settings.discriminator_hidden": 16,
        "trainer_settings.dl_settings.batch_size": 4,
        "trainer_settings.log_every": 2,
        "trainer_settings.eval_every": 4,
        "trainer_settings.save_every": 2,
        "trainer_settings.max_steps": 4,
        "data_settings.synthetic_train_size": 32,
        "data_settings.synthetic_eval_size": 6,
        "data_settings.eval_batch_size": 3,
        "data_settings.max_new_tokens": 2,
        **overrides,
    }
    return config_from_dict(apply_overrides(data, [f"{k}={v}" for k, v in settings.items()]))
