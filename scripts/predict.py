"""Ask a trained pruned model about one image: the answer, the vision tokens per layer, the FLOPs saved, and a
picture of the patches that survive each stage.

    python scripts/predict.py --model outputs --image photo.jpg --question "what color is the object in the top row ?"

``--model``: a run's output_dir, a folder written by save_pretrained, or a training_state_*.pt
(trainers/inference/pruned_model.py). Writes ``--out`` (default kept_tokens.png): the image, what each patch
merged into (one colour per merged token), then the merger's output and each pruning stage, with
the dropped patches darkened.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image

from trainers.inference.evaluation import prefill_flops
from trainers.inference.pictures import darkened, kept_patch_grids, merged_into, model_view
from trainers.inference.pruned_model import PrunedModelError, load_pruned


def draw(pixels, grids, titles: list[str], path: Path, slots=None) -> None:
    """The image, what each patch merged into (``slots``: MergeOutput.assignment of the image), each stage's patches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(pixels, "image")]
    if slots is not None:
        panels.append((merged_into(pixels, slots), "merged into (a colour per token)"))
    fig, axes = plt.subplots(1, len(grids) + len(panels), figsize=(3 * (len(grids) + len(panels)), 3.2))
    for ax, (shown, title) in zip(axes, panels):
        ax.imshow(shown)
        ax.set_title(title, fontsize=9)
    for ax, grid, title in zip(axes[len(panels):], grids, titles):
        ax.imshow(darkened(pixels, grid))
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def picture_path(out: Path) -> Path:
    """Where the picture goes: ``out``, kept_tokens.png in it when it is a folder, .png added when it has no suffix
    (what the plotting library would do, so that the path printed is the file written)."""
    if out.is_dir():
        return out / "kept_tokens.png"
    return out if out.suffix else out.with_suffix(".png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run output_dir, saved pruned-model folder or training state")
    parser.add_argument("--image", required=True)
    parser.add_argument("--question", required=True)
    parser.add_argument("--backbone", help="backbone folder or id (default: the one the modules were trained on)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("kept_tokens.png"),
                        help="the picture's file (a folder: kept_tokens.png in it)")
    args = parser.parse_args(argv)
    args.out = picture_path(args.out)
    try:
        image = Image.open(args.image).convert("RGB")
        pruned = load_pruned(args.model, backbone=args.backbone, device=args.device)
    except (OSError, PrunedModelError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    inputs = pruned.processor(images=[image], text=pruned.prompts([args.question]), return_tensors="pt")
    extra = {key: inputs[key].to(args.device) for key in pruned.model.backbone.image_input_keys}
    answers, prefill = pruned.generate(inputs["input_ids"].to(args.device), inputs["pixel_values"].to(args.device),
                                       inputs["attention_mask"].to(args.device), args.max_new_tokens, **extra)
    model = pruned.model
    flops = prefill_flops(model, prefill, inputs["attention_mask"].to(args.device))
    layers = sorted(model.stage_of_layer)
    counts = [prefill.vision_tokens_per_layer[0], *(prefill.vision_tokens_per_layer[layer] for layer in layers)]
    print(f"answer: {answers[0]}")
    print(f"vision tokens: {int(prefill.image_tokens[0])} → " + " → ".join(f"{c:g}" for c in counts)
          + f" (merger, then before layers {layers})")
    print(f"LLM prefill FLOPs: {flops['flops_pruned']:.4g} of {flops['flops_baseline']:.4g} "
          f"({flops['flops_reduction']:.1%} saved, the pruning modules' own cost included)")
    if not model.backbone.one_patch_grid:
        print(f"no picture of the kept patches: {type(model.backbone).__name__}'s tokens are no single patch grid")
        return 0
    grids = kept_patch_grids(prefill.kept_positions, inputs["input_ids"], model.backbone.image_token_id,
                             model.backbone.num_vision_tokens)
    titles = [f"after the merger: {counts[0]:g}"] + [f"layer {layer}: {c:g}" for layer, c in zip(layers, counts[1:])]
    slots = prefill.merge.assignment[0] if prefill.merge is not None and prefill.merge.assignment is not None else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(model_view(inputs["pixel_values"], pruned.processor.image_processor), grids, titles, args.out, slots)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
