"""Prefill and generation time of the pruned forward at several budgets, beside what the FLOPs allow.

    python scripts/benchmark_pruning.py                                   # tiny backbone, CPU
    python scripts/benchmark_pruning.py --shapes llava-1.5-7b --device cuda --dtype bfloat16

Every setting runs in one process on the same batch, the settings interleaved round by round, so
the ratios compare (machines are noisy: compare ratios, not absolute times across runs). A
setting keeps a fraction ``r`` of the N vision tokens after the last stage: the merger keeps
min(N, 2rN) of them before the projector and the pruning stages go from there to rN in equal
ratios. The merger and pruners have the config's sizes (``--config``: configs/tiny.yaml for the
tiny backbone, configs/vision_token_pruning.yaml for llava-1.5-7b's shapes) and its pruning
layers. Timing does not depend on which tokens are chosen, so the modules are untrained here;
accuracy belongs to the trainer's evaluation and scripts/benchmark.py.

Two FLOPs columns: the LLM prefill (the papers' convention, the merger's and pruners' cost
included) and the whole prefill (vision tower and projector too), whose ratio gives the
speed-up the FLOPs allow; "share reached" is the measured speed-up over that. ``--shapes
llava-1.5-7b`` builds a random-init model with llava-1.5-7b's shapes (CLIP-L/336, 576 vision
tokens, a 32-layer 4096-wide Llama): no download.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from configs.schema import check_against_backbone, load_config  # noqa: E402
from data.collator import VQACollator  # noqa: E402
from data.processors import word_level_processor  # noqa: E402
from data.synthetic_vqa import SyntheticVQADataset  # noqa: E402
from models.backbones import load_backbone  # noqa: E402
from models.layer_pruner import geometric_ratios  # noqa: E402
from models.llava_backbone import LlavaBackbone  # noqa: E402
from models.pruned_llava import PrunedLlava  # noqa: E402
from models.tiny_llava import build_llava  # noqa: E402
from trainers.inference.build import build_pruned_model  # noqa: E402
from trainers.inference.evaluation import prefill_flops, sample_flops, stage_counts  # noqa: E402
from trainers.inference.timing import machine, speedups, timed_rounds  # noqa: E402

DEFAULT_CONFIG = {"tiny": "configs/tiny.yaml", "llava-1.5-7b": "configs/vision_token_pruning.yaml"}


def shaped_backbone(shapes: str, name_or_path: str, dtype: str, device: str) -> LlavaBackbone:
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


def build_setting(backbone: LlavaBackbone, method, keep: float) -> PrunedLlava:
    """The pruned model that keeps ``keep`` of the vision tokens: merger to min(N, 2K), then equal stage ratios."""
    n, stages = backbone.num_vision_tokens, len(method.pruning_layers)
    if keep >= 1.0:
        return PrunedLlava(backbone).eval()
    k = max(1, round(keep * n))
    merged = min(n, 2 * k) if stages else k
    method = dataclasses.replace(method, merge_budget="fixed", target_merge_tokens=merged, merge_ratio=merged / n,
                                 pruner_keep_ratios=geometric_ratios(merged, k, stages))
    return build_pruned_model(method, backbone).to(backbone.dtype).eval()


def main(argv: list[str] | None = None, backbone: LlavaBackbone | None = None) -> list[dict]:
    """Prints the table and returns its rows; ``backbone``: one already loaded with the arguments' shapes, device
    and dtype (scripts/gpu_check.py passes its own rather than hold two 7B models)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=list(DEFAULT_CONFIG), default="tiny",
                        help="tiny: the config's backbone folder; llava-1.5-7b: random init with its shapes")
    parser.add_argument("--config", help="merger and pruner sizes, pruning layers and (tiny) the backbone; "
                                         "default: configs/tiny.yaml or configs/vision_token_pruning.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for main.py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=32,
                        help="prompts per prefill (at 8 the tiny model's fixed per-kernel costs dominate: README)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved rounds (each runs every setting once)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens generated after the prefill")
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.11],
                        help="fractions of vision tokens left after the last stage, in (0, 1]")
    args = parser.parse_args(argv)
    if any(not 0 < keep <= 1 for keep in args.keep):
        parser.error(f"--keep takes fractions in (0, 1], got {args.keep}")
    if args.batch_size < 1 or args.repeats < 1 or args.new_tokens < 1:
        parser.error("--batch-size, --repeats and --new-tokens must be at least 1")

    config = load_config(args.config or DEFAULT_CONFIG[args.shapes], args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if backbone is None:
        backbone = shaped_backbone(args.shapes, config.backbone_settings.name_or_path, args.dtype, args.device)
    shape = backbone.shape
    problems = check_against_backbone(config, shape.num_layers, shape.num_vision_tokens, shape.image_size)
    if problems:
        parser.error("the config does not fit the backbone:\n  " + "\n  ".join(problems))
    data = SyntheticVQADataset(args.batch_size, "eval", seed=0)
    batch = VQACollator(backbone.processor, with_answers=False)([data[i] for i in range(args.batch_size)])
    ids, mask = batch["input_ids"].to(backbone.device), batch["attention_mask"].to(backbone.device)
    pixels = batch["pixel_values"].to(backbone.device, backbone.dtype)
    tok = backbone.processor.tokenizer

    models = [build_setting(backbone, config.method_settings, keep) for keep in sorted(set(args.keep), reverse=True)]
    if args.keep and max(args.keep) < 1.0:
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
        generate = lambda model: lambda: model.generate(ids, pixels, mask, args.new_tokens, eos_token_id=-1,
                                                        pad_token_id=tok.pad_token_id)
        print(f"timing {len(models)} settings, {args.repeats} interleaved rounds...", file=sys.stderr)
        for what, make in (("prefill", prefill), ("generate", generate)):
            rounds = timed_rounds([make(m) for m in models], args.repeats, backbone.device)
            for row, samples, speedup in zip(rows, rounds, speedups(rounds)):
                row[what], row[f"{what}_speedup"] = statistics.median(samples), speedup

    name = config.backbone_settings.name_or_path if args.shapes == "tiny" else "random-init llava-1.5-7b shapes"
    layers = list(config.method_settings.pruning_layers)
    print(f"\n{name}, {args.dtype}, batch {args.batch_size}, {args.new_tokens} new tokens, pruning layers {layers}, "
          f"merger {config.method_settings.merger_type} ({config.method_settings.merger_d_internal} wide), pruners "
          f"{config.method_settings.pruner_type} ({config.method_settings.pruner_d_internal} wide), "
          f"{machine(backbone.device)}; medians over {args.repeats} interleaved rounds (speed-ups: of the "
          "per-round ratios)\n")
    print("| kept vision tokens | vision tokens: LLM input → after each pruning layer | LLM prefill FLOPs (all tokens) "
          "| (vision tokens only) | whole prefill FLOPs | prefill ms | prefill speed-up | speed-up the FLOPs allow "
          "| share reached | generate ms | generate speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    n = backbone.num_vision_tokens
    for row in rows:
        row["allowed"] = 1 / row["whole"]
        row["share"] = row["prefill_speedup"] / row["allowed"]
        print(f"| {row['vision'][-1]:g} / {n} ({row['vision'][-1] / n:.0%}) | {stage_counts(row['model'], row['vision'])} "
              f"| {row['llm']:.1%} | {row['vision_only']:.1%} | {row['whole']:.1%} | {row['prefill'] * 1e3:.1f} "
              f"| {row['prefill_speedup']:.2f}x | {row['allowed']:.2f}x | {row['share']:.0%} "
              f"| {row['generate'] * 1e3:.1f} | {row['generate_speedup']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
