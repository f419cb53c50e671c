import itertools

import pytest

from data import synthetic_vqa
from data.scoring import accuracy_by_type, is_correct, normalize_answer


@pytest.mark.parametrize("text, normalised", [
    ("  The Red.\nmore text", "red"),  # first line only, lower case, article and final period dropped
    ("Yes!", "yes"),
    # contractions written without the apostrophe are restored
    ("dont", "don't"), ("isnt", "isn't"), ("youre", "you're"), ("Wont", "won't"), ("don't", "don't"),
    # number words become digits; a period between digits and the digits of 1,000 stay together
    ("two", "2"), ("Zero", "0"), ("ten", "10"), ("none", "0"), ("3.5", "3.5"), ("1,000", "1000"),
    ("3.", "3"), ("2, 3", "2 3"),
    # other punctuation breaks words; periods elsewhere are dropped, quotes around a word too
    ("black-and-white", "black and white"), ("u.s.", "us"), ("'yes'", "yes"), ('"no"', "no"),
    ("left/right", "left right"),
    # articles are dropped before another word
    ("a dog", "dog"), ("An apple", "apple"), ("the two dogs", "2 dogs"),
    # a lone letter (a multiple-choice option) and an article ending the answer stay
    ("A", "a"), ("a", "a"), ("A.", "a"), ("(A)", "a"), ("B)", "b"), ("vitamin A", "vitamin a"),
    # empty answers
    ("", ""), ("   ", ""), ("?!", ""), (" . ", ""),
])
def test_normalisation_follows_the_vqa_rules(text, normalised):
    assert normalize_answer(text) == normalised


@pytest.mark.parametrize("prediction, reference, correct", [
    ("", "A", False), ("", "", False), ("...", "?", False),  # an empty prediction is never right
    ("a", "A", True), ("A.", "A", True), ("(A)", "A", True), ("(B)", "A", False),
    ("2", "two", True), ("Two.", "2", True), ("three", "2", False),
    ("dont know", "don't know", True), ("3.5", "35", False), ("1,000", "1000", True),
    ("The dog", "dog", True), ("Yes!", "yes", True), ("yes no", "yes", False),
])
def test_is_correct(prediction, reference, correct):
    assert is_correct(prediction, reference) is correct


def test_synthetic_answers_score_as_exact_word_match():
    """Every answer of the synthetic data normalises to something non-empty and is right against itself only, and
    any word of the data set's vocabulary (what its model can say) scores against an answer as plain word equality
    did before; number words and their digits agree."""
    answers = [*synthetic_vqa.COLORS, *synthetic_vqa.SHAPES, *synthetic_vqa.COUNT_WORDS, *synthetic_vqa.ROW_NAMES,
               "yes", "no"]
    assert set(answers) <= set(synthetic_vqa.vocabulary())
    samples = [synthetic_vqa.make_sample(0, "eval", i) for i in range(len(synthetic_vqa.QUESTION_TYPES) * 4)]
    assert {s.answer for s in samples} <= set(answers)
    assert all(normalize_answer(word) for word in answers)
    for prediction, reference in itertools.product(synthetic_vqa.vocabulary(), answers):
        assert is_correct(prediction, reference) is (prediction == reference), (prediction, reference)
    for digit, word in enumerate(synthetic_vqa.COUNT_WORDS):
        assert is_correct(str(digit), word) and is_correct(word, str(digit))


def test_accuracy_by_type():
    acc = accuracy_by_type(["red", "two", "no"], ["red", "three", "no"], ["color", "count", "exists"])
    assert acc == {"overall": pytest.approx(2 / 3), "color": 1.0, "count": 0.0, "exists": 1.0}
    with pytest.raises(ValueError):
        accuracy_by_type(["a"], [], [])
