"""Relevance boxes onto vision tokens: the overlap rule, each family's geometry against the pixels its processor
makes, and the synthetic scenes' labels through the same path.

The geometry checks draw a white box on a black image of odd size, run the family's image processor on it and on
the same image without the box, and read, for every vision token, how white its patch became. A token whose patch
holds a nearly white pixel must be marked; a marked token must hold some trace of the box (the resize blurs edges
by a pixel or two, so a patch the box only nears may hold a trace and stay unmarked)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil

from data.synthetic_vqa import GRID, SyntheticVQADataset, question_objects
from models.box_tokens import MIN_OVERLAP, Frame, covered, patch_rects
from models.llava_backbone import LlavaBackbone
from models.llava_next_backbone import LlavaNextBackbone
from models.qwen2_vl_backbone import Qwen2_5_VLBackbone
from models.tiny_llava import toy_llava_next, toy_qwen2_vl
from tests.helpers import llava_like
from trainers.training.losses import irrelevant_tokens

SIZES = [(151, 97), (67, 203), (233, 233)]  # (width, height): odd sizes, landscape, portrait, square
BOXES = [(0.1, 0.2, 0.45, 0.6), (0.55, 0.05, 0.97, 0.33), (0.3, 0.7, 0.62, 0.99)]  # (x0, y0, x1, y1), fractions
STRICT, TRACE = 0.9, 0.02  # whiteness of a pixel: nearly white (inside the box), some trace of it


def test_a_box_covers_the_patches_it_overlaps_by_more_than_a_sliver():
    patches = patch_rects(Frame(4, 1), 1, 4, 1)  # four patches side by side: [0, 0.25], [0.25, 0.5], ...
    assert covered(patches, torch.tensor([[0.25, 0.0, 0.5, 1.0]])).tolist() == [False, True, False, False]  # edges touch
    sliver, overlap = 0.25 * MIN_OVERLAP / 2, 0.25 * MIN_OVERLAP * 2
    assert covered(patches, torch.tensor([[0.25, 0.0, 0.5 + sliver, 1.0]])).tolist() == [False, True, False, False]
    assert covered(patches, torch.tensor([[0.25, 0.0, 0.5 + overlap, 1.0]])).tolist() == [False, True, True, False]
    assert covered(patches, torch.tensor([[0.6, 0.0, 0.61, 0.5]])).tolist() == [False, False, True, False]  # inside one
    assert covered(patches, torch.tensor([[0.0, 0.0, 0.1, 0.005]])).tolist() == [False] * 4  # thinner than a sliver
    assert not covered(patches, torch.zeros(0, 4)).any()
    two = torch.tensor([[0.0, 0.0, 0.2, 1.0], [0.8, 0.0, 1.0, 1.0]])
    assert covered(patches, two).tolist() == [True, False, False, True]


def whiteness(processor, image_size, box) -> tuple[np.ndarray, np.ndarray]:
    """The processed image with the box drawn less the one without, and per channel the factor that turns that
    difference into a share of white."""
    width, height = image_size
    plain = Image.new("RGB", image_size)
    drawn = plain.copy()
    x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    ImageDraw.Draw(drawn).rectangle([round(x0), round(y0), round(x1) - 1, round(y1) - 1], fill="white")
    pixels = [processor(images=[image], return_tensors="np")["pixel_values"] for image in (drawn, plain)]
    return pixels[0] - pixels[1], np.array(processor.image_std) * processor.rescale_factor * 255


def pixel_box(box, image_size):
    """The box as drawn: its edges on whole pixels."""
    width, height = image_size
    return (round(box[0] * width) / width, round(box[1] * height) / height,
            round(box[2] * width) / width, round(box[3] * height) / height)


def per_token_llava(processor, image_size, box, patch):
    diff, std = whiteness(processor, image_size, box)  # (1, 3, S, S)
    share = diff[0] * std[:, None, None]
    side = share.shape[-1] // patch
    return share.reshape(3, side, patch, side, patch).max(axis=(0, 2, 4)).reshape(-1)  # (side * side,) row-major


def per_token_next(backbone, image_size, box):
    processor = backbone.processor.image_processor
    diff, std = whiteness(processor, image_size, box)  # (1, crops, 3, S, S)
    share = diff[0] * std[None, :, None, None]
    patch = backbone.config.vision_config.patch_size
    crops, _, size, _ = share.shape
    side = size // patch
    per_patch = share.reshape(crops, 3, side, patch, side, patch).max(axis=(1, 3, 5)).reshape(-1)  # crops x P
    source = backbone.layouts(torch.tensor([image_size[::-1]]))[0].source
    return per_patch[source[source >= 0].numpy()]


def per_token_qwen(backbone, image_size, box):
    processor = backbone.processor.image_processor
    diff, std = whiteness(processor, image_size, box)  # (patches, C * T * p * p), 2 x 2 groups of patches in a row
    unit = processor.merge_size ** 2
    share = diff.reshape(-1, unit, 3, processor.temporal_patch_size * processor.patch_size ** 2) * std[:, None]
    return share.max(axis=(1, 2, 3))  # (tokens,) in raster order of the groups


def check_against_pixels(backbone, per_token, image_size, box):
    marked = backbone.box_tokens([pixel_box(box, image_size)], image_size).numpy()
    white = per_token(image_size, box)
    assert marked.shape == white.shape
    strict, trace = white >= STRICT, white >= TRACE
    assert not trace.all()  # the box is not all of the picture (a crop may cut it away wholly: then none is marked)
    assert not (strict & ~marked).any(), f"{image_size}, {box}: tokens inside the box left unmarked"
    assert not (marked & ~trace).any(), f"{image_size}, {box}: tokens marked that hold nothing of the box"


@pytest.mark.parametrize("image_size", SIZES)
@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("pad", [False, True], ids=["crop", "pad"])
def test_llava_1_5_boxes_follow_the_resize_and_the_crop_or_the_pad(image_size, box, pad):
    """LLaVA-1.5's shapes (336 px, 14 px patches): CLIP's shortest-edge resize and centre crop, which cuts the long
    side, or LlavaImageProcessor's pad to a square first."""
    model, processor = llava_like(336, 14, text_layers=1)
    sizes = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    image_processor = LlavaImageProcessorPil(**sizes, do_pad=True) if pad else CLIPImageProcessorPil(**sizes)
    backbone = LlavaBackbone(model, SimpleNamespace(image_processor=image_processor))
    check_against_pixels(backbone, lambda s, b: per_token_llava(image_processor, s, b, 14), image_size, box)


