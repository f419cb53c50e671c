"""Build and pretrain the embedded tiny LLaVA backbone on the synthetic VQA data.

    python scripts/pretrain_tiny_backbone.py --out backbones/tiny-llava                 # the shipped model
    python scripts/pretrain_tiny_backbone.py --out /tmp/tiny --steps 5 --eval-size 20   # a smoke run

Everything is trained (vision tower, projector, language model), LLaVA's two stages folded
into one, with three things that make a small model learn in minutes instead of hours:
- multi-turn samples: after the single-turn question in the evaluation format, the same
  image is asked ``--turns - 1`` more questions (``USER: q ASSISTANT: a</s>`` each), so
  every forward pass supervises several answers;
- a dense auxiliary loss that makes the vision features name the colour and the shape
  under every patch (two linear heads, dropped after pretraining);
- an alignment loss (LLaVA's stage-1 idea): each object's projected token, read through
  the word-embedding table, must name its colour word and its shape word (and, with
  ``--position-words``, its region's row word), so that a question word can
  find its object by attention from the first steps;
- a background curriculum: at first the language model's attention cannot see the
  background vision tokens (they are masked as keys), so it learns to find objects among a
  handful of tokens; from ``--curriculum-start`` to ``--curriculum-end`` (fractions of the
  steps) each background token becomes visible with a probability rising from 0 to 1, and
  the rest of the run trains on the plain format the model is evaluated on.
Deterministic from ``--seed``; the result is saved with ``save_pretrained`` beside a
model card.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from data.collator import VQACollator, build_prompt
from data.processors import word_level_processor
from data.scoring import accuracy_by_type
from data.synthetic_vqa import (COLORS, GRID, REGION_PATCHES, ROW_NAMES, SHAPES, SyntheticVQADataset,
                                patch_labels, scene_questions)
from models.llava_backbone import LlavaBackbone
from models.sequences import IGNORE_INDEX
from models.tiny_llava import build_llava
from trainers.inference.evaluation import evaluate_accuracy, generate_baseline_answers
from trainers.inference.timing import machine
from trainers.training.losses import task_loss


class PatchHeads(nn.Module):
    """Auxiliary heads: colour and shape class of the object under each patch (0 = background)."""

    def __init__(self, dim: int):
        super().__init__()
        self.color = nn.Linear(dim, len(COLORS) + 1)
        self.shape = nn.Linear(dim, len(SHAPES) + 1)

    def loss(self, features: torch.Tensor, colors: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
        # Object patches are ~3% of all: weight them up so the heads do not settle on "background".
        weight = 1.0 + 20.0 * (colors > 0).float()  # (B, N)
        ce_color = F.cross_entropy(self.color(features).transpose(1, 2), colors, reduction="none")
        ce_shape = F.cross_entropy(self.shape(features).transpose(1, 2), shapes, reduction="none")
        return ((ce_color + ce_shape) * weight).sum() / weight.sum()


def patch_word_targets(colors: torch.Tensor, shapes: torch.Tensor, tokenizer, position_words: bool) -> list[torch.Tensor]:
    """Per patch (B, N), the word ids an object token must name (its colour, its shape and, with
    ``position_words``, its region's row word); IGNORE_INDEX on background patches."""
    ids = lambda words: torch.tensor(tokenizer.convert_tokens_to_ids(list(words)))
    background = colors == 0
    targets = [ids(COLORS)[(colors - 1).clamp_min(0)], ids(SHAPES)[(shapes - 1).clamp_min(0)]]
    if position_words:
        patch = torch.arange(colors.shape[1]).expand_as(colors)
        targets.append(ids(ROW_NAMES)[patch // GRID // REGION_PATCHES])
    return [t.masked_fill(background, IGNORE_INDEX) for t in targets]


def alignment_loss(projected: torch.Tensor, word_embeddings: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
    """Object tokens (B, N, D) read through the embedding table (V, D) must name their words (LLaVA's stage-1 idea)."""
    logits = (projected @ word_embeddings.T).flatten(0, 1)  # (B * N, V)
    return sum(F.cross_entropy(logits, t.flatten(), ignore_index=IGNORE_INDEX) for t in targets)


def multi_turn_batch(samples, processor, seed: int, offset: int, turns: int) -> dict:
    """The evaluation-format first turn, then up to ``turns - 1`` more questions on the same image.

    Labels cover every answer and its end-of-sequence token.
    """
    tok = processor.tokenizer
    texts = []
    for i, sample in enumerate(samples):
        rng = np.random.default_rng([seed, 7, offset + i])
        extra = scene_questions(sample.objects, rng)
        rng.shuffle(extra)
        text = f"{build_prompt(sample.question)} {sample.answer}{tok.eos_token}"
        text += "".join(f" USER: {q} ASSISTANT: {a}{tok.eos_token}" for _, q, a in extra[: turns - 1])
        texts.append(text)
    batch = dict(processor(images=[s.image for s in samples], text=texts, padding=True, return_tensors="pt"))
    ids = batch["input_ids"]
    assistant, colon = tok.convert_tokens_to_ids("ASSISTANT"), tok.convert_tokens_to_ids(":")
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 2:] = (ids[:, :-2] == assistant) & (ids[:, 1:-1] == colon)  # first answer token of each turn
    ends = ids == tok.eos_token_id
    # inside an answer: after a start, up to and including the next EOS
    inside = (starts.long().cumsum(1) - ends.long().cumsum(1) + ends.long()) > 0
    batch["labels"] = torch.where(inside, ids, torch.full_like(ids, IGNORE_INDEX))
    return batch


class PretrainBatches(torch.utils.data.Dataset):
    """Batch ``step`` of pretraining (multi-turn texts, images, patch labels): a pure function of the step,
    so that DataLoader workers can build batches ahead of the model without changing the result."""

    def __init__(self, processor, train: SyntheticVQADataset, args: argparse.Namespace):
        self.processor, self.train, self.args = processor, train, args

    def __len__(self) -> int:
        return self.args.steps

    def __getitem__(self, step: int) -> dict:
        first = self.args.sample_offset + step * self.args.batch_size
        samples = [self.train[first + i] for i in range(self.args.batch_size)]
        batch = multi_turn_batch(samples, self.processor, self.args.seed, first, self.args.turns)
        labels = [patch_labels(s.objects) for s in samples]
        batch["colors"] = torch.from_numpy(np.stack([c for c, _ in labels]))  # (B, N)
        batch["shapes"] = torch.from_numpy(np.stack([s for _, s in labels]))  # (B, N)
        return batch


def background_visibility(step: int, total: int, start: float, end: float) -> float:
    """Probability that a background vision token is visible to the LM: 0 until ``start``, 1 from ``end``."""
    progress = step / total
    if progress >= end:
        return 1.0
    return 0.0 if progress <= start else (progress - start) / (end - start)


def hide_background(attention_mask: torch.Tensor, image_mask: torch.Tensor, colors: torch.Tensor,
                    visible: float, generator: torch.Generator) -> torch.Tensor:
    """The 2D mask with each background image token hidden (0) with probability 1 - ``visible``."""
    if visible >= 1.0:
        return attention_mask
    background = torch.zeros_like(image_mask)
    background[image_mask] = (colors == 0).flatten()  # image tokens come in patch order
    hidden = background & (torch.rand(attention_mask.shape, generator=generator) >= visible)
    return attention_mask.masked_fill(hidden, 0)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def first_token_accuracy(backbone: LlavaBackbone, batches: list[dict]) -> dict[str, float]:
    """Teacher-forced accuracy of the answer's first token per question type (a cheap progress signal)."""
    predicted, expected, types = [], [], []
    for batch in batches:
        device = backbone.device
        logits = backbone(batch["input_ids"].to(device), batch["pixel_values"].to(device),
                          batch["attention_mask"].to(device)).cpu()
        labels = batch["labels"]
        first = (labels != IGNORE_INDEX).float().argmax(dim=1)  # first answer position per sample
        rows = torch.arange(len(first))
        predicted += [str(i) for i in logits[rows, first - 1].argmax(-1).tolist()]
        expected += [str(i) for i in labels[rows, first].tolist()]
        types += batch["question_types"]
    return accuracy_by_type(predicted, expected, types)


def write_model_card(out: Path, args: argparse.Namespace, model: LlavaForConditionalGeneration, report: dict) -> None:
    text, vision = model.config.text_config, model.config.vision_config
    n_params = sum(p.numel() for p in model.parameters())
    per_type = "\n".join(f"| {k} | {v:.3f} |" for k, v in report["accuracy"].items())
    card = f"""# tiny-llava: the embedded CPU backbone

A small `LlavaForConditionalGeneration` pretrained on the project's synthetic VQA data
(`data/synthetic_vqa.py`), so that the whole pruning pipeline runs on a CPU with no download.

- Vision tower: CLIP, {vision.num_hidden_layers} layers x {vision.hidden_size}, {vision.image_size} px images,
  {vision.patch_size} px patches: {(vision.image_size // vision.patch_size) ** 2} vision tokens
  (feature layer {model.config.vision_feature_layer}, `{model.config.vision_feature_select_strategy}` strategy).
- Language model: Llama, {text.num_hidden_layers} layers x {text.hidden_size}, MLP {text.intermediate_size},
  {text.num_attention_heads} heads, word-level vocabulary of {text.vocab_size} tokens.
- Parameters: {n_params:,} ({n_params * 4 / 2**20:.1f} MiB in fp32).
- Pretraining: {len(report['phases'])} phase(s), {sum(p['steps'] for p in report['phases'])} steps and
  {sum(p['wall_time_s'] for p in report['phases']) / 60:.1f} min in all (machines below). Last phase:
  {report['steps']} steps, batch {args.batch_size}, {args.turns} questions per image, background curriculum
  {args.curriculum_start}-{args.curriculum_end}, position words {'on' if args.position_words else 'off'}, AdamW
  peak lr {args.lr} with warm-up and cosine decay, auxiliary loss weight {args.aux_weight}, data seed {args.seed}.
- Held-out accuracy ({report['eval_size']} eval-split samples, greedy generation, normalised exact match;
  the majority answer scores {report['majority_baseline']:.3f}):

| question type | accuracy |
|---|---|
{per_type}

Rebuilt with (phase by phase; the data code of the named commit, the machine it ran on):

""" + "\n".join(f"    {p['command']}\n        # {p.get('commit', 'commit unknown')}, {p.get('machine', 'machine unknown')}"
                 for p in report["phases"]) + "\n"
    (out / "README.md").write_text(card)
    (out / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")


def earlier_phases(init_from: Path | None) -> list[dict]:
    """The pretraining phases recorded beside the backbone a further phase starts from."""
    path = init_from / "pretraining.json" if init_from is not None else None
    if path is None or not path.exists():
        return []
    report = json.loads(path.read_text())
    return report.get("phases") or [{key: report[key] for key in ("command", "steps", "wall_time_s")}]


def source_commit() -> str:
    """The project's git commit (the data and model code this phase ran), or 'commit unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return f"commit {out.stdout.strip()}" + (" with local changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"


def majority_baseline(dataset: SyntheticVQADataset) -> float:
    counts: dict[str, int] = {}
    for i in range(len(dataset)):
        answer = dataset[i].answer
        counts[answer] = counts.get(answer, 0) + 1
    return max(counts.values()) / len(dataset)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to save the backbone into")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--aux-weight", type=float, default=1.0, help="weight of the patch and alignment losses")
    parser.add_argument("--turns", type=int, default=5, help="questions asked per image in pretraining")
    parser.add_argument("--curriculum-start", type=float, default=0.25,
                        help="fraction of the steps with every background token hidden from the LM")
    parser.add_argument("--curriculum-end", type=float, default=0.6,
                        help="fraction of the steps from which every background token is visible")
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-from", type=Path, help="continue from a saved backbone folder instead of a new model")
    parser.add_argument("--position-words", action="store_true",
                        help="the alignment loss also asks each object token to name its region's row word")
    parser.add_argument("--sample-offset", type=int, default=0,
                        help="index of the first training sample (a further phase uses samples the first did not)")
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--stop-after", type=int, help="end the phase after this many steps (the schedule still spans --steps)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (results are not bit-identical across devices)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes that build batches ahead")
    parser.add_argument("--probe-every", type=int, default=250, help="steps between progress probes and saves")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.eval_size < 1:
        parser.error("--steps, --batch-size and --eval-size must be positive")
    return args

@dataclass
class Pretraining:
    """What the phases share: the model being pretrained, its processor and heads, the optimizer and the data."""

    model: LlavaForConditionalGeneration
    processor: LlavaProcessor
    backbone: LlavaBackbone
    heads: PatchHeads
    optimizer: torch.optim.Optimizer
    train: SyntheticVQADataset
    eval_set: SyntheticVQADataset
    device: torch.device

    @property
    def params(self) -> list[torch.Tensor]:
        return [*self.model.parameters(), *self.heads.parameters()]


def build(args: argparse.Namespace) -> Pretraining:
    """A new tiny LLaVA (or the one ``--init-from`` names), its auxiliary heads, AdamW and the datasets."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.init_from is not None:  # a further phase of pretraining, from a saved backbone
        processor = LlavaProcessor.from_pretrained(args.init_from, local_files_only=True)
        model = LlavaForConditionalGeneration.from_pretrained(args.init_from, local_files_only=True)
    else:
        processor = word_level_processor()
        model = build_llava(processor.tokenizer, "tiny", text_layers=args.text_layers)
    device = torch.device(args.device)
    backbone = LlavaBackbone(model.to(device), processor, freeze=False)
    heads = PatchHeads(backbone.vision_hidden_size).to(device)
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=args.lr, weight_decay=0.01)
    train = SyntheticVQADataset(args.sample_offset + args.steps * args.batch_size, "train", args.seed)
    eval_set = SyntheticVQADataset(args.eval_size, "eval", args.seed)
    return Pretraining(model, processor, backbone, heads, optimizer, train, eval_set, device)


def pretraining_step(run: Pretraining, batch: dict, step: int, args: argparse.Namespace,
                     curriculum_rng: torch.Generator) -> dict[str, float]:
    """One update: the answers' loss plus the patch and alignment losses, background hidden by the curriculum."""
    backbone, device = run.backbone, run.device
    colors, shapes, ids = batch["colors"], batch["shapes"], batch["input_ids"]
    visible = background_visibility(step, args.steps, args.curriculum_start, args.curriculum_end)
    mask = hide_background(batch["attention_mask"], backbone.image_token_mask(ids), colors, visible, curriculum_rng)
    words = patch_word_targets(colors, shapes, run.processor.tokenizer, args.position_words)
    ids, mask, colors, shapes = ids.to(device), mask.to(device), colors.to(device), shapes.to(device)

    run.model.train()
    features = backbone.vision_features(batch["pixel_values"].to(device))  # (B, N, Dv)
    projected = backbone.project(features)  # (B, N, D)
    embeds = backbone.merge_image_embeddings(ids, projected)
    logits = backbone.lm_head(backbone.decode(embeds, mask))
    task = task_loss(logits, batch["labels"].to(device))
    aux = run.heads.loss(features, colors, shapes) + alignment_loss(
        projected, backbone.language_model.embed_tokens.weight, [w.to(device) for w in words])
    loss = task + args.aux_weight * aux
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss at step {step}: task {task.item()}, aux {aux.item()}")
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, 1.0)
    run.optimizer.step()
    return {"task": task.item(), "aux": aux.item(), "gnorm": float(grad_norm), "bg": visible}


def save(run: Pretraining, out: Path) -> None:
    run.model.save_pretrained(out)
    run.processor.save_pretrained(out)


def pretrain(run: Pretraining, args: argparse.Namespace) -> tuple[int, float]:
    """The training loop, probing and saving every ``--probe-every`` steps; (steps run, wall seconds)."""
    collate = VQACollator(run.processor)
    probe = [collate([run.eval_set[j] for j in range(i, min(i + 64, len(run.eval_set)))])
             for i in range(0, min(320, len(run.eval_set)), 64)]
    curriculum_rng = torch.Generator().manual_seed(args.seed)
    start = time.time()
    n_steps = min(args.steps, args.stop_after or args.steps)
    loader = torch.utils.data.DataLoader(PretrainBatches(run.processor, run.train, args), batch_size=None,
                                         sampler=range(n_steps), num_workers=args.workers)
    bar = tqdm(loader, total=n_steps, desc="pretraining tiny-llava")
    for step, batch in enumerate(bar):
        values = pretraining_step(run, batch, step, args, curriculum_rng)
        bar.set_postfix({key: f"{value:.3f}" if key != "bg" else f"{value:.2f}" for key, value in values.items()})
        if (step + 1) % args.probe_every == 0 or step + 1 == n_steps:
            run.model.eval()
            acc = first_token_accuracy(run.backbone, probe)
            tqdm.write(f"[step {step + 1}] {(time.time() - start) / 60:.1f} min, probe accuracy "
                       + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
            save(run, args.out)  # nothing lost if the run is stopped
    return n_steps, time.time() - start


def final_report(run: Pretraining, args: argparse.Namespace, argv: list[str] | None, n_steps: int, wall: float,
                 commit: str) -> dict:
    """The final evaluation (stock generate) and the phase's record, appended to the earlier phases'."""
    run.model.eval()
    prompts = VQACollator(run.processor, with_answers=False)
    eval_set = run.eval_set
    batches = (prompts([eval_set[j] for j in range(i, min(i + 64, len(eval_set)))]) for i in range(0, len(eval_set), 64))
    accuracy = evaluate_accuracy(lambda b: generate_baseline_answers(run.backbone, b), batches, desc="final eval")
    report = {
        "steps": n_steps, "wall_time_s": round(wall, 1), "eval_size": args.eval_size,
        "accuracy": {k: round(v, 4) for k, v in sorted(accuracy.items())},
        "majority_baseline": round(majority_baseline(eval_set), 4),
        "machine": machine(run.device),
        "command": "python scripts/pretrain_tiny_backbone.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    report["phases"] = earlier_phases(args.init_from)
    report["commit"] = commit
    report["phases"].append({key: report[key] for key in ("command", "steps", "wall_time_s", "machine", "commit")})
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    commit = source_commit()  # at the start: the code this phase runs, even if the checkout moves on meanwhile
    run = build(args)
    args.out.mkdir(parents=True, exist_ok=True)
    n_steps, wall = pretrain(run, args)
    report = final_report(run, args, argv, n_steps, wall, commit)
    save(run, args.out)
    write_model_card(args.out, args, run.model, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
