"""Synthetic VQA: coloured shapes on a plain background, questions that need a few patches.

Image design (why it looks like this)
-------------------------------------
The image is a ``GRID x GRID`` board of ``PATCH``-pixel cells, exactly the vision tower's
patch grid (96 px, 8 px patches: 12 x 12 = 144 vision tokens). Every object is drawn inside
one patch, so one vision token carries one whole object (its colour *and* its shape) and all
other tokens are noisy background. The board is divided into 3 x 3 regions of 4 x 4 patches;
each region holds at most one object, placed on a random patch of that region. Typical
images hold 2-6 objects, so about 3% of the vision tokens carry the answer: a good pruner
can drop most tokens and keep the answer, a random pruner cannot. A tiny vision tower learns
to read one-patch objects quickly, which is what lets a small backbone pretrained on 2 CPU
cores reach high accuracy.

Positions are rows ("top", "middle", "bottom": the region rows), asked both ways: the
colour of the object in a row, and the row of an object of a colour. Rows, because the tiny
language model reads them (contiguous runs of the image tokens in LLaVA's row-major order);
columns and relations between two objects, which it did not learn, are left out (docs/data.md
tells the earlier designs).

Question types (single-word answers)
------------------------------------
==============  ===============================================  ==================
type            question                                          answers
==============  ===============================================  ==================
color_at        what color is the object in the top row?          6 colours
shape_of        what shape is the red object?                     4 shapes
count           how many red objects are there?                   zero .. three
exists          is there a red circle?                            yes / no
row_of          what row is the red object in?                    top / middle / bottom
==============  ===============================================  ==================

In a color_at scene the asked row holds only the target. Each sample draws its answer
first (uniformly), then builds a scene that makes it true, so answers are balanced within
each type; the types rotate with the sample index. Everything is a pure function of
``(seed, split, index)``.

Every sample knows what its question is about: ``relevance`` gives the boxes of its question's
objects and of the others (the distractors), the labels ``method_settings.relevance_weight`` trains on,
in the same form as LLaVA instruction records carry them (data/relevance.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.relevance import Box, Relevance

PATCH = 8
GRID = 12
IMAGE_SIZE = PATCH * GRID
REGIONS = 3
REGION_PATCHES = GRID // REGIONS

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("square", "circle", "triangle", "cross")
COUNT_WORDS = ("zero", "one", "two", "three")
ROW_NAMES = ("top", "middle", "bottom")
QUESTION_TYPES = ("color_at", "shape_of", "count", "exists", "row_of")
# eval: the questions benchmarks report; validation: those a training run evaluates on and picks pruned_best/ by
SPLITS = {"train": 0, "eval": 1, "validation": 2}
LABEL_STREAM = 1  # the random stream that decides which samples carry labels, apart from the scenes' own
BACKGROUND = (40, 40, 40)
NOISE_STD = 6.0


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    region: tuple[int, int]  # (row, col) of the 3 x 3 region
    patch: tuple[int, int]  # (row, col) of the patch on the 12 x 12 grid


@dataclass(frozen=True)
class VQASample:
    id: str
    image: Image.Image
    question: str
    answer: str
    question_type: str
    objects: tuple[SceneObject, ...]
    labelled: bool = True  # whether it carries its relevance boxes (SyntheticVQADataset's labelled_fraction)

    @property
    def relevance(self) -> Relevance | None:
        """The boxes of the objects the question is about and of the others (its distractors), or None for a
        sample left unlabelled."""
        if not self.labelled:
            return None
        asked = set(question_objects(self))
        return Relevance(tuple(object_box(o) for o in self.objects if o in asked),
                         tuple(object_box(o) for o in self.objects if o not in asked))


def object_box(obj: SceneObject) -> Box:
    """The object's patch as a box, in fractions of the image's width and height."""
    row, col = obj.patch
    return col / GRID, row / GRID, (col + 1) / GRID, (row + 1) / GRID


def color_at_question(row: int) -> str:
    return f"what color is the object in the {ROW_NAMES[row]} row ?"


def row_of_question(color: str) -> str:
    return f"what row is the {color} object in ?"


def vocabulary() -> list[str]:
    """Every word a prompt, question or answer of this data set can contain."""
    words = {"USER", "ASSISTANT", ":", "?", "what", "color", "is", "the", "object", "in", "shape",
             "how", "many", "objects", "are", "there", "a", "row"}
    words.update(COLORS, SHAPES, COUNT_WORDS, ROW_NAMES, ("yes", "no"))
    return sorted(words)


def _shape_mask(shape: str) -> np.ndarray:
    """(PATCH, PATCH) bool mask of a shape drawn inside one patch with a 1 px margin."""
    yy, xx = np.mgrid[0:PATCH, 0:PATCH] + 0.5
    c = PATCH / 2
    if shape == "square":
        return (np.abs(yy - c) < 3.01) & (np.abs(xx - c) < 3.01)
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= 3.2**2
    if shape == "triangle":  # apex up: width grows with the row
        return (yy >= 1) & (yy <= 7) & (np.abs(xx - c) <= (yy - 1) / 2 + 0.01)
    if shape == "cross":
        return ((np.abs(yy - c) < 1.01) | (np.abs(xx - c) < 1.01)) & (np.abs(yy - c) < 3.6) & (np.abs(xx - c) < 3.6)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


SHAPE_MASKS = {s: _shape_mask(s) for s in SHAPES}


def render(objects: tuple[SceneObject, ...], rng: np.random.Generator) -> Image.Image:
    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    pixels[:] = BACKGROUND
    for obj in objects:
        y, x = obj.patch[0] * PATCH, obj.patch[1] * PATCH
        cell = pixels[y : y + PATCH, x : x + PATCH]
        cell[SHAPE_MASKS[obj.shape]] = COLORS[obj.color]
    pixels += rng.normal(0.0, NOISE_STD, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def patch_labels(objects: tuple[SceneObject, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch class ids in row-major patch order: colour (0 = background, 1..6) and shape (0, 1..4)."""
    colors = np.zeros(GRID * GRID, dtype=np.int64)
    shapes = np.zeros(GRID * GRID, dtype=np.int64)
    color_ids = {c: i + 1 for i, c in enumerate(COLORS)}
    for obj in objects:
        k = patch_index(obj)
        colors[k] = color_ids[obj.color]
        shapes[k] = SHAPES.index(obj.shape) + 1
    return colors, shapes