def test_a_box_the_crop_cuts_away_marks_nothing_and_the_cls_token_sees_everything():
    model, processor = llava_like(96, 8, text_layers=1)
    backbone = LlavaBackbone(model, processor)
    # a 192 x 96 image keeps its middle 96 x 96 px: the left quarter is cut away
    assert not backbone.box_tokens([(0.0, 0.0, 0.2, 1.0)], (192, 96)).any()
    model.config.vision_feature_select_strategy = "full"
    backbone._token_rects.cache_clear()
    marks = backbone.box_tokens([(0.0, 0.0, 0.2, 1.0)], (192, 96))
    assert marks.tolist() == [True] + [False] * 144  # the CLS token first


@pytest.fixture(scope="module")
def next_backbone():
    return LlavaNextBackbone(*toy_llava_next(1))


@pytest.fixture(scope="module")
def qwen_backbone():
    return Qwen2_5_VLBackbone(*toy_qwen2_vl("2.5", 1))


@pytest.mark.parametrize("image_size", SIZES)
@pytest.mark.parametrize("box", BOXES)
def test_llava_next_boxes_follow_the_base_image_and_the_tiles(next_backbone, image_size, box):
    """The base crop (the whole image squeezed) and the any-resolution tiles (the image fitted into the best grid
    pinpoint on padding, the padding unpadded from the layout)."""
    check_against_pixels(next_backbone, lambda s, b: per_token_next(next_backbone, s, b), image_size, box)


@pytest.mark.parametrize("image_size", SIZES)
@pytest.mark.parametrize("box", BOXES)
def test_qwen2_5_vl_boxes_follow_the_dynamic_grid_and_the_2x2_merge(qwen_backbone, image_size, box):
    check_against_pixels(qwen_backbone, lambda s, b: per_token_qwen(qwen_backbone, s, b), image_size, box)


def old_grid_labels(sample, side: int) -> torch.Tensor:
    """The synthetic labels as they were before boxes: the distractors' patches on the scenes' 12 x 12 grid,
    nearest-neighbour resized to the backbone's ``side`` x ``side`` tokens."""
    grid = torch.zeros(GRID, GRID)
    asked = set(question_objects(sample))
    for obj in sample.objects:
        grid[obj.patch] = float(obj not in asked)
    return torch.nn.functional.interpolate(grid[None, None], size=(side, side), mode="nearest")[0, 0].flatten() > 0.5


@pytest.mark.parametrize("patch", [8, 4], ids=["12x12", "24x24"])
def test_the_synthetic_labels_as_boxes_are_the_patch_grid_labels(patch):
    """The scenes' relevance boxes give, through the backbone's geometry, exactly the tokens of the patch-grid
    labels the learned method was measured with: the benchmark's labelled rows rest on the same labels."""
    backbone = LlavaBackbone(*llava_like(96, patch, text_layers=1))
    data = SyntheticVQADataset(40, "train", seed=5)
    samples = [data[i] for i in range(40)]
    side = 96 // patch
    irrelevant, relevant, labelled = irrelevant_tokens(backbone.box_tokens, [s.relevance for s in samples],
                                                       [s.image.size for s in samples],
                                                       torch.ones(40, side * side, dtype=torch.bool))
    assert labelled.all() and irrelevant.any() and relevant.any() and not (relevant & irrelevant).any()
    assert torch.equal(irrelevant, torch.stack([old_grid_labels(s, side) for s in samples]))
