"""Configurations of LLaVA backbones built from scratch: the embedded tiny one (the CPU default, no
downloads) and llava-1.5-7b's shapes for random-init benchmarks.

Same classes as llava-1.5 (CLIP vision tower, 2-layer GELU projector, Llama decoder), same
feature choice (second-to-last vision layer, CLS dropped), at a size that trains on 2 CPU
cores: 96 px images in 8 px patches give 144 vision tokens; the 8-layer decoder leaves room
for three pruning stages at distinct depths (for example before layers 2, 4 and 6).
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

TINY_IMAGE_SIZE = 96
TINY_PATCH_SIZE = 8


def tiny_llava_config(vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int,
                      image_token_id: int, text_layers: int = 8) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE, projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    num_patches = (TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        image_seq_length=num_patches, vision_feature_layer=-2, vision_feature_select_strategy="default",
        pad_token_id=pad_token_id,
    )


def llava15_7b_config(vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int,
                      image_token_id: int) -> LlavaConfig:
    """llava-1.5-7b's shapes (CLIP ViT-L/14 at 336 px, a 32-layer 4096-wide Llama) for random-init benchmarks."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=pad_token_id)
