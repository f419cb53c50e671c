"""Pictures of what pruning keeps: the image, then the patches that survive the merger and each pruning stage.

``kept_patch_grids`` reads a hard prefill's ``kept_positions`` (PrunedOutput); ``model_view`` gives the
image as the vision tower sees it; ``strip`` lays them side by side with the dropped patches darkened
(the array TensorBoard's ``add_image`` takes); scripts/predict.py draws the same grids with titles.
"""

from __future__ import annotations

import numpy as np
import torch

DROPPED_BRIGHTNESS = 0.2  # a dropped patch is shown at 20% of its brightness


def kept_patch_grids(kept_positions: list[torch.Tensor], input_ids: torch.Tensor, image_token_id: int,
                     num_patches: int, sample: int = 0) -> list[torch.Tensor]:
    """Per stage (the LLM's input, then after each pruning layer): a (side, side) bool grid of ``sample``'s kept
    patches. ``kept_positions``: per stage (B, k) sequence positions of the kept vision tokens."""
    side = int(num_patches ** 0.5)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} vision tokens do not form a square grid of patches")
    first = int((input_ids[sample] == image_token_id).nonzero()[0])  # the sample's first image placeholder
    grids = []
    for positions in kept_positions:
        grid = torch.zeros(num_patches, dtype=torch.bool)
        grid[(positions[sample].cpu() - first).clamp(0, num_patches - 1)] = True
        grids.append(grid.view(side, side))
    return grids


def model_view(pixel_values: torch.Tensor, image_processor, sample: int = 0) -> np.ndarray:
    """(H, W, 3) in [0, 1]: the image as the vision tower sees it (resized and cropped), de-normalised."""
    mean = np.asarray(image_processor.image_mean, dtype=np.float32)
    std = np.asarray(image_processor.image_std, dtype=np.float32)
    return (pixel_values[sample].float().cpu().numpy().transpose(1, 2, 0) * std + mean).clip(0, 1)


def darkened(pixels: np.ndarray, grid: torch.Tensor) -> np.ndarray:
    """``pixels`` (H, W, 3) with the patches not kept in ``grid`` (side, side) darkened."""
    cell_h, cell_w = pixels.shape[0] // grid.shape[0], pixels.shape[1] // grid.shape[1]
    cells = np.kron(grid.numpy().astype(np.float32), np.ones((cell_h, cell_w), np.float32))
    shown = pixels.copy()
    shown[:cells.shape[0], :cells.shape[1]] *= DROPPED_BRIGHTNESS + (1 - DROPPED_BRIGHTNESS) * cells[..., None]
    return shown


def strip(pixels: np.ndarray, grids: list[torch.Tensor], gap: int = 2) -> np.ndarray:
    """(H, W * (1 + stages) + gaps, 3) uint8: the image, then each stage's kept patches, separated by white."""
    separator = np.ones((pixels.shape[0], gap, 3), np.float32)
    panels = [pixels]
    for grid in grids:
        panels += [separator, darkened(pixels, grid)]
    return (np.concatenate(panels, axis=1) * 255).round().astype(np.uint8)
