"""Two-stage vision token pruning for LLaVA: the entry point.

    python main.py                                  # configs/vision_token_pruning.yaml (GPU, llava-1.5-7b)
    python main.py --config configs/tiny.yaml       # the embedded CPU default, no download
    python main.py --config configs/tiny.yaml --set trainer_settings.dl_settings.batch_size=8

CLI -> config (validated, every problem at once) -> checks against the backbone's shape
(before any weight loads) -> run mode.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no machine this runs on may download: fail fast, never hang

import torch  # noqa: E402

from configs.schema import (ConfigError, Config, check_against_backbone, check_devices, load_config,  # noqa: E402
                            save_config)
from data.build import batches, build_datasets  # noqa: E402
from data.collator import VQACollator  # noqa: E402
from models.llava_backbone import BackboneNotFoundError, LlavaBackbone, read_backbone_shape  # noqa: E402
from trainers.evaluation import evaluate_accuracy, generate_baseline_answers  # noqa: E402
from trainers.run_log import RunLog  # noqa: E402

DEFAULT_CONFIG = "configs/vision_token_pruning.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train learned vision-token pruning (token merger + layer pruners + discriminator) on a "
                    "frozen LLaVA backbone.",
        epilog="The README's configuration reference lists every key.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="dotted.key=value",
                        help="override one key, typed as in YAML (repeatable), e.g. --set method_settings.merge_ratio=0.4")
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare(config: Config, config_path: str) -> None:
    """Every check that needs no weights: the backbone's shape and the devices."""
    shape = read_backbone_shape(config.backbone_settings.name_or_path)
    problems = check_against_backbone(config, shape.num_layers, shape.num_vision_tokens, shape.image_size)
    problems += check_devices(config, torch.cuda.is_available())
    if problems:
        raise ConfigError(problems, config_path)


def run(config: Config, log: RunLog) -> dict[str, float]:
    settings = config.backbone_settings
    log.info("Preloading backbone and dataset...")
    backbone = LlavaBackbone.from_pretrained(settings.name_or_path, settings.dtype, settings.attn_implementation,
                                             resolve_device(settings.device))
    train_set, eval_set = build_datasets(config.data_settings)
    for name, dataset in (("train", train_set), ("eval", eval_set)):
        skipped = getattr(dataset, "skipped", [])
        log.info(f"{name} set: {len(dataset)} samples" + (f", {len(skipped)} bad samples skipped" if skipped else ""))
        for reason in skipped[:5]:
            log.info(f"  skipped: {reason}")
    log.info("Freezing backbone parameters...")
    frozen = sum(p.numel() for p in backbone.parameters() if not p.requires_grad)
    log.info(f"Backbone: {settings.name_or_path}, {frozen:,} frozen parameters, {backbone.num_layers} decoder layers, "
             f"{backbone.num_vision_tokens} vision tokens per image, device {backbone.device}")

    prompts = VQACollator(backbone.processor, with_answers=False)
    accuracy = evaluate_accuracy(
        lambda batch: generate_baseline_answers(backbone, batch, config.data_settings.max_new_tokens),
        batches(eval_set, prompts, config.data_settings.eval_batch_size),
        desc="accuracy_baseline",
    )
    lines = [f"  - accuracy_baseline: {accuracy['overall']:.3f}"]
    lines += [f"    - {qtype}: {acc:.3f}" for qtype, acc in accuracy.items() if qtype != "overall" and qtype != "all"]
    log.block("[Eval Step 0]\n" + "\n".join(lines))
    return accuracy


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        prepare(config, args.config)
    except (ConfigError, BackboneNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if config.manager_settings.mode == "optuna":
        print("error: manager_settings.mode 'optuna' is not available yet in this version; use 'train' or 'eval'",
              file=sys.stderr)
        return 2
    torch.manual_seed(config.manager_settings.seed)
    out = Path(config.manager_settings.output_dir)
    save_config(config, out / "resolved_config.yaml")
    log = RunLog(out / "logs" / "training.log")
    try:
        run(config, log)
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
