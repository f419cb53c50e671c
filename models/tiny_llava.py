"""The one builder of LLaVA models from scratch: the embedded tiny backbone (the CPU default, no
downloads), llava-1.5-7b's shapes for random-init benchmarks, and the tests' toy widths.

Same classes as llava-1.5 (CLIP vision tower, 2-layer GELU projector, Llama decoder), same
feature choice (second-to-last vision layer, CLS dropped). The tiny shapes train on 2 CPU
cores: 96 px images in 8 px patches give 144 vision tokens; the 8-layer decoder leaves room
for three pruning stages at distinct depths (for example before layers 2, 4 and 6).
The processor that goes with a model comes from data/processors.py; ``toy_llava_next`` and ``toy_qwen2_vl`` return
both, for trying the other backbone families on a CPU (scripts/make_toy_backbones.py saves them).
"""

from __future__ import annotations

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration)

from data.processors import word_level_next_processor, word_level_qwen_processor

# name -> (vision tower, language model) keyword arguments of CLIPVisionConfig and LlamaConfig
SHAPES = {
    "tiny": (dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=96,
                  patch_size=8, projection_dim=64),
             dict(hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)),
    "llava-1.5-7b": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14, projection_dim=768),
                     dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, max_position_embeddings=4096)),
    "toy": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=96,
                 patch_size=8, projection_dim=32),
            dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024)),
}


def llava_config(tokenizer, shapes: str = "tiny", **overrides) -> LlavaConfig:
    """A LlavaConfig of ``SHAPES[shapes]`` for ``tokenizer`` (its vocabulary and special tokens, and its
    ``<image>`` token). ``overrides``: ``image_size``, ``patch_size`` (vision) or ``text_layers``."""
    vision, text = dict(SHAPES[shapes][0]), dict(SHAPES[shapes][1])
    for key in ("image_size", "patch_size"):
        if key in overrides:
            vision[key] = overrides.pop(key)
    if "text_layers" in overrides:
        text["num_hidden_layers"] = overrides.pop("text_layers")
    if overrides:
        raise TypeError(f"unknown overrides {sorted(overrides)}; known: image_size, patch_size, text_layers")
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(vocab_size=len(tokenizer), **text, **special),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2, vision_feature_layer=-2,
        vision_feature_select_strategy="default", pad_token_id=tokenizer.pad_token_id)


def build_llava(tokenizer, shapes: str = "tiny", **overrides) -> LlavaForConditionalGeneration:
    """A random-init LlavaForConditionalGeneration of :func:`llava_config` (seed torch first for a fixed one)."""
    return LlavaForConditionalGeneration(llava_config(tokenizer, shapes, **overrides))


def llava_next_config(tokenizer, pinpoints: list[list[int]], shapes: str = "toy", **overrides) -> LlavaNextConfig:
    """A LlavaNextConfig with :func:`llava_config`'s towers (``image_size`` is one crop's side) and the any-resolution
    grid ``pinpoints`` ((height, width) pairs, multiples of the crop side)."""
    base = llava_config(tokenizer, shapes, **overrides)
    return LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config,
                           image_token_id=base.image_token_id, image_grid_pinpoints=pinpoints,
                           image_seq_length=base.image_seq_length, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", pad_token_id=tokenizer.pad_token_id)


def build_llava_next(tokenizer, pinpoints: list[list[int]], shapes: str = "toy",
                     **overrides) -> LlavaNextForConditionalGeneration:
    """A random-init LlavaNextForConditionalGeneration of :func:`llava_next_config`."""
    return LlavaNextForConditionalGeneration(llava_next_config(tokenizer, pinpoints, shapes, **overrides))


def build_qwen2_vl(tokenizer, version: str = "2", text_layers: int = 2, patch_size: int = 8):
    """A random-init Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``) at toy widths: a 2-block vision tower of
    ``patch_size`` px patches merged 2 x 2, a 64-wide decoder with multimodal rotary positions (sections 2, 3, 3 of
    its 8 frequencies), the tokenizer's ``<image>`` as the image token."""
    unused = tokenizer.convert_tokens_to_ids("<|video_pad|>")  # video, vision start/end: not in the prompts
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=tokenizer.convert_tokens_to_ids("<image>"), video_token_id=unused,
               vision_start_token_id=unused, vision_end_token_id=unused)
    if version == "2":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=patch_size,
                      temporal_patch_size=2, spatial_merge_size=2)
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=patch_size,
                  temporal_patch_size=2, spatial_merge_size=2, window_size=4 * patch_size, fullatt_block_indexes=[1],
                  tokens_per_second=2)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))


NEXT_PINPOINTS = [[48, 96], [96, 48], [96, 96]]  # a toy LLaVA-NeXT grid: 48 px crops, up to 2 x 2 tiles


def toy_llava_next(text_layers: int = 2, seed: int = 0):
    """A random-init LLaVA-NeXT at toy widths (48 px crops, 8 px patches) and its processor."""
    torch.manual_seed(seed)
    processor = word_level_next_processor(48, 8, NEXT_PINPOINTS)
    model = build_llava_next(processor.tokenizer, NEXT_PINPOINTS, image_size=48, patch_size=8, text_layers=text_layers)
    return model.eval(), processor


def toy_qwen2_vl(version: str = "2", text_layers: int = 2, seed: int = 0):
    """A random-init Qwen2-VL or Qwen2.5-VL at toy widths (8 px patches, 4 to 64 tokens per image) and its processor."""
    torch.manual_seed(seed)
    processor = word_level_qwen_processor(8, max_tokens=64, min_tokens=4)
    return build_qwen2_vl(processor.tokenizer, version, text_layers).eval(), processor
