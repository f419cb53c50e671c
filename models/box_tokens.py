"""Which vision tokens a region of the image covers: the geometry behind relevance boxes.

A box is ``(x0, y0, x1, y1)`` in fractions of the original image's width and height (top left is (0, 0)).
Each backbone adapter lays its vision tokens out as rectangles in the same coordinates
(``LlavaBackbone.patch_boxes``): the patch each token sees, traced back through the processor's
resize, pad and crop steps with a :class:`Frame`. :func:`covered` is the overlap rule that turns
boxes into token labels. Pure functions, no transformers: the adapters hold what the processors do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A token is covered when a box overlaps its patch by more than this fraction of the patch's width and of its height:
# a positive overlap, less a sliver of a hundredth of a patch that rounding (boxes written with two decimals, a resize
# to whole pixels) can create where a box's edge meets a patch's edge.
MIN_OVERLAP = 0.01


@dataclass(frozen=True)
class Frame:
    """Where a point (x, y) of the original image, in fractions of its width and height, lands in the pixels of a
    processed image: ``(x * sx + ox, y * sy + oy)``. A resize scales a frame, a pad or a crop shifts it."""

    sx: float
    sy: float
    ox: float = 0.0
    oy: float = 0.0

    def resized(self, kx: float, ky: float) -> "Frame":
        """The frame after the image is resized by ``kx`` in width and ``ky`` in height."""
        return Frame(self.sx * kx, self.sy * ky, self.ox * kx, self.oy * ky)

    def shifted(self, dx: float, dy: float) -> "Frame":
        """The frame after the image moves by (dx, dy) pixels: a pad before it (positive) or a crop (negative)."""
        return Frame(self.sx, self.sy, self.ox + dx, self.oy + dy)


def patch_rects(frame: Frame, rows: int, cols: int, patch: float) -> torch.Tensor:
    """(rows x cols, 4) float64: the ``patch``-pixel squares of a grid that starts at the processed image's top left,
    row-major, as rectangles (x0, y0, x1, y1) of the original image (outside [0, 1] where a patch holds padding)."""
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    x0, y0 = (c.flatten() * patch - frame.ox) / frame.sx, (r.flatten() * patch - frame.oy) / frame.sy
    return torch.stack([x0, y0, x0 + patch / frame.sx, y0 + patch / frame.sy], dim=1)


def covered(patches: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N,) bool: True at the patches (N, 4) that some box (M, 4) overlaps by more than MIN_OVERLAP of the patch's
    width and of its height. Boxes that only touch a patch's edge, or end within a hundredth of a patch past it, do
    not cover it."""
    if boxes.numel() == 0:
        return torch.zeros(patches.shape[0], dtype=torch.bool)
    p, b = patches[:, None].double(), boxes[None].double()  # (N, 1, 4), (1, M, 4)
    width = (torch.minimum(p[..., 2], b[..., 2]) - torch.maximum(p[..., 0], b[..., 0])) / (p[..., 2] - p[..., 0])
    height = (torch.minimum(p[..., 3], b[..., 3]) - torch.maximum(p[..., 1], b[..., 1])) / (p[..., 3] - p[..., 1])
    return ((width > MIN_OVERLAP) & (height > MIN_OVERLAP)).any(dim=1)  # (N,)
