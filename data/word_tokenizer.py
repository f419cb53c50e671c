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
