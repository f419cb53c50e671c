import dataclasses
from collections import Counter

import numpy as np
import pytest

from configs.schema import DataSettings
from data.build import build_datasets, build_test_set
from data.synthetic_vqa import (COLORS, COUNT_WORDS, GRID, PATCH, QUESTION_TYPES, SHAPES, SyntheticVQADataset,
                                ROW_NAMES, make_sample, patch_index, patch_labels, question_objects)


def answer_from_scene(sample):
    """The answer recomputed from the scene alone, independently of the generator's branches."""
    words = sample.question.rstrip(" ?").split()
    objs = sample.objects
    if sample.question_type == "color_at":
        (obj,) = [o for o in objs if ROW_NAMES[o.region[0]] == words[-2]]  # the asked row holds one object
        return obj.color
    if sample.question_type == "shape_of":
        (obj,) = [o for o in objs if o.color == words[4]]
        return obj.shape
    if sample.question_type == "count":
        return COUNT_WORDS[sum(o.color == words[2] for o in objs)]
    if sample.question_type == "exists":
        return "yes" if any(o.color == words[3] and o.shape == words[4] for o in objs) else "no"
    (obj,) = [o for o in objs if o.color == words[4]]
    return ROW_NAMES[obj.region[0]]


def test_answers_follow_from_the_scene():
    data = SyntheticVQADataset(400, "train", seed=3)
    for i in range(len(data)):
        sample = data[i]
        assert sample.answer == answer_from_scene(sample), sample
        regions = [o.region for o in sample.objects]
        assert len(regions) == len(set(regions)), "one object per region"


@pytest.mark.parametrize("seed", [3, 8])
def test_question_objects_answer_the_question_and_leave_distractors_out(seed):
    """The answer read off the question's objects alone is the answer; every type has distractors left out, and a
    shape or row question keeps exactly its one object."""
    data = SyntheticVQADataset(300, "eval", seed=seed)
    left_out = Counter()
    for i in range(len(data)):
        sample = data[i]
        kept = question_objects(sample)
        assert set(kept) <= set(sample.objects)
        assert answer_from_scene(dataclasses.replace(sample, objects=kept)) == sample.answer, sample
        if sample.question_type in ("shape_of", "row_of", "color_at"):
            assert len(kept) == 1
        left_out[sample.question_type] += len(sample.objects) - len(kept)
    assert all(left_out[t] > 0 for t in QUESTION_TYPES), left_out
    assert patch_index(data[0].objects[0]) == data[0].objects[0].patch[0] * GRID + data[0].objects[0].patch[1]


def test_pixels_show_the_objects_and_nothing_else():
    sample = make_sample(0, "eval", 7)
    pixels = np.asarray(sample.image).astype(float)
    assert pixels.shape == (GRID * PATCH, GRID * PATCH, 3)
    object_patches = {o.patch: o for o in sample.objects}
    for r in range(GRID):
        for c in range(GRID):
            patch = pixels[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]
            brightest = patch.reshape(-1, 3).max(0)
            if (r, c) in object_patches:
                expected = np.array(COLORS[object_patches[(r, c)].color])
                assert np.abs(brightest - expected).max() < 40
            else:
                assert brightest.max() < 80, "background only"
    colors, shapes = patch_labels(sample.objects)
    assert (colors > 0).sum() == len(sample.objects) == (shapes > 0).sum()


def test_deterministic_and_splits_differ():
    a, b = make_sample(0, "train", 5), make_sample(0, "train", 5)
    assert (a.question, a.answer, a.objects) == (b.question, b.answer, b.objects)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert make_sample(0, "eval", 5).objects != a.objects
    with pytest.raises(ValueError, match="unknown split"):
        make_sample(0, "test", 0)


def test_a_run_evaluates_on_the_validation_split_apart_from_the_test_questions():
    settings = DataSettings(source="synthetic", synthetic_eval_size=40, seed=3)
    _, validation = build_datasets(settings)
    test = build_test_set(settings)
    assert (validation.split, test.split, len(validation), len(test)) == ("validation", "eval", 40, 40)
    images = lambda data: {np.asarray(data[i].image).tobytes() for i in range(len(data))}
    assert not images(validation) & images(test)  # no checkpoint is chosen on a question the benchmark reports


def test_answers_are_balanced_and_the_majority_answer_scores_low():
    data = SyntheticVQADataset(2000, "eval", seed=0)
    samples = [data[i] for i in range(len(data))]
    types = Counter(s.question_type for s in samples)
    assert set(types) == set(QUESTION_TYPES) and max(types.values()) - min(types.values()) <= 1
    majority = Counter(s.answer for s in samples).most_common(1)[0][1] / len(samples)
    assert majority < 0.15
    for qtype in QUESTION_TYPES:
        answers = Counter(s.answer for s in samples if s.question_type == qtype)
        assert max(answers.values()) / sum(answers.values()) < 0.6, (qtype, answers)
    shapes = Counter(s.answer for s in samples if s.question_type == "shape_of")
    assert set(shapes) == set(SHAPES)


def test_most_vision_tokens_are_background():
    data = SyntheticVQADataset(200, "train", seed=0)
    mean_objects = np.mean([len(data[i].objects) for i in range(len(data))])
    assert mean_objects / GRID**2 < 0.05
