"""Answer scoring: one function for every accuracy the project reports.

A generated answer is right when it equals the reference after the VQA evaluation's
normalisation (the published rules of the VQA v2 eval script, a subset of its tables): first
line only, lower case; commas inside numbers dropped, a period kept only between digits, an
apostrophe kept inside a word, any other punctuation a word break; number words as digits
("none" as "0"); apostrophe-less contractions restored ("dont"); articles (a, an, the)
dropped. Unlike the VQA script, an article ending the answer stays, so that a lone letter (a
multiple-choice option "A") keeps its meaning. An empty answer is never right.
"""

from __future__ import annotations

import re
import string

_NUMBER_COMMA = re.compile(r"(?<=\d),(?=\d)")  # "1,000" -> "1000"
_LOOSE_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # every period but the one in "3.5"
_BREAKS = re.compile("[" + re.escape(string.punctuation.replace(".", "").replace("'", "")) + "]")  # all but . and '
_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "im": "i'm", "isnt": "isn't", "ive": "i've", "mightnt": "mightn't",
    "mustnt": "mustn't", "shes": "she's", "shouldnt": "shouldn't", "shouldve": "should've", "thats": "that's",
    "theres": "there's", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't",
    "weve": "we've", "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't",
    "wouldnt": "wouldn't", "wouldve": "would've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def normalize_answer(text: str) -> str:
    first_line = text.strip().split("\n", 1)[0].lower()
    spaced = _BREAKS.sub(" ", _LOOSE_PERIOD.sub("", _NUMBER_COMMA.sub("", first_line)))
    words = [w.strip("'") for w in spaced.split()]
    words = [_CONTRACTIONS.get(w, _NUMBERS.get(w, w)) for w in words if w]
    # an article is dropped before another word only: "a dog" -> "dog", but "a" (option A) and "vitamin a" stay
    return " ".join(w for i, w in enumerate(words) if w not in _ARTICLES or i == len(words) - 1)


def is_correct(prediction: str, reference: str) -> bool:
    predicted = normalize_answer(prediction)
    return predicted != "" and predicted == normalize_answer(reference)


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
