"""The adapter for LLaVA-NeXT (``model_type: llava_next``, `LlavaNextForConditionalGeneration`, transformers 5.x).

Only what differs from LLaVA-1.5 (models/llava_backbone.py) is here: the vision tower,
projector and language model sit at the same attribute paths, so the decoder layers, rotary
embeddings, KV cache and attention recomputation are LLaVA-1.5's. What differs is the image:

- any resolution: the processor cuts an image into crops of the tower's size, ``pixel_values``
  (B, crops, 3, S, S) with ``image_sizes`` (B, 2), the original (height, width). Crop 0 is the
  whole image resized (the base); crops 1.. tile the best of ``image_grid_pinpoints``,
  row-major; an image with fewer crops than the batch's largest is padded with zero crops.
- the layout of an image's placeholders (stock ``pack_image_features``): the base crop's P
  tokens, then the tiles' patch grid (rows of tiles x patches) with the letterbox padding
  removed (``unpad_image``), row by row, each row followed by ``image_newline``, a learned
  vector of the language model's width. So an image takes P + H'W' + H' placeholders, and
  images of different sizes take different numbers.
- the projector acts on each token alone, so the vision features can be merged and pruned
  before it, and packing the projected tokens into their slots equals the stock order.

Here the vision tokens (what the merger and pruners select among) are the P + H'W' patch
features; the row-end ``image_newline`` tokens are layout, kept like text (never merged or
pruned: they mark where each row of the grid ends, whatever is left of the row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from models.box_tokens import Frame, patch_rects
from models.llava_backbone import BackboneShape, ImageFeatures, LlavaBackbone, VisionAttention
from models.sequences import compact


@dataclass(frozen=True)
class ImageLayout:
    """One image size's placeholders: how many crops it has, and for each placeholder the index of its feature in
    the image's flattened (crops x P) features, or -1 for a row-end ``image_newline``."""

    crops: int
    source: torch.Tensor  # (placeholders,) long


