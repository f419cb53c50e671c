"""The backbone families this project runs, by config.json's ``model_type``, and loading whichever a checkpoint is.

Each family is an adapter in a file of its own (models/llava_backbone.py and the subclasses that override what
differs); this registry is the one place that lists them, so the base adapter imports none of its subclasses.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig

from models.llava_backbone import BackboneNotFoundError, BackboneShape, LlavaBackbone, missing_backbone_message
from models.llava_next_backbone import LlavaNextBackbone
from models.qwen2_vl_backbone import Qwen2_5_VLBackbone, Qwen2VLBackbone

FAMILIES: dict[str, type[LlavaBackbone]] = {
    family.model_type: family for family in (LlavaBackbone, LlavaNextBackbone, Qwen2VLBackbone, Qwen2_5_VLBackbone)
}


def backbone_class(model_type: str, name_or_path: str = "the backbone") -> type[LlavaBackbone]:
    """config.json's model_type -> the adapter that runs it."""
    if model_type not in FAMILIES:
        raise ValueError(f"{name_or_path!r} is a {model_type!r} model; supported model types: {', '.join(FAMILIES)} "
                         f"({', '.join(family.model_class for family in FAMILIES.values())}); other families need "
                         "an adapter of their own")
    return FAMILIES[model_type]


def _config(name_or_path: str):
    try:
        return AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except OSError as err:
        raise BackboneNotFoundError(missing_backbone_message(name_or_path, err)) from err


def load_backbone(name_or_path: str, dtype: str = "float32", attn_implementation: str = "sdpa",
                  device: str | torch.device = "cpu") -> LlavaBackbone:
    """A frozen backbone from a local folder or the local Hugging Face cache, never the network, with the adapter of
    its family."""
    family = backbone_class(_config(name_or_path).model_type, name_or_path)
    return family.from_pretrained(name_or_path, dtype, attn_implementation, device)


def read_backbone_shape(name_or_path: str, max_vision_tokens: int | None = None,
                        image_max_size: int | None = None) -> BackboneShape:
    """The backbone's shape from its config.json (local folder or local HF cache), weights untouched; for a family
    whose token count follows the image, within the bounds (``data_settings.max_vision_tokens`` / ``image_max_size``:
    LlavaBackbone.apply_bounds)."""
    config = _config(name_or_path)
    family = backbone_class(config.model_type, name_or_path)
    family.bound_config(config, max_vision_tokens, image_max_size)
    return family.shape_from_config(config)
