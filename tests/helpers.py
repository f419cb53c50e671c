"""What several test modules build: tiny random LLaVA models and the shrunk tiny run (as a Config or main.py args)."""

from __future__ import annotations

import torch
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

from data.synthetic_vqa import vocabulary
from data.word_tokenizer import build_word_tokenizer

SHIPPED_BACKBONE = "backbones/tiny-llava"

# configs/tiny.yaml shrunk to seconds on a random tiny backbone with 4 decoder layers (dotted key -> value)
TINY_RUN = {
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
}


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


def tiny_settings(tmp_path, backbone_folder, **overrides) -> dict:
    return {"manager_settings.output_dir": str(tmp_path / "out"), "backbone_settings.name_or_path": str(backbone_folder),
            **TINY_RUN, **overrides}


def tiny_run_config(tmp_path, backbone_folder, **overrides):
    """configs/tiny.yaml with TINY_RUN (and ``overrides``, dotted keys) as a Config."""
    from configs.schema import apply_overrides, config_from_dict, read_yaml

    settings = tiny_settings(tmp_path, backbone_folder, **overrides)
    return config_from_dict(apply_overrides(read_yaml("configs/tiny.yaml"), [f"{k}={v}" for k, v in settings.items()]))


def main_args(tmp_path, backbone_folder, *extra, **overrides):
    """The same run as ``python main.py`` arguments (``extra``: more arguments), and its output folder."""
    args = ["--config", "configs/tiny.yaml"]
    for key, value in tiny_settings(tmp_path, backbone_folder, **overrides).items():
        args += ["--set", f"{key}={value}"]
    return [*args, *extra], tmp_path / "out"
