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
tokens, a 32-layer 4096-wide Llama): no download. The measurement is trainers/inference/speed.py.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from configs.schema import load_config  # noqa: E402
from trainers.inference.speed import (BATCH_SIZE, DEFAULT_CONFIG, KEEPS, measure_speed, shaped_backbone,  # noqa: E402
                                      speed_report)


def main(argv: list[str] | None = None) -> list[dict]:
    """Prints the table and returns its rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=list(DEFAULT_CONFIG), default="tiny",
                        help="tiny: the config's backbone folder; llava-1.5-7b: random init with its shapes")
    parser.add_argument("--config", help="merger and pruner sizes, pruning layers and (tiny) the backbone; "
                                         "default: configs/tiny.yaml or configs/vision_token_pruning.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for main.py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help="prompts per prefill (at 8 the tiny model's fixed per-kernel costs dominate: README)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved rounds (each runs every setting once)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens generated after the prefill")
    parser.add_argument("--keep", type=float, nargs="+", default=list(KEEPS),
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
    backbone = shaped_backbone(args.shapes, config.backbone_settings.name_or_path, args.dtype, args.device)
    try:
        rows = measure_speed(backbone, config, args.keep, args.batch_size, args.repeats, args.new_tokens)
    except ValueError as err:
        parser.error(str(err))
    print("\n" + speed_report(rows, backbone, config, args.shapes, args.dtype, args.batch_size, args.new_tokens,
                              args.repeats))
    return rows


if __name__ == "__main__":
    main()
