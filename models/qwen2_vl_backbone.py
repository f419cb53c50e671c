"""The adapter for Qwen2-VL and Qwen2.5-VL (``model_type: qwen2_vl`` / ``qwen2_5_vl``, transformers 5.x).

Only what differs from LLaVA-1.5 (models/llava_backbone.py) is here. The language model sits
at the same path (``model.model.language_model``: ``embed_tokens``, ``layers``, ``norm``,
``rotary_emb``; q/k/v projections with biases, no q/k norm, so the attention rows are
recomputed as for Llama) and ``model.lm_head`` maps to the vocabulary. What differs:

- dynamic resolution: the processor resizes each image to a multiple of patch x merge px
  within ``size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}`` (pixel areas)
  and gives ``pixel_values`` (all images' patches, flattened) with ``image_grid_thw`` (t, h, w
  in patches); an image takes t*h*w / merge^2 placeholders, so images of different sizes take
  different numbers.
- the vision tower (``model.model.visual``) runs on all images at once, its attention
  restricted to each image (and, for Qwen2.5-VL, to windows in most blocks, its tokens in
  window order); its ``merger`` (PatchMerger: a norm, then 2 x 2 neighbouring patches
  concatenated, then an MLP to the LLM width) is the projector.
- multimodal rotary positions: ``get_rope_index(input_ids, mm_token_type_ids, image_grid_thw,
  attention_mask)`` gives (3, B, T) positions (temporal, height, width; text tokens equal in
  all three), padding at 0; ``rotary_emb`` reads them. Generated tokens continue from the last
  prompt position + 1 in all three.

Where the merger sits: after the PatchMerger's norm and 2 x 2 grouping, before its MLP. One
vision token is one LLM token (a 2 x 2 patch group), as the placeholders count them, and the
MLP, the projector into the LLM width, runs on the merged tokens only, as LLaVA's projector
does; merging single patches before the grouping would break the 2 x 2 groups the MLP reads.
"""

from __future__ import annotations

import torch
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

from data.processors import image_only_processor
from models.box_tokens import Frame, patch_rects
from models.llava_backbone import BackboneShape, ImageFeatures, LlavaBackbone, VisionAttention

DEFAULT_MAX_TOKENS = 16384  # Qwen2-VL's processor default (max_pixels 12845056 at 28 px per token)


