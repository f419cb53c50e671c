"""A held-out evaluation set cut from an instruction mixture that has none (LLaVA-665K).

The in-training evaluation scores short answers (data/scoring.py), so the held-out questions are
records whose first answer is a word or a phrase (the mixture's VQAv2, GQA, OCR-VQA and TextVQA
parts); each becomes a one-turn eval record, and its whole record leaves the training file, so no
held-out question is trained on. Images may still appear in both files through other records: the
backbone is frozen and the modules learn which tokens to keep, not the images' answers.
"""

from __future__ import annotations

import random


def is_short_answer(record: dict, max_answer_words: int) -> bool:
    """A record with an image whose first turn is a human question answered by at most ``max_answer_words`` words."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(record.get("image") if isinstance(record, dict) else None, str) or not isinstance(turns, list):
        return False
    if len(turns) < 2 or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
        return False
    human, gpt = turns[0], turns[1]
    return (human.get("from") == "human" and gpt.get("from") == "gpt"
            and 0 < len(gpt["value"].split()) <= max_answer_words)


def hold_out(records: list, size: int, max_answer_words: int = 3, seed: int = 0) -> tuple[list, list]:
    """(training records, eval records): ``size`` short-answer records drawn with ``seed``, each cut to its first
    turn for the eval file and left out of the training file; the training records keep the file's order."""
    candidates = [i for i, r in enumerate(records) if is_short_answer(r, max_answer_words)]
    if len(candidates) < size:
        raise ValueError(f"only {len(candidates)} records have an image and a first answer of at most "
                         f"{max_answer_words} words, fewer than the {size} asked for; lower the size or raise "
                         "the answer length")
    chosen = set(random.Random(seed).sample(candidates, size))
    held = [{**records[i], "conversations": records[i]["conversations"][:2]} for i in sorted(chosen)]
    return [r for i, r in enumerate(records) if i not in chosen], held
