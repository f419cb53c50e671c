import numpy as np
import pytest
import torch

from trainers.inference.pictures import DROPPED_BRIGHTNESS, PALETTE, grid_side, kept_patch_grids, merged_into, strip


def test_grid_side_is_the_square_grids_side_or_none():
    assert [grid_side(n) for n in (1, 4, 144, 576)] == [1, 2, 12, 24]
    assert [grid_side(n) for n in (2, 5, 143, 577)] == [None] * 4


def test_kept_patch_grids_place_each_kept_position_on_its_patch():
    # sample 1's four image placeholders sit at positions 3..6 (a 2 x 2 grid); it keeps patches 0 and 3, then 3
    input_ids = torch.tensor([[7, 9, 9, 9, 9, 1, 1], [1, 1, 7, 9, 9, 9, 9]])
    kept = [torch.tensor([[1, 4], [3, 6]]), torch.tensor([[4], [6]])]
    grids = kept_patch_grids(kept, input_ids, image_token_id=9, num_patches=4, sample=1)
    assert [g.tolist() for g in grids] == [[[True, False], [False, True]], [[False, False], [False, True]]]
    with pytest.raises(ValueError, match="5 vision tokens do not form a square grid"):
        kept_patch_grids(kept, input_ids, image_token_id=9, num_patches=5)


def test_strip_darkens_exactly_the_dropped_patches():
    pixels = np.full((4, 4, 3), 0.5, np.float32)
    grid = torch.tensor([[True, False], [False, False]])
    picture = strip(pixels, [grid], gap=1)
    assert picture.shape == (4, 4 + 1 + 4, 3) and picture.dtype == np.uint8
    panel = picture[:, 5:]
    assert (panel[:2, :2] == 128).all()  # kept: as in the image
    assert (panel[2:, :] == round(0.5 * DROPPED_BRIGHTNESS * 255)).all() and (panel[:2, 2:] == 26).all()
    assert (picture[:, 4] == 255).all() and (picture[:, :4] == 128).all()


def test_merged_into_tints_each_patch_with_its_tokens_colour_and_darkens_the_dropped():
    pixels = np.full((4, 4, 3), 0.5, np.float32)
    shown = merged_into(pixels, torch.tensor([0, 0, 1, -1]))  # a 2 x 2 grid: two patches into token 0, one dropped
    np.testing.assert_allclose(shown[0, 0], 0.25 + 0.5 * PALETTE[0])
    np.testing.assert_allclose(shown[0, 3], 0.25 + 0.5 * PALETTE[0])  # same token, same colour
    np.testing.assert_allclose(shown[3, 0], 0.25 + 0.5 * PALETTE[1])
    np.testing.assert_allclose(shown[3, 3], 0.5 * DROPPED_BRIGHTNESS)
    assert strip(pixels, [], gap=1, slots=torch.tensor([0, 0, 1, -1])).shape == (4, 9, 3)
