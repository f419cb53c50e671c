"""The prepared GPU check: training steps, the largest batch that fits, and the prefill table, in one command.

    python scripts/gpu_check.py                       # one CUDA GPU, llava-1.5-7b's shapes, random init
    python scripts/gpu_check.py --config configs/llava_1_5_7b_665k.yaml --batch-size 8 --accumulation 2  # the recipe
    python scripts/gpu_check.py --shapes tiny --device cpu --batch-size 2 --max-batch 4 --steps 1 --repeats 1

With llava-1.5-7b's shapes (CLIP-L/336, 576 vision tokens, a 32-layer 4096-wide Llama, bf16
weights; configs/vision_token_pruning.yaml's merger, pruners and pruning layers) nothing is
downloaded: the weights are random, which is all that speed and memory depend on. It prints
1. the trainer's step (trainers/training/trainer.Trainer.training_step, the one main.py runs) over
   ``--accumulation`` micro-batches of ``--batch-size`` with bf16 autocast and the config's
   learning-rate schedules, without and with gradient checkpointing: seconds per step,
   samples/s, tokens/s, the split into teacher, student, backward and optimizer, and peak
   device memory;
2. the largest batch that fits, each way (doubling from ``--batch-size`` up to ``--max-batch``),
   both measured by trainers/training/capacity.py;
3. scripts/benchmark_pruning.py's prefill table (trainers/inference/speed.py) with cached generation of
   ``--new-tokens``.
About 6 minutes on one H200. The second line runs the same code at the tiny backbone's size on
the CPU (the test suite does), so the script cannot rot. ``--json`` also writes the figures to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from configs.schema import load_config  # noqa: E402
from trainers.inference.speed import (BATCH_SIZE, DEFAULT_CONFIG, measure_speed, shaped_backbone,  # noqa: E402
                                      speed_report)
from trainers.inference.timing import machine  # noqa: E402
from trainers.training.capacity import epoch_hours, largest_batch, out_of_memory, training_figures  # noqa: E402
from trainers.training.throughput import PHASES  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=list(DEFAULT_CONFIG), default="llava-1.5-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--config", help="the run's config (method, schedules); default: the shapes' config. Its "
                        "backbone is not read: the check builds a random-init one of --shapes")
    parser.add_argument("--batch-size", type=int, default=12,
                        help="samples per micro-batch on this GPU (the seed's 12; the 665K recipe's is 8)")
    parser.add_argument("--accumulation", type=int, default=1,
                        help="micro-batches per optimizer step (the 665K recipe's gradient_accumulation_steps: 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per setting, after one warm-up")
    parser.add_argument("--epoch-samples", type=int, default=624_000,
                        help="training samples of an epoch, for its expected time (LLaVA-665K's records with an image)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the data-parallel run, for the epoch's time")
    parser.add_argument("--max-batch", type=int, default=96, help="where the search for the largest batch stops")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of the prefill table")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens of cached generation in the prefill table")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.accumulation, args.steps, args.repeats, args.new_tokens) < 1:
        parser.error("--batch-size, --accumulation, --steps, --repeats and --new-tokens must be at least 1")
    if args.max_batch < args.batch_size:
        parser.error(f"--max-batch ({args.max_batch}) is below --batch-size ({args.batch_size})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; on a CPU machine pass --shapes tiny --device cpu")

    started = time.perf_counter()
    config = load_config(args.config or DEFAULT_CONFIG[args.shapes])
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    torch.manual_seed(0)
    backbone = shaped_backbone(args.shapes, config.backbone_settings.name_or_path, dtype, args.device)
    device = machine(backbone.device)
    print(f"{args.shapes} shapes, {dtype} weights, {device}", file=sys.stderr)

    results = {"device": device, "shapes": args.shapes, "training": [], "largest_batch": {}}
    for checkpointing in (False, True):
        print(f"training step, batch {args.batch_size}, gradient checkpointing {checkpointing}...", file=sys.stderr)
        try:
            figures = training_figures(config, backbone, args.batch_size, checkpointing, args.steps, args.accumulation)
        except RuntimeError as err:
            if not out_of_memory(err):
                raise
            figures = {"out_of_memory": True}
        results["training"].append({"batch": args.batch_size, "accumulation": args.accumulation,
                                    "gradient_checkpointing": checkpointing, **figures})
        fits, why = largest_batch(config, backbone, args.batch_size, args.max_batch, checkpointing)
        results["largest_batch"]["on" if checkpointing else "off"] = {"batch": fits, "stopped": why}

    print(f"\nTraining step (trainers/training/trainer.py), {args.shapes} shapes, {device}, mean of {args.steps} steps of "
          f"{args.accumulation} micro-batch(es) of --batch-size each\n")
    print("| batch | gradient checkpointing | s/step | samples/s | tokens/s | " + " | ".join(PHASES) + " | peak memory |")
    print("|---|---|---|---|---|" + "---|" * len(PHASES) + "---|")
    for row in results["training"]:
        if row.get("out_of_memory"):
            print(f"| {row['batch']} | {'on' if row['gradient_checkpointing'] else 'off'} | out of memory |")
            continue
        memory = f"{row['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in row else "n/a (CPU)"
        print(f"| {row['batch']} | {'on' if row['gradient_checkpointing'] else 'off'} | {row['step_s']:.2f} "
              f"| {row['samples_per_s']:.1f} | {row['tokens_per_s']:,.0f} | "
              + " | ".join(f"{row[f'{phase}_s']:.2f} s" for phase in PHASES) + f" | {memory} |")
    for row in results["training"]:
        if not row.get("out_of_memory"):
            hours = epoch_hours(row["samples_per_s"], args.epoch_samples, args.gpus)
            row["epoch_hours"] = hours
            print(f"\nAn epoch of {args.epoch_samples:,} samples on {args.gpus} such GPUs, gradient checkpointing "
                  f"{'on' if row['gradient_checkpointing'] else 'off'}: {hours:.1f} h (this GPU's pace x {args.gpus}, "
                  "evaluations not counted)")
    for way, found in results["largest_batch"].items():
        print(f"\nLargest training batch that fits, gradient checkpointing {way}: {found['batch']} ({found['stopped']})")

    table_config = load_config(DEFAULT_CONFIG[args.shapes])
    torch.manual_seed(0)
    try:
        rows = measure_speed(backbone, table_config, repeats=args.repeats, new_tokens=args.new_tokens)
    except ValueError as err:
        parser.error(str(err))
    print("\n" + speed_report(rows, backbone, table_config, args.shapes, dtype, BATCH_SIZE, args.new_tokens,
                              args.repeats))
    results["prefill"] = [{k: v for k, v in row.items() if k != "model"} for row in rows]
    results["seconds"] = time.perf_counter() - started
    print(f"\ngpu check done in {results['seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
