"""Pictures of what pruning keeps: the image, then the patches that survive the merger and each pruning stage.

``kept_patch_grids`` reads a hard prefill's ``kept_positions`` (PrunedOutput); ``model_view`` gives the
image as the vision tower sees it; ``merged_into`` tints each patch by the merged token it went into;
``strip`` lays them side by side with the dropped patches darkened (the array TensorBoard's
``add_image`` takes); scripts/predict.py draws the same panels with titles.
"""

from __future__ import annotations

import math

import numpy as np
import torch

DROPPED_BRIGHTNESS = 0.2  # a dropped patch is shown at 20% of its brightness


def grid_side(num_patches: int) -> int | None:
    """The side of the square grid ``num_patches`` patches form, or None when they form none."""
    side = math.isqrt(num_patches)
    return side if side * side == num_patches else None


def _square_side(num_patches: int) -> int:
    side = grid_side(num_patches)
    if side is None:
        raise ValueError(f"{num_patches} vision tokens do not form a square grid of patches")
    return side


def kept_patches(positions: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                 num_patches: int) -> torch.Tensor:
    """(B, num_patches) bool: the patches one stage kept, from its (B, k) sequence positions of the kept vision
    tokens (-1: a padding slot, which keeps nothing), counted from each sample's first image placeholder."""
    first = (input_ids == image_token_id).long().argmax(dim=1, keepdim=True).to(positions.device)  # (B, 1)
    patch = (positions - first).clamp(0, num_patches - 1)
    kept = torch.zeros(positions.shape[0], num_patches, dtype=torch.bool, device=positions.device)
    return kept.scatter(1, patch, positions >= 0).cpu()


def kept_patch_grids(kept_positions: list[torch.Tensor], input_ids: torch.Tensor, image_token_id: int,
                     num_patches: int, sample: int = 0) -> list[torch.Tensor]:
    """Per stage (the LLM's input, then after each pruning layer): a (side, side) bool grid of ``sample``'s kept
    patches. ``kept_positions``: per stage (B, k) sequence positions of the kept vision tokens."""
    side = _square_side(num_patches)
    return [kept_patches(positions, input_ids, image_token_id, num_patches)[sample].view(side, side)
            for positions in kept_positions]


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


# twelve well-separated colours (a merged token's patches share one; neighbours in slot order differ)
PALETTE = np.array([[0.90, 0.10, 0.10], [0.10, 0.45, 0.90], [0.10, 0.75, 0.20], [0.95, 0.60, 0.00],
                    [0.60, 0.20, 0.80], [0.00, 0.80, 0.80], [0.95, 0.35, 0.70], [0.55, 0.35, 0.15],
                    [0.60, 0.80, 0.10], [0.15, 0.15, 0.55], [1.00, 0.90, 0.20], [0.45, 0.45, 0.45]], np.float32)


def merged_into(pixels: np.ndarray, slots: torch.Tensor) -> np.ndarray:
    """``pixels`` with each patch tinted by the merged token it went into (``slots`` (N,): MergeOutput.assignment
    of one image; one colour per token), the dropped ones (-1) darkened."""
    side = _square_side(len(slots))
    slots = slots.cpu().view(side, side).numpy()
    colours = np.where(slots[..., None] >= 0, PALETTE[slots % len(PALETTE)], 0.0)  # (side, side, 3)
    cell_h, cell_w = pixels.shape[0] // side, pixels.shape[1] // side
    tint = np.kron(colours, np.ones((cell_h, cell_w, 1), np.float32))
    kept = np.kron((slots >= 0).astype(np.float32), np.ones((cell_h, cell_w), np.float32))[..., None]
    shown = pixels.copy()
    region = shown[:tint.shape[0], :tint.shape[1]]
    region[:] = kept * (0.5 * region + 0.5 * tint) + (1 - kept) * DROPPED_BRIGHTNESS * region
    return shown


def strip(pixels: np.ndarray, grids: list[torch.Tensor], gap: int = 2, slots: torch.Tensor | None = None) -> np.ndarray:
    """(H, W * panels + gaps, 3) uint8: the image, what each patch merged into (with ``slots``), then each stage's
    kept patches, separated by white."""
    separator = np.ones((pixels.shape[0], gap, 3), np.float32)
    panels = [pixels]
    if slots is not None:
        panels += [separator, merged_into(pixels, slots)]
    for grid in grids:
        panels += [separator, darkened(pixels, grid)]
    return (np.concatenate(panels, axis=1) * 255).round().astype(np.uint8)
