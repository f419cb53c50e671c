"""The configuration of the embedded tiny LLaVA backbone (the CPU default, no downloads).

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
