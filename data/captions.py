"""Captions of the synthetic scenes, read off their objects: the image-text pairs the tiny CLIP is trained on.

CLIP learns from images paired with what a person wrote about them; here a scene's caption says what is in it,
with words the synthetic questions already use (``vocabulary()``), so the tokenizer needs no new word:

    caption := clause+                              the clauses in a random order
    clause  := "a" COLOUR SHAPE "in the" ROW "row"   one per object    ("a red circle in the top row")
             | "there is one" COLOUR "object"        one per colour present, its count
             | "there are" COUNT COLOUR "objects"    (two, three; a colour seen four times or more has no count word)

The caption's text tower reads it through :func:`clip_tokenizer`: the word-level tokenizer that also ends every text
with ``</s>`` (CLIP's text embedding is its end token's state) and pads on the right (the tower's positions start at
the first word).
"""

from __future__ import annotations

import numpy as np
from tokenizers import processors
from transformers import CLIPProcessor

from data.processors import word_level_processor
from data.synthetic_vqa import COLORS, COUNT_WORDS, ROW_NAMES, SPLITS, SceneObject, vocabulary
from data.word_tokenizer import build_word_tokenizer

CAPTION_STREAM = 2  # the random stream of a scene's caption order, apart from the scene's own and its label's (1)


def scene_caption(objects: tuple[SceneObject, ...], rng: np.random.Generator) -> str:
    """The caption of a scene: every object's colour, shape and row, and each colour's count, in a random order."""
    clauses = [f"a {o.color} {o.shape} in the {ROW_NAMES[o.region[0]]} row" for o in objects]
    for color in COLORS:
        n = sum(o.color == color for o in objects)
        if n == 1:
            clauses.append(f"there is one {color} object")
        elif 1 < n < len(COUNT_WORDS):
            clauses.append(f"there are {COUNT_WORDS[n]} {color} objects")
    order = rng.permutation(len(clauses))
    return " ".join(clauses[i] for i in order)


def caption_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of the caption of scene ``index`` of ``split``."""
    return np.random.default_rng([seed, SPLITS[split], index, CAPTION_STREAM])


def clip_tokenizer():
    """The word-level tokenizer of the synthetic vocabulary, ending every text with ``</s>``, padding on the right."""
    tokenizer = build_word_tokenizer(vocabulary())
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A $B {eos}",
        special_tokens=[(bos, tokenizer.bos_token_id), (eos, tokenizer.eos_token_id)])
    tokenizer.padding_side = "right"
    return tokenizer


def clip_processor(image_size: int = 96) -> CLIPProcessor:
    """The tiny CLIP's processor: the tiny LLaVA's image processor and :func:`clip_tokenizer` (saved beside the
    CLIPModel, so that ``AutoProcessor.from_pretrained`` of that folder gives both)."""
    return CLIPProcessor(image_processor=word_level_processor(image_size).image_processor, tokenizer=clip_tokenizer())