class Qwen2VLBackbone(LlavaBackbone):
    model_type = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
    image_input_keys = ("image_grid_thw", "mm_token_type_ids")
    one_patch_grid = False  # each image's own grid
    variable_token_count = True

    @staticmethod
    def check_config(config) -> None:
        """Nothing to refuse: the vision features are the tower's last layer, grouped as its merger groups them."""

    def stock_generate(self, **inputs) -> torch.Tensor:
        """The stock ``generate``; the model keeps the last call's ``rope_deltas``, cleared before and after."""
        self.model.model.rope_deltas = None
        try:
            return self.model.generate(**inputs)
        finally:
            self.model.model.rope_deltas = None

    @staticmethod
    def load_processor(name_or_path: str, **kwargs):
        return image_only_processor(AutoImageProcessor.from_pretrained(name_or_path, **kwargs),
                                    AutoTokenizer.from_pretrained(name_or_path, **kwargs))

    @staticmethod
    def shape_from_config(config) -> BackboneShape:
        """``num_vision_tokens``: the bound of the processor's resize (``max_vision_tokens``), or its default;
        ``image_size``: the side of a square image at that bound."""
        tokens = getattr(config, "max_vision_tokens", None) or DEFAULT_MAX_TOKENS
        vision = config.vision_config
        side = int((tokens ** 0.5)) * vision.patch_size * vision.spatial_merge_size
        return BackboneShape(config.text_config.num_hidden_layers, tokens, side,
                             getattr(config.text_config, "max_position_embeddings", None))

    @staticmethod
    def bound_config(config, max_vision_tokens: int | None, image_max_size: int | None) -> None:
        """Record the token bound: the processor resizes every image to at most that many tokens (and, with
        ``image_max_size``, to at most that side squared in area), so it bounds each image's memory."""
        vision = config.vision_config
        per_token = (vision.patch_size * vision.spatial_merge_size) ** 2  # pixels one LLM token covers
        bounds = [b for b in (max_vision_tokens, image_max_size and image_max_size ** 2 // per_token) if b]
        if bounds:
            config.max_vision_tokens = max(1, min(bounds))

    def apply_bounds(self, max_vision_tokens: int | None, image_max_size: int | None) -> None:
        super().apply_bounds(max_vision_tokens, image_max_size)
        tokens = getattr(self.config, "max_vision_tokens", None)
        if tokens and self.processor is not None:
            vision = self.config.vision_config
            size = dict(self.processor.image_processor.size)
            size["longest_edge"] = tokens * (vision.patch_size * vision.spatial_merge_size) ** 2
            size["shortest_edge"] = min(size.get("shortest_edge", 0), size["longest_edge"])
            self.processor.image_processor.size = size

    def patch_boxes(self, width: int, height: int) -> torch.Tensor:
        """As LLaVA-1.5's, one rectangle per LLM token (a merge x merge group of patches), in raster order: the
        processor resizes the whole image (its aspect nearly kept) to whole groups within its pixel bounds
        (smart_resize)."""
        processor = self.processor.image_processor
        unit = processor.patch_size * processor.merge_size  # px per LLM token, each way
        if processor.do_resize:
            height, width = smart_resize(height, width, factor=unit, min_pixels=processor.size["shortest_edge"],
                                         max_pixels=processor.size["longest_edge"])
        return patch_rects(Frame(width, height), height // unit, width // unit, unit)

    # ----- shapes -----
    @property
    def vision_tower(self):
        return self.model.model.visual

    @property
    def projector(self):
        return self.vision_tower.merger.mlp

    @property
    def merge_unit(self) -> int:
        return self.vision_tower.spatial_merge_size ** 2

    @property
    def vision_hidden_size(self) -> int:
        """The width of one pre-projector token: a 2 x 2 group of ViT patches, concatenated."""
        return self.vision_tower.merger.ln_q.weight.shape[0] * self.merge_unit

    @property
    def vision_layers_run(self) -> int:
        return len(self.vision_tower.blocks)

    # ----- vision -----
    def _patch_states(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """The ViT's output before the PatchMerger (sum of t*h*w, Dv), every 4 rows one 2 x 2 group, images in order
        and each in raster order of its groups (Qwen2.5-VL's window order undone)."""
        tower = self.vision_tower
        positions = get_vision_position_ids(image_grid_thw, tower.spatial_merge_size)
        full, longest = get_vision_attention_seqlens(image_grid_thw, tower.config)
        hidden = tower.patch_embed(pixel_values.to(self.dtype))
        if not hasattr(tower, "window_size"):  # Qwen2-VL: every block attends over the whole image
            rotary = tower.rotary_pos_emb(hidden, positions)
            for block in tower.blocks:
                hidden = block(hidden, cu_seqlens=full, max_seqlen=longest, position_embeddings=rotary)
            return hidden
        windows, window_seqlens = get_vision_window_index(image_grid_thw, spatial_merge_size=tower.spatial_merge_size,
                                                          window_size=tower.window_size, patch_size=tower.patch_size)
        n = hidden.shape[0]
        hidden = tower.permute_input_for_window_attn(hidden, windows, seq_len=n)
        rotary = tuple(tower.permute_input_for_window_attn(f, windows, seq_len=n)
                       for f in tower.rotary_pos_emb(hidden, positions))
        for i, block in enumerate(tower.blocks):
            seqlens = full if i in tower.fullatt_block_indexes else window_seqlens
            hidden = block(hidden, cu_seqlens=seqlens, max_seqlen=None, position_embeddings=rotary)
        unit = self.merge_unit
        return hidden.view(n // unit, unit, -1)[torch.argsort(windows)].reshape(n, -1)

    def _per_image(self, tokens: torch.Tensor, image_grid_thw: torch.Tensor) -> ImageFeatures:
        """(sum of N_i, C) tokens of all images -> (B, N, C) padded at the end, with (B, N) valid."""
        counts = (image_grid_thw.prod(dim=-1) // self.merge_unit).tolist()
        padded = torch.nn.utils.rnn.pad_sequence(list(tokens.split(counts)), batch_first=True)
        valid = torch.arange(padded.shape[1], device=tokens.device) < torch.tensor(counts, device=tokens.device)[:, None]
        return ImageFeatures(padded, valid)

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                       mm_token_type_ids: torch.Tensor | None = None) -> ImageFeatures:
        """Each image's 2 x 2 patch groups after the PatchMerger's norm, concatenated (what its MLP reads)."""
        merger = self.vision_tower.merger
        grouped = merger.ln_q(self._patch_states(pixel_values, image_grid_thw)).view(-1, self.vision_hidden_size)
        return self._per_image(grouped, image_grid_thw)

    def vision_features_with_attention(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                                       mm_token_type_ids: torch.Tensor | None = None) -> VisionAttention:
        """:meth:`image_features`, with themselves as ToMe's similarity (the tower has no CLS token, so VisionZip's
        dominant tokens are undefined: ``cls_attention`` is None)."""
        images = self.image_features(pixel_values, image_grid_thw)
        return VisionAttention(images.features, None, images.features, images.valid)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("Qwen2-VL's features depend on each image's grid: call image_features(pixel_values, "
                                  "image_grid_thw)")

    def encoder_flops(self, projected: int) -> int:
        raise NotImplementedError("Qwen2-VL's vision tower cost depends on each image's size")

    def append_text(self, image_inputs: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
        types = image_inputs["mm_token_type_ids"]  # (B, T): 0 text, 1 image
        return {**image_inputs, "mm_token_type_ids": torch.cat([types, types.new_zeros(types.shape[0], count)], dim=1)}

    # ----- positions -----
    def prompt_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor,
                         mm_token_type_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, 3) multimodal rotary positions (the stock ``get_rope_index``)."""
        positions, _ = self.model.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                                       attention_mask=attention_mask)  # (3, B, T)
        return positions.permute(1, 2, 0)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for (B, T, 3) positions."""
        return self.language_model.rotary_emb(hidden, position_ids.permute(2, 0, 1))

    def next_positions(self, last_positions: torch.Tensor, step: int) -> torch.Tensor:
        """(B, 1, 3): a generated token continues from the last prompt position + 1, the same in all three."""
        return (last_positions.amax(dim=-1) + 1 + step)[:, None, None].expand(-1, 1, 3)

    def run_layer(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor], cache=None) -> torch.Tensor:
        """As LLaVA's; the decoder reads its positions from ``position_embeddings`` (its ``position_ids`` are text
        positions for flash attention only, which a custom 4D mask does not use)."""
        return super().run_layer(index, hidden, attention_mask, None, position_embeddings, cache)


class Qwen2_5_VLBackbone(Qwen2VLBackbone):
    model_type = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
