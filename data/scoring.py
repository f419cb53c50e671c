"""Answer scoring: one function for every accuracy the project reports.

A generated answer is right when it equals the reference after normalisation: lower case,
punctuation dropped, articles (a, an, the) dropped, whitespace collapsed, and only the text
before the first newline kept (the VQA convention of normalised exact match).
"""

from __future__ import annotations

import re
import string

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    first_line = text.strip().split("\n", 1)[0].lower()
    words = _PUNCT.sub(" ", first_line).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def is_correct(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def accuracy_by_type(predictions: list[str], references: list[str], question_types: list[str]) -> dict[str, float]:
    """{"overall": acc, <type>: acc, ...} over aligned lists."""
    if not (len(predictions) == len(references) == len(question_types)):
        raise ValueError(f"lists differ in length: {len(predictions)}, {len(references)}, {len(question_types)}")
    if not predictions:
        raise ValueError("no predictions to score")
    hits: dict[str, list[bool]] = {}
    for pred, ref, qtype in zip(predictions, references, question_types):
        ok = is_correct(pred, ref)
        hits.setdefault("overall", []).append(ok)
        hits.setdefault(qtype, []).append(ok)
    return {k: sum(v) / len(v) for k, v in hits.items()}
