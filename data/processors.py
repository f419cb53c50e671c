"""Processors built here, no download: the synthetic data's (a word-level tokenizer and the image processor of each
backbone family at the tiny models' sizes), and Qwen2-VL's without its video processor.
"""

from __future__ import annotations

from transformers import (CLIPImageProcessorPil, LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaProcessor,
                          Qwen2VLImageProcessorPil, Qwen2VLProcessor)

from data.synthetic_vqa import vocabulary
from data.word_tokenizer import build_word_tokenizer


def image_only_processor(image_processor, tokenizer):
    """The family's processor without its video processor (which needs torchvision): images and text only."""
    class ImageOnlyQwenProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwenProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  chat_template=getattr(tokenizer, "chat_template", None))


def word_level_processor(image_size: int = 96, patch_size: int = 8):
    """The synthetic data's processor: the word-level tokenizer over its vocabulary and a CLIP image processor at
    ``image_size`` px (the tiny backbone's by default; 336 / 14 for llava-1.5's shapes)."""
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    # num_additional_image_tokens=1: the processor counts CLS, which the `default` strategy drops.
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_word_tokenizer(vocabulary()),
                          patch_size=patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1)


def word_level_next_processor(crop_size: int, patch_size: int, pinpoints: list[list[int]]):
    """:func:`word_level_processor` for a LLaVA-NeXT model: crops of ``crop_size`` px on the ``pinpoints`` grid."""
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": crop_size},
                                                 crop_size={"height": crop_size, "width": crop_size},
                                                 image_grid_pinpoints=pinpoints)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=build_word_tokenizer(vocabulary()),
                              patch_size=patch_size, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)


def word_level_qwen_processor(patch_size: int = 8, max_tokens: int = 64, min_tokens: int = 4):
    """:func:`word_level_processor` for a Qwen2-VL model: images resized to between ``min_tokens`` and ``max_tokens``
    tokens of (2 ``patch_size``)^2 px each; ``<image>`` is the image token, ``<|video_pad|>`` the (unused) video one."""
    per_token = (2 * patch_size) ** 2
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch_size, temporal_patch_size=2, merge_size=2,
                                               size={"shortest_edge": min_tokens * per_token,
                                                     "longest_edge": max_tokens * per_token})
    return image_only_processor(image_processor, build_word_tokenizer(vocabulary(), ("<|video_pad|>",)))
