"""How much a question-aware pruner could gain on the synthetic task: the frozen backbone's accuracy with the objects
the question is not about (data.synthetic_vqa.question_objects) removed, before the language model or from a decoder
layer on, against the unpruned backbone, on the same eval questions.

An upper bound that reads the scenes' labels (no method can): every background token stays, only the distractor
objects leave. Removal from layer L on is soft mode with keep logits of +-1e4 at layer L, which equals dropping the
tokens there (tests/test_pruned_llava.py).

    python scripts/distractor_oracle.py --seed 3 --size 1000 --layers 2 4

``--model RUN ...`` adds trained pruned models (a run's output folder, ``pruned_final/``, a training state) on the same
questions, and a second table: the share of the asked objects and of the distractors each model still holds after its
merger and after each pruning stage (hard mode).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn
from tqdm import tqdm

from data.collator import VQACollator
from data.scoring import accuracy_by_type
from data.synthetic_vqa import SyntheticVQADataset
from models.backbones import load_backbone
from models.baselines.base import PreProjectorSelector, gather_tokens
from models.pruned_llava import PrunedLlava
from trainers.inference.evaluation import generate_pruned
from trainers.inference.pictures import kept_patches
from trainers.inference.pruned_model import PrunedModelError, load_pruned
from trainers.training.losses import irrelevant_tokens

FORCED = 1e4  # a keep logit that decides: log keep ~ 0 or ~ -1e4


def asked_mask(samples, backbone) -> torch.Tensor:
    """(B, N) bool, True at the vision tokens of the objects the question is about: those their boxes cover on the
    backbone's tokens, as :func:`distractor_mask` maps the others (a finer grid than the scenes' marks every token of
    an object's patch)."""
    return torch.stack([backbone.box_tokens(s.relevance.relevant, s.image.size) for s in samples])


def distractor_mask(samples, backbone) -> torch.Tensor:
    """(B, N) bool, True at the vision tokens of objects the question is not about (the samples' relevance labels,
    through the training's own map from boxes to tokens)."""
    every = torch.ones(len(samples), backbone.num_vision_tokens, dtype=torch.bool)
    return irrelevant_tokens(backbone.box_tokens, [s.relevance for s in samples], [s.image.size for s in samples],
                             every).irrelevant


class WithoutDistractors(PreProjectorSelector):
    """Before the projector: every vision token but the distractors (``drop`` (B, N), set per batch)."""

    drop: torch.Tensor

    def forward(self, features, tau=1.0, question=None, question_mask=None, generator=None, vision_attention=None,
                valid=None):
        N = features.shape[1]
        keep = ~self.drop.to(features.device)
        width = int(keep.sum(dim=1).max())
        rank = keep.float() * 2 - torch.arange(N, device=features.device) / N  # kept first, in order
        positions = rank.topk(width, dim=1).indices.sort(dim=1).values  # (B, width)
        return self.padded_output(features, gather_tokens(features, positions), positions, keep.gather(1, positions))


class ForcedGate(nn.Module):
    """A pruner whose keep logits are given: -1e4 at the distractors (``drop``, set per batch), +1e4 elsewhere."""

    drop: torch.Tensor

    def forward(self, vision, question, question_mask):
        return torch.where(self.drop.to(vision.device), -FORCED, FORCED).to(vision.dtype)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="backbones/tiny-llava")
    parser.add_argument("--seed", type=int, default=0, help="the eval split's data seed (data_settings.seed)")
    parser.add_argument("--size", type=int, default=1000, help="eval questions")
    parser.add_argument("--layers", type=int, nargs="*", default=[2], help="also remove them from these decoder layers on")
    parser.add_argument("--model", nargs="*", default=[], metavar="RUN",
                        help="also trained pruned models (run folders, pruned_final/ folders or training states)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = load_backbone(args.backbone)
    N = backbone.num_vision_tokens
    bad = [layer for layer in args.layers if not 0 < layer < backbone.num_layers]
    if bad:
        parser.error(f"--layers {bad}: the backbone's decoder layers are 1..{backbone.num_layers - 1} "
                     "(removal before the LLM is always reported)")
    before = WithoutDistractors(1)
    gates = {layer: ForcedGate() for layer in args.layers}
    setups = {"unpruned": (PrunedLlava(backbone), "hard"),
              "distractors removed before the LLM": (PrunedLlava(backbone, merger=before), "hard")}
    for layer, gate in gates.items():
        setups[f"distractors removed from layer {layer} on"] = (
            PrunedLlava(backbone, pruners=nn.ModuleList([gate]), pruning_layers=[layer], stage_budgets=[N]).eval(),
            "soft")
    trained = {}
    for path in args.model:
        try:
            trained[path] = load_pruned(path, backbone=backbone).model.eval()
        except (OSError, PrunedModelError, ValueError) as err:
            parser.error(f"--model {path}: {err}")
        setups[path] = (trained[path], "hard")
    held = {path: 0 for path in trained}  # (stages, 5): asked kept, asked, distractors kept, distractors, kept
    data = SyntheticVQADataset(args.size, "eval", args.seed)
    collate = VQACollator(backbone.processor, with_answers=False)
    answers = {name: [] for name in setups}
    references, types = [], []
    for start in tqdm(range(0, args.size, args.batch_size), desc="distractor oracle"):
        samples = [data[i] for i in range(start, min(args.size, start + args.batch_size))]
        batch = collate(samples)
        before.drop = distractor_mask(samples, backbone)
        for gate in gates.values():
            gate.drop = before.drop
        for name, (model, mode) in setups.items():
            answers[name] += generate_pruned(model, batch, mode, 1.0, 4)[0]
        asked = asked_mask(samples, backbone)
        for path, model in trained.items():
            with torch.no_grad():
                out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], mode="hard")
            kept = [kept_patches(positions, batch["input_ids"], backbone.image_token_id, N)
                    for positions in out.kept_positions]
            held[path] = held[path] + torch.tensor([[(k & asked).sum(), asked.sum(), (k & before.drop).sum(),
                                                     before.drop.sum(), k.sum()] for k in kept])
        references += [s.answer for s in samples]
        types += [s.question_type for s in samples]
    scores = {name: accuracy_by_type(a, references, types) for name, a in answers.items()}
    columns = ["overall", *sorted(t for t in scores["unpruned"] if t not in ("overall", "all"))]
    print(f"\n{args.backbone}, {args.size} eval questions (data seed {args.seed})\n")
    print("| setup | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, score in scores.items():
        print(f"| {name} | " + " | ".join(f"{score[c]:.3f}" for c in columns) + " |")
    for path, counts in held.items():
        model = trained[path]
        print(f"\n{path}: asked objects / distractors still held (of {int(counts[0][1])} / {int(counts[0][3])})\n")
        print("| after | asked objects | distractors | vision tokens per question |")
        print("|---|---|---|---|")
        names = ["the merger", *(f"pruning before layer {layer}" for layer in sorted(model.stage_of_layer))]
        for name, (a, n_a, d, n_d, kept) in zip(names, counts.tolist()):
            print(f"| {name} | {int(a) / max(int(n_a), 1):.1%} | {int(d) / max(int(n_d), 1):.1%} "
                  f"| {int(kept) / args.size:.1f} |")


if __name__ == "__main__":
    main()
