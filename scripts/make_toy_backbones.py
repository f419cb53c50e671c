"""Small random-init LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL folders (with their processors), to try those backbone
families on a CPU: nothing is downloaded, and main.py trains on each in about a minute.

    python scripts/make_toy_backbones.py --out backbones/toy
    python main.py --config configs/tiny.yaml --set backbone_settings.name_or_path=backbones/toy/llava-next ...

Each folder is what save_pretrained writes (config.json, safetensors, processor and tokenizer files), at toy widths:
4 decoder layers, the synthetic scenes' vocabulary. The script prints the main.py command of each, with the
overrides the family needs (the tiny config's merger budget is for 144 tokens; Qwen's token count follows the image,
bounded by data_settings.max_vision_tokens). Random weights: the accuracies mean nothing, the code paths are real.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.tiny_llava import toy_llava_next, toy_qwen2_vl  # noqa: E402

TRY = {"trainer_settings.max_steps": 60, "trainer_settings.eval_every": 60, "trainer_settings.save_every": 60,
       "data_settings.synthetic_eval_size": 100, "method_settings.pruning_layers": "[1,2,3]",
       "method_settings.relevance_weight": 0}
FAMILIES = {  # folder name -> (builder, the overrides of configs/tiny.yaml it needs)
    "llava-next": (lambda: toy_llava_next(text_layers=4), {"method_settings.target_merge_tokens": 90,
                                                           "method_settings.merge_ratio": 0.5}),
    "qwen2-vl": (lambda: toy_qwen2_vl("2", text_layers=4), {"method_settings.target_merge_tokens": "null",
                                                            "method_settings.merge_ratio": 0.5,
                                                            "data_settings.max_vision_tokens": 36}),
    "qwen2.5-vl": (lambda: toy_qwen2_vl("2.5", text_layers=4), {"method_settings.target_merge_tokens": "null",
                                                                "method_settings.merge_ratio": 0.5,
                                                                "data_settings.max_vision_tokens": 36}),
}


def command(folder: Path, overrides: dict) -> str:
    settings = {"backbone_settings.name_or_path": str(folder), "manager_settings.output_dir": f"outputs/{folder.name}",
                **TRY, **overrides}
    return shlex.join(["python", "main.py", "--config", "configs/tiny.yaml",
                       *(arg for key, value in settings.items() for arg in ("--set", f"{key}={value}"))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("backbones/toy"), help="parent folder (default: backbones/toy)")
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    args = parser.parse_args(argv)
    for name in args.families:
        build, overrides = FAMILIES[name]
        model, processor = build()
        folder = args.out / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        print(f"{folder}: {sum(p.numel() for p in model.parameters()):,} parameters\n  {command(folder, overrides)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
