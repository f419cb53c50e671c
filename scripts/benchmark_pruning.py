"""Prefill and generation time of the pruned forward at several budgets, beside the FLOPs ratio.

    python scripts/benchmark_pruning.py                                   # tiny backbone, CPU
    python scripts/benchmark_pruning.py --shapes llava-1.5-7b --device cuda --dtype bfloat16

Every setting runs in one process on the same batch, so the ratios compare (machines are
noisy: compare ratios, not absolute times across runs). A setting keeps a fraction ``r`` of
the vision tokens after the last stage: the merger keeps min(1, 2r) of them before the
projector and each of the three pruning stages keeps (r / merger share)^(1/3) of what
enters it. Timing does not depend on which tokens are chosen, so the merger and pruners are
untrained here; accuracy belongs to the trainer's evaluation. ``--shapes llava-1.5-7b`` builds
a random-init model with llava-1.5-7b's shapes (CLIP-L/336, 576 vision tokens, a 32-layer
4096-wide Llama): no download.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor  # noqa: E402

from data.collator import VQACollator  # noqa: E402
from data.synthetic_vqa import SyntheticVQADataset, vocabulary  # noqa: E402
from data.word_tokenizer import build_word_tokenizer  # noqa: E402
from models.flops import compare_prefill  # noqa: E402
from models.layer_pruner import build_pruner, stage_budgets  # noqa: E402
from models.llava_backbone import LlavaBackbone  # noqa: E402
from models.pruned_llava import PrunedLlava  # noqa: E402
from models.tiny_llava import llava15_7b_config  # noqa: E402
from models.token_merger import TokenMerger  # noqa: E402
from trainers.timing import machine, timed  # noqa: E402
from trainers.evaluation import module_flops  # noqa: E402


def load_backbone(args) -> LlavaBackbone:
    if args.shapes == "tiny":
        return LlavaBackbone.from_pretrained(args.backbone, args.dtype, "sdpa", args.device)
    tokenizer = build_word_tokenizer(vocabulary())
    config = llava15_7b_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                               tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<image>"))
    with torch.device(args.device):
        model = LlavaForConditionalGeneration(config).to(getattr(torch, args.dtype))
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return LlavaBackbone(model, processor)


def build_setting(backbone: LlavaBackbone, keep: float, layers: list[int]) -> PrunedLlava:
    n = backbone.num_vision_tokens
    if keep >= 1.0:
        return PrunedLlava(backbone)
    merge_share = min(1.0, 2 * keep)
    k = round(merge_share * n)
    merger = None if k == n else TokenMerger(backbone.vision_hidden_size, backbone.hidden_size, k, k / n, hidden=256)
    stage_ratio = (keep / merge_share) ** (1 / len(layers))
    pruners = nn.ModuleList(build_pruner("cross_attention", backbone.hidden_size, 512, 4) for _ in layers)
    model = PrunedLlava(backbone, merger, pruners, layers, stage_budgets(k, [stage_ratio] * len(layers)))
    return model.to(backbone.device, backbone.dtype).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="backbones/tiny-llava")
    parser.add_argument("--shapes", choices=["tiny", "llava-1.5-7b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens generated after the prefill")
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.11],
                        help="fractions of vision tokens left after the last stage")
    parser.add_argument("--layers", type=int, nargs="+", help="pruning layers (default: 1/4, 1/2, 3/4 of the depth)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    backbone = load_backbone(args)
    depth = backbone.num_layers
    layers = args.layers or [depth // 4, depth // 2, 3 * depth // 4]
    data = SyntheticVQADataset(args.batch_size, "eval", seed=0)
    batch = VQACollator(backbone.processor, with_answers=False)([data[i] for i in range(args.batch_size)])
    ids, mask = batch["input_ids"].to(backbone.device), batch["attention_mask"].to(backbone.device)
    pixels = batch["pixel_values"].to(backbone.device, backbone.dtype)
    tok = backbone.processor.tokenizer
    text_tokens = int(mask[0].sum()) - backbone.num_vision_tokens
    d, m = backbone.hidden_size, backbone.text_config.intermediate_size

    rows, baseline = [], None
    for keep in sorted(args.keep, reverse=True):
        model = build_setting(backbone, keep, layers)
        with torch.no_grad():
            out = model(ids, pixels, mask, mode="hard")
            prefill = timed(lambda: model(ids, pixels, mask, mode="hard"), args.repeats, backbone.device)
            generate = timed(lambda: model.generate(ids, pixels, mask, args.new_tokens, eos_token_id=-1,
                                                    pad_token_id=tok.pad_token_id), args.repeats, backbone.device)
        row = dict(keep=keep, vision=[round(v) for v in out.vision_tokens_per_layer], seq=out.seq_len_per_layer, prefill=prefill,
                   generate=generate, extra=module_flops(model, text_tokens))
        baseline = baseline or row
        rows.append(row)
        print(f"keep {keep:.2f}: prefill {prefill * 1e3:.1f} ms, generate {generate * 1e3:.1f} ms", file=sys.stderr)

    name = args.backbone if args.shapes == "tiny" else "random-init llava-1.5-7b shapes"
    device = machine(backbone.device)
    print(f"\n{name}, {args.dtype}, batch {args.batch_size}, {args.new_tokens} new tokens, pruning layers {layers}, "
          f"{device}; median of {args.repeats}\n")
    print("| kept vision tokens | vision tokens per stage | prefill FLOPs vs unpruned (all tokens) | (vision tokens only) "
          "| prefill ms | prefill speed-up | generate ms | generate speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        all_tokens = compare_prefill(baseline["seq"], row["seq"], d, m, extra_pruned=row["extra"])
        vision_only = compare_prefill(baseline["vision"], row["vision"], d, m)
        stages = " → ".join(str(v) for v in _stage_counts(row["vision"], layers))
        print(f"| {row['vision'][-1]} / {backbone.num_vision_tokens} ({row['keep']:.0%}) | {stages} "
              f"| {1 - all_tokens.reduction:.1%} | {1 - vision_only.reduction:.1%} "
              f"| {row['prefill'] * 1e3:.1f} | {baseline['prefill'] / row['prefill']:.2f}x "
              f"| {row['generate'] * 1e3:.1f} | {baseline['generate'] / row['generate']:.2f}x |")


def _stage_counts(per_layer: list[int], layers: list[int]) -> list[int]:
    """Vision tokens entering layer 0 and after each pruning stage."""
    return [per_layer[0], *(per_layer[layer] for layer in layers)]


if __name__ == "__main__":
    main()