class _SceneBuilder:
    """Places objects in free regions; each region holds at most one object."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.free = [(r, c) for r in range(REGIONS) for c in range(REGIONS)]
        self.objects: list[SceneObject] = []

    def add(self, color: str, shape: str, region: tuple[int, int] | None = None) -> SceneObject:
        if region is None:
            region = self.free[self.rng.integers(len(self.free))]
        elif isinstance(region, int):  # a row: any free region of it
            in_row = [r for r in self.free if r[0] == region]
            region = in_row[self.rng.integers(len(in_row))]
        self.free.remove(region)
        patch = (region[0] * REGION_PATCHES + int(self.rng.integers(REGION_PATCHES)),
                 region[1] * REGION_PATCHES + int(self.rng.integers(REGION_PATCHES)))
        obj = SceneObject(color, shape, region, patch)
        self.objects.append(obj)
        return obj

    def add_distractors(self, n: int, colors: list[str], forbid=lambda color, shape: False) -> None:
        """Add up to ``n`` objects with colours from ``colors`` that ``forbid`` does not reject."""
        for _ in range(n):
            if not self.free:
                return
            while True:
                color = colors[self.rng.integers(len(colors))]
                shape = SHAPES[self.rng.integers(len(SHAPES))]
                if not forbid(color, shape):
                    break
            self.add(color, shape)

    def pick(self, options):
        return options[self.rng.integers(len(options))]


def make_sample(seed: int, split: str, index: int) -> VQASample:
    """Sample ``index`` of ``split``: a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    b = _SceneBuilder(rng)
    colors = list(COLORS)
    n_extra = int(rng.integers(1, 5))  # distractors beyond the objects the question needs

    if qtype == "color_at":
        target = b.add(b.pick(colors), b.pick(SHAPES))
        b.free = [r for r in b.free if r[0] != target.region[0]]  # the asked row holds only the target
        b.add_distractors(n_extra, colors)
        question, answer = color_at_question(target.region[0]), target.color
    elif qtype == "shape_of":
        target = b.add(b.pick(colors), b.pick(SHAPES))
        b.add_distractors(n_extra, [c for c in colors if c != target.color])
        question, answer = f"what shape is the {target.color} object ?", target.shape
    elif qtype == "count":
        n = int(rng.integers(len(COUNT_WORDS)))
        color = b.pick(colors)
        for _ in range(n):
            b.add(color, b.pick(SHAPES))
        b.add_distractors(max(n_extra - n, 1 if n == 0 else 0), [c for c in colors if c != color])
        question, answer = f"how many {color} objects are there ?", COUNT_WORDS[n]
    elif qtype == "exists":
        color, shape = b.pick(colors), b.pick(SHAPES)
        present = bool(rng.integers(2))
        if present:
            b.add(color, shape)
        else:
            # A near miss (same colour or same shape) makes the question need both attributes.
            if rng.integers(2):
                b.add(color, b.pick([s for s in SHAPES if s != shape]))
            else:
                b.add(b.pick([c for c in colors if c != color]), shape)
        b.add_distractors(n_extra, colors, forbid=lambda c, s: c == color and s == shape)
        question, answer = f"is there a {color} {shape} ?", "yes" if present else "no"
    else:  # row_of
        target = b.add(b.pick(colors), b.pick(SHAPES), int(rng.integers(REGIONS)))
        b.add_distractors(n_extra, [c for c in colors if c != target.color])
        question, answer = row_of_question(target.color), ROW_NAMES[target.region[0]]

    objects = tuple(b.objects)
    return VQASample(
        id=f"{split}-{seed}-{index}",
        image=render(objects, rng),
        question=question,
        answer=answer,
        question_type=qtype,
        objects=objects,
    )


