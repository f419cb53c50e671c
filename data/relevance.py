"""Relevance boxes: the regions of an image a conversation is about, what method_settings.relevance_weight trains on.

A LLaVA instruction record may carry them (docs/data.md, "Relevance boxes")::

    {"id": ..., "image": ..., "conversations": [...],
     "relevant_boxes": [[x0, y0, x1, y1], ...],      # the regions the questions are about
     "distractor_boxes": [[x0, y0, x1, y1], ...]}    # optional: other objects, which they are not about

Each box is (x0, y0, x1, y1) in fractions of the original image's width and height, (0, 0) at the top left,
x0 < x1 and y0 < y1, all within [0, 1]. The backbone adapter maps them onto its vision tokens through its
processor's geometry (models/box_tokens.py). The synthetic scenes give every sample the same two lists: the
patches of the objects its question is about, and of the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Box = tuple[float, float, float, float]
FIELDS = ("relevant_boxes", "distractor_boxes")


@dataclass(frozen=True)
class Relevance:
    """What a sample's questions are about: ``relevant`` boxes, and optionally ``distractors``. The tokens labelled
    irrelevant (trainers/training/losses.irrelevant_tokens) are those no relevant box covers: all of them, or, when
    ``distractors`` are given, those that a distractor box covers (the rest of the image is left unlabelled)."""

    relevant: tuple[Box, ...] = ()
    distractors: tuple[Box, ...] | None = None


def parse_boxes(value: Any, field: str) -> tuple[Box, ...]:
    """The boxes of a record's ``field``; ValueError naming the first bad box and the expected format."""
    if not isinstance(value, list):
        raise ValueError(f"'{field}' must be a list of [x0, y0, x1, y1] boxes, got {type(value).__name__}")
    boxes = []
    for i, box in enumerate(value):
        numbers = isinstance(box, (list, tuple)) and len(box) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        if not numbers or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise ValueError(f"'{field}'[{i}] is {box!r}: a box is [x0, y0, x1, y1] in fractions of the image's width "
                             "and height, 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        boxes.append(tuple(float(v) for v in box))
    return tuple(boxes)


def parse_relevance(record: dict) -> Relevance | None:
    """The record's relevance boxes, or None when it has none (no relevant and no distractor box: no label)."""
    relevant = parse_boxes(record["relevant_boxes"], FIELDS[0]) if record.get(FIELDS[0]) is not None else ()
    distractors = parse_boxes(record[FIELDS[1]], FIELDS[1]) if record.get(FIELDS[1]) is not None else None
    if not relevant and not distractors:
        return None
    return Relevance(relevant, distractors)
