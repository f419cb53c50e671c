"""A word-level tokenizer built from a word list, no download: the tiny backbone's tokenizer.

Words are split on whitespace and punctuation; ``<s>`` is prepended to every text, and
``<image>`` is a special token so that the processor's 144 placeholders tokenize one each.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")


def build_word_tokenizer(words: list[str], extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """``extra_special``: more special tokens after the standard ones (a family's own placeholders)."""
    special = (*SPECIAL_TOKENS, *extra_special)
    vocab = {tok: i for i, tok in enumerate([*special, *words])}
    if len(vocab) != len(special) + len(words):
        raise ValueError("the word list repeats a word or a special token")
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",  # batched greedy generation appends on the right
    )
    if extra_special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return tokenizer


def word_level_processor(image_size: int = 96, patch_size: int = 8):
    """The synthetic data's processor: the word-level tokenizer over its vocabulary and a CLIP image processor at
    ``image_size`` px (the tiny backbone's by default; 336 / 14 for llava-1.5's shapes)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from data.synthetic_vqa import vocabulary

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    # num_additional_image_tokens=1: the processor counts CLS, which the `default` strategy drops.
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_word_tokenizer(vocabulary()),
                          patch_size=patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1)


def word_level_next_processor(crop_size: int, patch_size: int, pinpoints: list[list[int]]):
    """:func:`word_level_processor` for a LLaVA-NeXT model: crops of ``crop_size`` px on the ``pinpoints`` grid."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from data.synthetic_vqa import vocabulary

    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": crop_size},
                                                 crop_size={"height": crop_size, "width": crop_size},
                                                 image_grid_pinpoints=pinpoints)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=build_word_tokenizer(vocabulary()),
                              patch_size=patch_size, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)


def word_level_qwen_processor(patch_size: int = 8, max_tokens: int = 64, min_tokens: int = 4):
    """:func:`word_level_processor` for a Qwen2-VL model: images resized to between ``min_tokens`` and ``max_tokens``
    tokens of (2 ``patch_size``)^2 px each; ``<image>`` is the image token, ``<|video_pad|>`` the (unused) video one."""
    from transformers import Qwen2VLImageProcessorPil

    from data.synthetic_vqa import vocabulary
    from models.qwen2_vl_backbone import image_only_processor

    per_token = (2 * patch_size) ** 2
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch_size, temporal_patch_size=2, merge_size=2,
                                               size={"shortest_edge": min_tokens * per_token,
                                                     "longest_edge": max_tokens * per_token})
    return image_only_processor(image_processor, build_word_tokenizer(vocabulary(), ("<|video_pad|>",)))
