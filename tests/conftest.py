"""Shared fixtures: tiny LLaVA models built from configs, like transformers' own tests (builders: tests/helpers.py)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from data.processors import word_level_processor  # noqa: E402
from models.backbones import load_backbone  # noqa: E402
from tests.helpers import SHIPPED_BACKBONE, llava_like  # noqa: E402


@pytest.fixture(scope="session")
def processor():
    """The tiny backbone's processor: 96 px images, 8 px patches, 144 image placeholders."""
    return word_level_processor()


@pytest.fixture(scope="session")
def shipped_backbone():
    """The shipped, trained tiny backbone (read only): its attention is sharp, as a real model's is."""
    return load_backbone(SHIPPED_BACKBONE)


@pytest.fixture(scope="session")
def llava15_folder(tmp_path_factory):
    """llava-1.5's layout (336 px, 14 px patches: 576 vision tokens) at toy widths, saved with save_pretrained."""
    model, processor = llava_like(336, 14)
    folder = tmp_path_factory.mktemp("llava15-like")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A random-init tiny LLaVA (96 px / 8 px patches = 144 vision tokens, 4 decoder layers) saved to disk."""
    model, processor = llava_like(96, 8, text_layers=4, seed=3)
    folder = tmp_path_factory.mktemp("tiny-random")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory, tiny_folder):
    """The output folder of a finished 4-step ``main.py`` run on ``tiny_folder`` (checkpoints at steps 2 and 4,
    pruned_best/ and pruned_final/). Read only: a test that changes it works on a copy."""
    import main as entry
    from tests.helpers import main_args

    args, out = main_args(tmp_path_factory.mktemp("run"), tiny_folder)
    assert entry.main(args) == 0
    return out
