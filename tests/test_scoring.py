import pytest

from data.scoring import accuracy_by_type, is_correct, normalize_answer


def test_normalisation():
    assert normalize_answer("  The Red.\nmore text") == "red"
    assert is_correct("Yes!", "yes") and not is_correct("yes no", "yes")


def test_accuracy_by_type():
    acc = accuracy_by_type(["red", "two", "no"], ["red", "three", "no"], ["color", "count", "exists"])
    assert acc == {"overall": pytest.approx(2 / 3), "color": 1.0, "count": 0.0, "exists": 1.0}
    with pytest.raises(ValueError):
        accuracy_by_type(["a"], [], [])