class LlavaNextBackbone(LlavaBackbone):
    model_type = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"
    image_input_keys = ("image_sizes",)
    one_patch_grid = False  # a base crop and a tile grid of the image's own size
    variable_token_count = True

    def __init__(self, model, processor=None, freeze: bool = True):
        super().__init__(model, processor, freeze)
        if model.config.vision_feature_select_strategy != "default":
            raise ValueError("LLaVA-NeXT packs its crops' patch grids without the CLS token: "
                             "vision_feature_select_strategy must be 'default'")
        self._layouts = lru_cache(maxsize=256)(self._layout)

    @staticmethod
    def pinpoint_tokens(config, pinpoint: list[int]) -> int:
        """The most vision features an image laid out on ``pinpoint`` (height, width) can have."""
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        return side * side * (1 + (pinpoint[0] // vision.image_size) * (pinpoint[1] // vision.image_size))

    @classmethod
    def bound_config(cls, config, max_vision_tokens: int | None, image_max_size: int | None) -> None:
        """Keep the ``image_grid_pinpoints`` (the resolutions an image is laid out on) that give at most
        ``max_vision_tokens`` features and sides of at most ``image_max_size`` px: the processor picks among them,
        so both bound the tokens, and so the memory, of every image."""
        pinpoints = [p for p in config.image_grid_pinpoints
                     if (max_vision_tokens is None or cls.pinpoint_tokens(config, p) <= max_vision_tokens)
                     and (image_max_size is None or max(p) <= image_max_size)]
        if not pinpoints:
            fewest = min(config.image_grid_pinpoints, key=lambda p: cls.pinpoint_tokens(config, p))
            raise ValueError(f"data_settings.max_vision_tokens ({max_vision_tokens}) / image_max_size ({image_max_size}) "
                             f"leave none of LLaVA-NeXT's image_grid_pinpoints {config.image_grid_pinpoints}: the "
                             f"smallest, {fewest}, gives {cls.pinpoint_tokens(config, fewest)} vision tokens with sides "
                             f"up to {max(fewest)} px; raise them (or set them to null)")
        config.image_grid_pinpoints = pinpoints

    def apply_bounds(self, max_vision_tokens: int | None, image_max_size: int | None) -> None:
        super().apply_bounds(max_vision_tokens, image_max_size)
        if self.processor is not None:  # the processor counts the placeholders on the same grid
            self.processor.image_processor.image_grid_pinpoints = list(self.config.image_grid_pinpoints)
        self._layouts.cache_clear()

    @classmethod
    def shape_from_config(cls, config) -> BackboneShape:
        """``num_vision_tokens``: the most patch features one image can have (the largest pinpoint, nothing unpadded);
        ``image_size``: the largest side among the pinpoints."""
        most = max(cls.pinpoint_tokens(config, p) for p in config.image_grid_pinpoints)
        largest = max(max(pair) for pair in config.image_grid_pinpoints)
        return BackboneShape(config.text_config.num_hidden_layers, most, largest,
                             getattr(config.text_config, "max_position_embeddings", None))

    # ----- layout -----
    def _layout(self, height: int, width: int) -> ImageLayout:
        config = self.config
        size = config.vision_config.image_size
        side = size // config.vision_config.patch_size
        per_crop = side * side
        rows, cols = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, size)
        r, c = torch.meshgrid(torch.arange(rows * side), torch.arange(cols * side), indexing="ij")
        # the tiles' patch grid, each entry the index of its feature: crop 1 + tile, then its patch in that crop
        index = (1 + (r // side) * cols + c // side) * per_crop + (r % side) * side + c % side
        grid = unpad_image(index[None], torch.tensor([height, width]))[0]  # (H', W')
        ends = torch.full((grid.shape[0], 1), -1, dtype=torch.long)
        source = torch.cat([torch.arange(per_crop), torch.cat([grid, ends], dim=1).flatten()])
        return ImageLayout(1 + rows * cols, source)

    def patch_boxes(self, width: int, height: int) -> torch.Tensor:
        """As LLaVA-1.5's, for the image's features in placeholder order (row ends left out), through
        LlavaNextImageProcessor's get_image_patches: the base crop is the whole image squeezed to the processor's size;
        the tiles cut the image resized into the best of the grid pinpoints (its aspect kept, centred on zero padding),
        row-major; then every crop goes through the resize and centre crop."""
        vision, size = self.config.vision_config, self.processor.image_processor.size
        tile = vision.image_size
        base_height, base_width = ((size["height"], size["width"]) if size.get("height")
                                   else (size["shortest_edge"], size["shortest_edge"]))
        frames = [self._resize_and_crop(Frame(base_width, base_height), base_height, base_width)]
        best_height, best_width = select_best_resolution((height, width), self.config.image_grid_pinpoints)
        fit_height, fit_width = fitted_size(height, width, best_height, best_width)
        canvas = Frame(fit_width, fit_height).shifted((best_width - fit_width) // 2, (best_height - fit_height) // 2)
        frames += [self._resize_and_crop(canvas.shifted(-c * tile, -r * tile), tile, tile)
                   for r in range(best_height // tile) for c in range(best_width // tile)]
        grid = tile // vision.patch_size
        rects = torch.cat([patch_rects(frame, grid, grid, vision.patch_size) for frame in frames])  # (crops x P, 4)
        source = self._layouts(height, width).source
        return rects[source[source >= 0]]

    def layouts(self, image_sizes: torch.Tensor) -> list[ImageLayout]:
        return [self._layouts(int(h), int(w)) for h, w in image_sizes.tolist()]

    def _slot_sources(self, input_ids: torch.Tensor, image_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P) positions of each sample's placeholders (left-aligned, compact) and (B, P) their feature sources
        (-1: a row end, -2: padding)."""
        layouts = self.layouts(image_sizes)
        placeholders, valid = compact(self.image_token_mask(input_ids))  # (B, P)
        counts = valid.sum(dim=1).tolist()
        if len(layouts) != input_ids.shape[0]:
            raise ValueError(f"{len(layouts)} image sizes for {input_ids.shape[0]} samples: LLaVA-NeXT runs here with "
                             "one image per sample")
        wrong = [(b, n, len(layout.source)) for b, (n, layout) in enumerate(zip(counts, layouts))
                 if n != len(layout.source)]
        if wrong:
            raise ValueError("image placeholders and image features do not match: (sample, placeholders, the image's "
                             f"layout) {wrong}; the processor's patch_size, vision_feature_select_strategy, "
                             "num_additional_image_tokens or image_grid_pinpoints disagree with the model")
        sources = torch.nn.utils.rnn.pad_sequence([layout.source for layout in layouts], batch_first=True,
                                                  padding_value=-2)
        return placeholders, sources.to(input_ids.device)

    # ----- the interface -----
    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> ImageFeatures:
        """The patch features of every image in placeholder order (row ends left out), padded to the longest."""
        crops, gather = self._crops_and_order(pixel_values, image_sizes)
        features = self._select_vision_tokens(self._vision_hidden_states(crops)[-1])  # (crops, P, Dv)
        return ImageFeatures(*gather(features))

    def vision_features_with_attention(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> VisionAttention:
        """:meth:`image_features` with each token's keys and the attention its own crop's CLS token pays to it, at
        the layer that produced the features (what ToMe and VisionZip read; LlavaBackbone's recipe, per crop)."""
        crops, gather = self._crops_and_order(pixel_values, image_sizes)
        features, cls_attention, keys = self._vision_tokens_with_attention(crops)
        (features, valid), (cls_attention, _), (keys, _) = gather(features), gather(cls_attention[..., None]), gather(keys)
        return VisionAttention(features, cls_attention[..., 0], keys, valid)

    def _crops_and_order(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor):
        """The real crops of the batch (sum of crops, 3, S, S) and a function that turns per-crop tokens
        (crops, P, C) into each image's tokens in placeholder order, padded: ((B, N, C), (B, N) valid)."""
        layouts = self.layouts(image_sizes)
        counts = [layout.crops for layout in layouts]
        crops = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, counts)])  # (sum of crops, 3, S, S)
        per_crop = (self.config.vision_config.image_size // self.config.vision_config.patch_size) ** 2
        starts = (torch.tensor([0, *counts[:-1]]).cumsum(0) * per_crop).tolist()  # each image's first token
        sources = [layout.source[layout.source >= 0] + start for layout, start in zip(layouts, starts)]
        index = torch.nn.utils.rnn.pad_sequence(sources, batch_first=True, padding_value=-1).to(pixel_values.device)
        valid = index >= 0

        def gather(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            flat = tokens.flatten(0, 1)  # (sum of crops x P, C)
            return flat[index.clamp_min(0)] * valid.unsqueeze(-1).to(flat.dtype), valid

        return crops, gather

    def feature_slots(self, input_ids: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        placeholders, sources = self._slot_sources(input_ids, image_sizes)
        return torch.zeros_like(input_ids, dtype=torch.bool).scatter(1, placeholders, sources >= 0)

    def embed_prompt(self, input_ids: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Token embeddings with ``image_newline`` at every row end."""
        embeds = self.embed_tokens(input_ids)
        placeholders, sources = self._slot_sources(input_ids, image_sizes)
        ends = torch.zeros_like(input_ids, dtype=torch.bool).scatter(1, placeholders, sources == -1)
        newline = self.model.model.image_newline.to(embeds.dtype)
        return torch.where(ends.unsqueeze(-1), newline, embeds)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("LLaVA-NeXT's features depend on each image's size: call image_features(pixel_values, "
                                  "image_sizes)")

    def encoder_flops(self, projected: int) -> int:
        raise NotImplementedError("LLaVA-NeXT's vision tower runs once per crop: its FLOPs depend on the image size")


def fitted_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """The (height, width) of a height x width image resized to fit target_height x target_width with its aspect kept
    (copied from transformers' image_processing_utils.get_patch_output_size, which takes the image itself)."""
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)
