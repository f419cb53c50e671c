"""Prefill and generation time of the pruned forward at several budgets, beside the speed-up the FLOPs allow.

A setting keeps a fraction ``r`` of the N vision tokens after the last stage: the merger keeps min(N, 2rN) of them
before the projector and the pruning stages go from there to rN in equal ratios (``build_setting``). Timing does not
depend on which tokens are chosen, so the modules are untrained. Every setting runs on the same batch, the settings
interleaved round by round (trainers/inference/timing.py), so their ratios compare. Two FLOPs columns: the LLM
prefill (the papers' convention, the merger's and pruners' cost included) and the whole prefill (vision tower and
projector too), whose ratio gives the speed-up the FLOPs allow; "share reached" is the measured speed-up over that.
``shaped_backbone("llava-1.5-7b", ...)`` builds a random-init model with llava-1.5-7b's shapes: no download.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from typing import Sequence

import torch

from configs.schema import Config, MethodSettings, check_against_backbone
from data.collator import VQACollator
from data.processors import word_level_processor
from data.synthetic_vqa import SyntheticVQADataset
from models.backbones import load_backbone
from models.layer_pruner import geometric_ratios
from models.llava_backbone import LlavaBackbone
from models.pruned_llava import PrunedLlava
from models.tiny_llava import build_llava
from trainers.inference.build import build_pruned_model
from trainers.inference.evaluation import prefill_flops, sample_flops, stage_counts
from trainers.inference.timing import machine, speedups, timed_rounds

DEFAULT_CONFIG = {"tiny": "configs/tiny.yaml", "llava-1.5-7b": "configs/vision_token_pruning.yaml"}
KEEPS = (1.0, 0.5, 0.25, 0.11)  # the default settings: fractions of the vision tokens left after the last stage
BATCH_SIZE = 32  # prompts per timed prefill: at 8 the tiny model's fixed per-kernel costs dominate


def shaped_backbone(shapes: str, name_or_path: str, dtype: str, device: str) -> LlavaBackbone:
    """``tiny``: the backbone folder ``name_or_path``; ``llava-1.5-7b``: a random-init model with its shapes
    (CLIP-L/336, 576 vision tokens, a 32-layer 4096-wide Llama), built in ``dtype`` on ``device``."""
    if shapes == "tiny":
        return load_backbone(name_or_path, dtype, "sdpa", device)
    processor = word_level_processor(336, 14)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # built in the target dtype: no float32 copy of 7B weights
    try:
        with torch.device(device):
            model = build_llava(processor.tokenizer, shapes)
    finally:
        torch.set_default_dtype(default)
    return LlavaBackbone(model, processor)


def build_setting(backbone: LlavaBackbone, method: MethodSettings, keep: float) -> PrunedLlava:
    """The pruned model that keeps ``keep`` of the vision tokens: merger to min(N, 2K), then equal stage ratios."""
    n, stages = backbone.num_vision_tokens, len(method.pruning_layers)
    if keep >= 1.0:
        return PrunedLlava(backbone).eval()
    k = max(1, round(keep * n))
    merged = min(n, 2 * k) if stages else k
    method = dataclasses.replace(method, merge_budget="fixed", target_merge_tokens=merged, merge_ratio=merged / n,
                                 pruner_keep_ratios=geometric_ratios(merged, k, stages))
    return build_pruned_model(method, backbone).to(backbone.dtype).eval()


def measure_speed(backbone: LlavaBackbone, config: Config, keeps: Sequence[float] = KEEPS,
                  batch_size: int = BATCH_SIZE, repeats: int = 20, new_tokens: int = 8) -> list[dict]:
    """One row per setting of ``keeps`` (and the unpruned reference, which the ratios need): vision tokens per layer,
    FLOPs ratios, median prefill and generation seconds with their speed-ups, the speed-up the FLOPs allow and the
    share of it reached. The settings' modules have ``config``'s sizes and pruning layers; raises ValueError when
    they do not fit the backbone."""
    shape = backbone.shape
    problems = check_against_backbone(config, shape.num_layers, shape.num_vision_tokens, shape.image_size)
    if problems:
        raise ValueError("the config does not fit the backbone:\n  " + "\n  ".join(problems))
    data = SyntheticVQADataset(batch_size, "eval", seed=0)
    batch = VQACollator(backbone.processor, with_answers=False)([data[i] for i in range(batch_size)])
    ids, mask = batch["input_ids"].to(backbone.device), batch["attention_mask"].to(backbone.device)
    pixels = batch["pixel_values"].to(backbone.device, backbone.dtype)
    tok = backbone.processor.tokenizer

    models = [build_setting(backbone, config.method_settings, keep) for keep in sorted(set(keeps), reverse=True)]
    if keeps and max(keeps) < 1.0:
        models.insert(0, PrunedLlava(backbone).eval())  # the unpruned reference the ratios need
    rows = []
    with torch.no_grad():
        for model in models:
            out = model(ids, pixels, mask, mode="hard")
            llm = prefill_flops(model, out, mask)
            base, pruned = sample_flops(model, out, mask, with_encoder=True)
            rows.append(dict(model=model, vision=out.vision_tokens_per_layer, llm=1 - llm["flops_reduction"],
                             vision_only=1 - llm["vision_flops_reduction"], whole=sum(pruned) / sum(base)))
        prefill = lambda model: lambda: model(ids, pixels, mask, mode="hard")
        generate = lambda model: lambda: model.generate(ids, pixels, mask, new_tokens, eos_token_id=-1,
                                                        pad_token_id=tok.pad_token_id)
        print(f"timing {len(models)} settings, {repeats} interleaved rounds...", file=sys.stderr)
        for what, make in (("prefill", prefill), ("generate", generate)):
            rounds = timed_rounds([make(m) for m in models], repeats, backbone.device)
            for row, samples, speedup in zip(rows, rounds, speedups(rounds)):
                row[what], row[f"{what}_speedup"] = statistics.median(samples), speedup
    for row in rows:
        row["allowed"] = 1 / row["whole"]
        row["share"] = row["prefill_speedup"] / row["allowed"]
    return rows


def speed_report(rows: list[dict], backbone: LlavaBackbone, config: Config, shapes: str, dtype: str, batch_size: int,
                 new_tokens: int, repeats: int) -> str:
    """A line saying what ran where, then :func:`measure_speed`'s rows as a markdown table."""
    method = config.method_settings
    name = config.backbone_settings.name_or_path if shapes == "tiny" else f"random-init {shapes} shapes"
    lines = [f"{name}, {dtype}, batch {batch_size}, {new_tokens} new tokens, pruning layers "
             f"{list(method.pruning_layers)}, merger {method.merger_type} ({method.merger_d_internal} wide), pruners "
             f"{method.pruner_type} ({method.pruner_d_internal} wide), {machine(backbone.device)}; medians over "
             f"{repeats} interleaved rounds (speed-ups: of the per-round ratios)", "",
             "| kept vision tokens | vision tokens: LLM input → after each pruning layer "
             "| LLM prefill FLOPs (all tokens) | (vision tokens only) | whole prefill FLOPs | prefill ms | prefill speed-up | speed-up the FLOPs allow "
             "| share reached | generate ms | generate speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    n = backbone.num_vision_tokens
    for row in rows:
        lines.append(f"| {row['vision'][-1]:g} / {n} ({row['vision'][-1] / n:.0%}) "
                     f"| {stage_counts(row['model'], row['vision'])} | {row['llm']:.1%} | {row['vision_only']:.1%} "
                     f"| {row['whole']:.1%} | {row['prefill'] * 1e3:.1f} | {row['prefill_speedup']:.2f}x "
                     f"| {row['allowed']:.2f}x | {row['share']:.0%} | {row['generate'] * 1e3:.1f} "
                     f"| {row['generate_speedup']:.2f}x |")
    return "\n".join(lines)
