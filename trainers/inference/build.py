"""The learnable parts a config asks for, around a loaded backbone, and the device the config puts it on."""

from __future__ import annotations

import math

import torch
from torch import nn

from configs.schema import MethodSettings
from models.discriminator import Discriminator
from models.layer_pruner import build_pruner, stage_budgets
from models.llava_backbone import LlavaBackbone
from models.pruned_llava import PrunedLlava
from models.token_merger import TokenMerger


def resolve_device(name: str) -> torch.device:
    """``backbone_settings.device``: 'auto' is CUDA when available, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def merged_token_count(method: MethodSettings, num_vision_tokens: int) -> int:
    """K, the merger's output: ``target_merge_tokens`` (checked against the ratio at load) or round(ratio x N)."""
    if method.target_merge_tokens is not None:
        return method.target_merge_tokens
    return max(1, round(method.merge_ratio * num_vision_tokens))


def stage_keep_ratios(method: MethodSettings) -> list[float]:
    """One keep ratio per pruning layer: ``pruner_keep_ratios`` itself, or, when it holds another count (say the
    guide's seven pruning layers with the default three ratios), the geometric schedule with the same product,
    so the last stage keeps the same share of the merged tokens."""
    ratios, layers = list(method.pruner_keep_ratios), list(method.pruning_layers)
    if len(ratios) == len(layers) or not layers:
        return ratios
    return [round(math.prod(ratios) ** (1 / len(layers)), 6)] * len(layers)


def build_pruned_model(method: MethodSettings, backbone: LlavaBackbone) -> PrunedLlava:
    """Token merger (skipped when merge_ratio is 1) and one pruner per pruning layer."""
    n = backbone.num_vision_tokens
    k = merged_token_count(method, n)
    merger = None
    if k < n:
        merger = TokenMerger(backbone.vision_hidden_size, backbone.hidden_size, k, k / n, method.merger_type,
                             hidden=method.merger_d_internal, num_heads=method.pruner_num_heads,
                             budget=method.merge_budget, similarity_threshold=method.merge_similarity_threshold,
                             proportional_attention=method.merge_proportional_attention,
                             spread_weight=method.merge_spread_weight)
    pruners = nn.ModuleList(
        build_pruner(method.pruner_type, backbone.hidden_size, method.pruner_d_internal, method.pruner_num_heads)
        for _ in method.pruning_layers
    )
    model = PrunedLlava(backbone, merger, pruners, list(method.pruning_layers),
                        stage_budgets(k, stage_keep_ratios(method)), fold_pruned=method.pruner_proportional_attention)
    return model.to(backbone.device)


def build_discriminator(method: MethodSettings, backbone: LlavaBackbone) -> Discriminator:
    width = backbone.hidden_size if method.discriminator_input == "hidden" else backbone.text_config.vocab_size
    return Discriminator(width, method.discriminator_hidden, method.discriminator_input).to(backbone.device)