def question_objects(sample: VQASample) -> tuple[SceneObject, ...]:
    """The objects the sample's question is about (what a perfect question-aware pruner keeps): the object in the
    asked row (color_at), the objects of the asked colour (shape_of, count, row_of), the objects with the asked
    colour or the asked shape (exists: the near miss included). The others are distractors; the answer can be read
    off these alone (tests/test_synthetic_vqa.py)."""
    words = sample.question.split()
    if sample.question_type == "color_at":
        return tuple(o for o in sample.objects if ROW_NAMES[o.region[0]] in words)
    if sample.question_type == "exists":
        return tuple(o for o in sample.objects if o.color in words or o.shape in words)
    return tuple(o for o in sample.objects if o.color in words)


def patch_index(obj: SceneObject) -> int:
    """The object's vision token: its patch in row-major order."""
    return obj.patch[0] * GRID + obj.patch[1]


def scene_questions(objects: tuple[SceneObject, ...], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """One (type, question, answer) per question type that the scene can answer, answers read off the scene.

    Used to ask several questions about one image (multi-turn pretraining); unlike
    :func:`make_sample`, the answers are not balanced.
    """
    out = []
    color_counts = {c: sum(o.color == c for o in objects) for c in COLORS}
    alone = [o for o in objects if sum(p.region[0] == o.region[0] for p in objects) == 1]
    if alone:
        target = alone[rng.integers(len(alone))]
        out.append(("color_at", color_at_question(target.region[0]), target.color))
    unique = [o for o in objects if color_counts[o.color] == 1]
    if unique:
        obj = unique[rng.integers(len(unique))]
        out.append(("shape_of", f"what shape is the {obj.color} object ?", obj.shape))
    color = list(COLORS)[rng.integers(len(COLORS))]
    if color_counts[color] < len(COUNT_WORDS):
        out.append(("count", f"how many {color} objects are there ?", COUNT_WORDS[color_counts[color]]))
    obj = objects[rng.integers(len(objects))]
    color, shape = (obj.color, obj.shape) if rng.integers(2) else (list(COLORS)[rng.integers(len(COLORS))],
                                                                    SHAPES[rng.integers(len(SHAPES))])
    present = any(o.color == color and o.shape == shape for o in objects)
    out.append(("exists", f"is there a {color} {shape} ?", "yes" if present else "no"))
    if unique:
        obj = unique[rng.integers(len(unique))]
        out.append(("row_of", row_of_question(obj.color), ROW_NAMES[obj.region[0]]))
    return out


class SyntheticVQADataset:
    """A map-style data set of ``size`` samples of one split; samples are made on access.

    ``labelled_fraction``: the share of samples that carry their relevance boxes, each drawn from its own seed
    (the samples labelled at a fraction are among those labelled at any larger one); the rest carry none, as a
    mixture of records with and without boxes."""

    def __init__(self, size: int, split: str = "train", seed: int = 0, labelled_fraction: float = 1.0):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 <= labelled_fraction <= 1:
            raise ValueError(f"labelled_fraction must be in [0, 1], got {labelled_fraction}")
        self.size, self.split, self.seed, self.labelled_fraction = size, split, seed, labelled_fraction

    def is_labelled(self, index: int) -> bool:
        if self.labelled_fraction >= 1:
            return True
        draw = np.random.default_rng([self.seed, SPLITS[self.split], index, LABEL_STREAM]).random()
        return bool(draw < self.labelled_fraction)

    @property
    def labelled(self) -> int:
        """How many samples carry relevance boxes."""
        return sum(self.is_labelled(i) for i in range(self.size))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> VQASample:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        sample = make_sample(self.seed, self.split, index)
        return sample if self.is_labelled(index) else dataclasses.replace(sample, labelled=False)
