"""Build and pretrain the embedded tiny LLaVA backbone on the synthetic VQA data.

    python scripts/pretrain_tiny_backbone.py --out /tmp/tiny --steps 5 --eval-size 20   # a smoke run

The shipped model's phases, each with its command, are in its model card (backbones/tiny-llava/README.md).
Two stages, as llava-1.5 is built:
- the CLIP stage (``--clip-steps``, 0: none): the vision tower and a small text tower (models/tiny_clip.py) trained
  contrastively (CLIP's symmetric InfoNCE, learned temperature) on training scenes against captions read off their
  objects (data/captions.py), so that the CLS token summarises the image and the text tower embeds words near their
  objects' patches, as the methods that read CLIP's CLS attention or text tower expect;
- the LLaVA stage (``--steps``) on that tower: the projector and the language model (and the tower, unless
  ``--freeze-vision``, llava-1.5's choice), LLaVA's two stages folded into one. ``--init-from F --fresh-vision``
  keeps only F's language model (as llava-1.5 starts from a pretrained Vicuna): a new tower for the CLIP stage and a
  new projector. Things that make a small model learn in minutes instead of hours:
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
model card, and the CLIP (its text tower, projections and the same vision tower) in ``clip/`` under it. The card
gives the tower checks before and after each stage: the share of the CLS token's attention on the objects, and how
often a question's text embedding is nearest to a patch of an object it names (held-out scenes).
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
from transformers import CLIPModel, CLIPProcessor, LlavaForConditionalGeneration, LlavaProcessor

from data.captions import caption_rng, clip_processor, scene_caption
from data.collator import VQACollator, build_prompt
from data.processors import word_level_processor
from data.scoring import accuracy_by_type
from data.synthetic_vqa import (COLORS, GRID, REGION_PATCHES, ROW_NAMES, SHAPES, SyntheticVQADataset, make_sample,
                                patch_index, patch_labels, question_objects, scene_questions)
from models.llava_backbone import LlavaBackbone
from models.sequences import IGNORE_INDEX
from models.tiny_clip import build_clip, cls_attention_share, patch_embeddings, share_vision_tower, text_patch_ranking
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


class CaptionedScenes(torch.utils.data.Dataset):
    """Batch ``step`` of the CLIP stage: training scenes from index 0 and their captions (pixel values, caption ids
    and mask), a pure function of the step like :class:`PretrainBatches`."""

    def __init__(self, processor: CLIPProcessor, args: argparse.Namespace):
        self.processor, self.args = processor, args

    def __len__(self) -> int:
        return self.args.clip_steps

    def __getitem__(self, step: int) -> dict:
        first = step * self.args.clip_batch_size
        samples = [make_sample(self.args.seed, "train", first + i) for i in range(self.args.clip_batch_size)]
        captions = [scene_caption(s.objects, caption_rng(self.args.seed, "train", first + i))
                    for i, s in enumerate(samples)]
        return dict(self.processor(images=[s.image for s in samples], text=captions, padding=True, return_tensors="pt"))


def clip_step(clip: CLIPModel, optimizer: torch.optim.Optimizer, batch: dict, lr: float) -> float:
    """One contrastive update on (image, caption) pairs: CLIP's symmetric cross-entropy over the batch's pairs,
    at the learned temperature, which stays at most 100 as CLIP's does; the loss before the update."""
    clip.train()
    loss = clip(**batch, return_loss=True).loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite contrastive loss {loss.item()} at logit scale {clip.logit_scale.item()}")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():
        clip.logit_scale.clamp_(0.0, math.log(100.0))
    return loss.item()


def clip_stage(run: "Pretraining", args: argparse.Namespace) -> float:
    """``--clip-steps`` contrastive updates of the CLIP (the LLaVA's vision tower inside it), the tower checks every
    ``--probe-every`` steps; its wall seconds, the checks' included."""
    optimizer = torch.optim.AdamW(run.clip.parameters(), lr=args.clip_lr, weight_decay=0.1)
    loader = torch.utils.data.DataLoader(CaptionedScenes(run.clip_processor, args), batch_size=None,
                                         sampler=range(args.clip_steps), num_workers=args.workers)
    start = time.time()
    bar = tqdm(loader, total=args.clip_steps, desc="CLIP stage")
    for step, batch in enumerate(bar):
        lr = lr_at(step, args.clip_steps, args.clip_lr, args.clip_warmup)
        loss = clip_step(run.clip, optimizer, {k: v.to(run.device) for k, v in batch.items()}, lr)
        bar.set_postfix({"loss": f"{loss:.3f}", "scale": f"{run.clip.logit_scale.exp().item():.1f}"})
        if (step + 1) % args.probe_every == 0 and step + 1 < args.clip_steps:
            checks = check_tower(run)
            tqdm.write(f"[CLIP step {step + 1}] {(time.time() - start) / 60:.1f} min, loss {loss:.3f}, "
                       + ", ".join(f"{k} {v:.3f}" for k, v in checks.items() if k != "scenes"))
    return time.time() - start


@torch.no_grad()
def tower_checks(backbone: LlavaBackbone, clip: CLIPModel | None, clip_tokenizer, scenes: SyntheticVQADataset,
                 batch_size: int = 100) -> dict[str, float]:
    """What the methods that read CLIP's tower find in this one, on held-out scenes (means over scenes):

    - ``cls_on_objects``: the share of the CLS token's attention on the object patches, at the layer LLaVA's features
      come from (the one VisionZip reads), and ``objects_share``, what attention spread evenly would give;
    - with a CLIP: ``question_over_patches`` / ``question_over_objects``, how often the text embedding of the scene's
      question is nearer to a patch of an object it names than to another patch / another object's patch (chance
      0.5; scenes whose question names an object and leaves another out); ``image_to_caption``, how often an image's
      own caption is the nearest of its batch's captions (``image_to_caption_chance``: 1 / batch).
    """
    sums: dict[str, list[torch.Tensor]] = {}
    add = lambda key, values: sums.setdefault(key, []).append(values.float().cpu())
    for first in range(0, len(scenes), batch_size):
        samples = [scenes[i] for i in range(first, min(first + batch_size, len(scenes)))]
        pixels = backbone.processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
        seen = backbone.vision_features_with_attention(pixels.to(backbone.device))
        objects = torch.from_numpy(np.stack([patch_labels(s.objects)[0] > 0 for s in samples])).to(backbone.device)
        add("cls_on_objects", cls_attention_share(seen.cls_attention, objects))
        add("objects_share", objects.float().mean(dim=1))
        if clip is None:
            continue
        named = torch.zeros_like(objects)
        for row, sample in enumerate(samples):
            named[row, [patch_index(o) for o in question_objects(sample)]] = True
        questions = clip_tokenizer([s.question for s in samples], padding=True, return_tensors="pt").to(backbone.device)
        text = clip.get_text_features(**questions).pooler_output  # (B, P)
        patches = patch_embeddings(clip, seen.features)  # (B, N, P)
        for key, others in (("question_over_patches", torch.ones_like(objects)), ("question_over_objects", objects)):
            rows = named.any(dim=1) & (others & ~named).any(dim=1)
            add(key, text_patch_ranking(text[rows], patches[rows], named[rows], others[rows]))
        captions = [scene_caption(s.objects, caption_rng(scenes.seed, scenes.split, first + i))
                    for i, s in enumerate(samples)]
        pairs = clip(**clip_tokenizer(captions, padding=True, return_tensors="pt").to(backbone.device),
                     pixel_values=pixels.to(backbone.device))
        add("image_to_caption", pairs.logits_per_image.argmax(dim=1).cpu() == torch.arange(len(samples)))
        add("image_to_caption_chance", torch.full((len(samples),), 1 / len(samples)))
    checks = {key: round(torch.cat(values).mean().item(), 4) for key, values in sums.items()}
    return {"scenes": len(scenes), **checks}


def check_tower(run: "Pretraining") -> dict[str, float]:
    """:func:`tower_checks` of the run's tower and CLIP on its held-out check scenes."""
    run.model.eval()
    return tower_checks(run.backbone, run.clip, run.clip_processor.tokenizer, run.check_set)


def checks_table(checks: dict[str, dict[str, float]]) -> str:
    """The tower checks as a Markdown table, chance first, then a row per stage; '-' where no text tower was measured."""
    columns = ("cls_on_objects", "question_over_patches", "question_over_objects", "image_to_caption")
    last = list(checks.values())[-1]
    chance = {"cls_on_objects": last["objects_share"]}
    if "image_to_caption" in last:
        chance.update(question_over_patches=0.5, question_over_objects=0.5,
                      image_to_caption=last["image_to_caption_chance"])
    cell = lambda row, key: f"{row[key]:.3f}" if key in row else "-"
    header = ["| tower | CLS attention on objects | question: its objects over other patches "
              "| question: its objects over other objects | image: own caption first |", "|---|---|---|---|---|"]
    return "\n".join(header + [f"| {name} | " + " | ".join(cell(row, k) for k in columns) + " |"
                               for name, row in [("chance", chance), *checks.items()]])


def write_model_card(out: Path, args: argparse.Namespace, model: LlavaForConditionalGeneration, report: dict,
                     clip: CLIPModel | None) -> None:
    text, vision = model.config.text_config, model.config.vision_config
    n_params = sum(p.numel() for p in model.parameters())
    per_type = "\n".join(f"| {k} | {v:.3f} |" for k, v in report["accuracy"].items())
    phases = report["phases"]
    minutes = lambda seconds: f"{seconds / 60:.1f} min"
    clip_text = clip.config.text_config if clip is not None else None
    clip_line = ("- No CLIP stage: the vision tower learnt through LLaVA only, and no text tower goes with it."
                 if clip is None else
                 f"- CLIP (`clip/`): this vision tower and a text tower ({clip_text.num_hidden_layers} layers x "
                 f"{clip_text.hidden_size}, pooled at `</s>`)\n  over the same words, both projected to "
                 f"{clip.config.projection_dim} dimensions, trained contrastively on scenes against captions of their\n"
                 "  objects (`data/captions.py`); `CLIPModel.from_pretrained` and `AutoProcessor.from_pretrained` of "
                 "`clip/` load it.")
    sign = getattr(clip.config, "patch_text_sign", None) if clip is not None else None
    sign_line = ("" if sign is None else
                 f"\nThe CLIP's config records `patch_text_sign: {sign}`: a question's text embedding is "
                 f"{'nearer to' if sign > 0 else 'farther from'} the patches it names than the others on the last "
                 "row above, so CDPruner's relevance reads the cosine "
                 f"{'as it is' if sign > 0 else 'negated'} (`models/clip_relevance.py`; OpenAI's CLIP, which records "
                 "none, gets the paper's negation).\n")
    fresh_line = ("" if not args.fresh_vision else
                  "\n  The last phase kept only the language model of the earlier ones (`--fresh-vision`, as llava-1.5 "
                  "starts\n  from a pretrained Vicuna): its vision tower was new, trained by the CLIP stage from "
                  "random weights,\n  and its projector was new.")
    card = f"""# tiny-llava: the embedded CPU backbone

A small `LlavaForConditionalGeneration` pretrained on the project's synthetic VQA data
(`data/synthetic_vqa.py`), so that the whole pruning pipeline runs on a CPU with no download.

- Vision tower: CLIP, {vision.num_hidden_layers} layers x {vision.hidden_size}, {vision.image_size} px images,
  {vision.patch_size} px patches: {(vision.image_size // vision.patch_size) ** 2} vision tokens
  (feature layer {model.config.vision_feature_layer}, `{model.config.vision_feature_select_strategy}` strategy).
- Language model: Llama, {text.num_hidden_layers} layers x {text.hidden_size}, MLP {text.intermediate_size},
  {text.num_attention_heads} heads, word-level vocabulary of {text.vocab_size} tokens.
- Parameters: {n_params:,} ({n_params * 4 / 2**20:.1f} MiB in fp32).
{clip_line}
- Pretraining: {len(phases)} phase(s), {sum(p.get('clip_steps', 0) for p in phases)} CLIP-stage and \
{sum(p['steps'] for p in phases)} LLaVA-stage steps, \
{minutes(sum(p['wall_time_s'] + p.get('clip_wall_time_s', 0) for p in phases))} in all (machines below).{fresh_line}
  Last phase: CLIP stage {report['clip_steps']} steps at batch {args.clip_batch_size}, peak lr {args.clip_lr} \
({minutes(report['clip_wall_time_s'])}); LLaVA stage {report['steps']} steps ({minutes(report['wall_time_s'])}),
  vision tower {'frozen' if args.freeze_vision else 'trained'}, batch {args.batch_size}, {args.turns} questions per \
image, background curriculum {args.curriculum_start}-{args.curriculum_end},
  position words {'on' if args.position_words else 'off'}, AdamW peak lr {args.lr} with warm-up and cosine decay, \
auxiliary loss weight {args.aux_weight}, data seed {args.seed}.
- Held-out accuracy ({report['eval_size']} eval-split samples, greedy generation, normalised exact match;
  the majority answer scores {report['majority_baseline']:.3f}):

| question type | accuracy |
|---|---|
{per_type}

Vision tower checks on {list(report['tower_checks'].values())[-1]['scenes']} held-out scenes, where methods made for
CLIP's tower read it: the share of the CLS token's attention (at the feature layer, mean over heads: what VisionZip
and VisPruner rank by) on the object patches; how often the text tower's embedding of the scene's question is nearer
to a patch of an object it names than to another patch, or than to another object's patch (CDPruner's relevance;
a patch's embedding is its feature through CLIP's post-layernorm and projection); how often an image's own caption
is the nearest of its batch's.

{checks_table(report['tower_checks'])}
{sign_line}
Rebuilt with (phase by phase; the data code of the named commit, the machine it ran on):

""" + "\n".join(f"    {p['command']}\n        # {p.get('commit', 'commit unknown')}, {p.get('machine', 'machine unknown')}"
                 for p in phases) + "\n"
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
    clip = parser.add_argument_group("CLIP stage", "contrastive pretraining of the vision tower and a text tower")
    clip.add_argument("--clip-steps", type=int, default=0,
                      help="steps of the CLIP stage before the LLaVA stage (0: none; the tower learns through LLaVA)")
    clip.add_argument("--clip-batch-size", type=int, default=128, help="(image, caption) pairs per contrastive step")
    clip.add_argument("--clip-lr", type=float, default=1e-3)
    clip.add_argument("--clip-warmup", type=int, default=50)
    clip.add_argument("--fresh-vision", action="store_true",
                      help="with --init-from: a new random vision tower and projector, only the language model kept "
                           "(the CLIP stage then trains the tower from scratch, as CLIP's is before LLaVA's)")
    clip.add_argument("--freeze-vision", action="store_true",
                      help="the LLaVA stage leaves the vision tower as it is (llava-1.5 keeps CLIP's tower frozen)")
    clip.add_argument("--check-size", type=int, default=500, help="held-out scenes of the vision tower checks")
    args = parser.parse_args(argv)
    problems = [f"{flag} must be positive, got {value}" for flag, value in
                (("--steps", args.steps), ("--batch-size", args.batch_size), ("--eval-size", args.eval_size),
                 ("--clip-batch-size", args.clip_batch_size), ("--check-size", args.check_size)) if value < 1]
    if args.fresh_vision and args.init_from is None:
        problems.append("--fresh-vision keeps the language model of --init-from: give --init-from")
    if args.fresh_vision and args.init_from is not None and (args.init_from / "clip").is_dir():
        problems.append(f"--fresh-vision replaces the tower that {args.init_from / 'clip'} was trained with: continue "
                        "without --fresh-vision, or start from a backbone without clip/")
    if args.clip_steps < 0:
        problems.append(f"--clip-steps must be 0 or more, got {args.clip_steps}")
    if not has_clip(args) and (args.out / "clip").exists():
        problems.append(f"{args.out / 'clip'} holds a CLIP this run would not match (no --clip-steps, no clip/ under "
                        "--init-from): remove it, or pass --clip-steps")
    if problems:
        parser.error("; ".join(problems))
    return args


def has_clip(args: argparse.Namespace) -> bool:
    """Whether this phase ends with a trained text tower: it runs a CLIP stage, or continues a backbone that has one."""
    return args.clip_steps > 0 or (args.init_from is not None and (args.init_from / "clip").is_dir())


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
    clip: CLIPModel | None  # its vision model is the LLaVA's tower; None when the phase has no text tower
    clip_processor: CLIPProcessor
    check_set: SyntheticVQADataset

    @property
    def params(self) -> list[torch.Tensor]:
        return [*self.model.parameters(), *self.heads.parameters()]


def build(args: argparse.Namespace) -> Pretraining:
    """A new tiny LLaVA (or the one ``--init-from`` names), its auxiliary heads, AdamW, the datasets, and the CLIP
    around its tower (the one saved under ``--init-from``, else a new text tower) when the phase has one."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.init_from is not None:  # a further phase of pretraining, from a saved backbone
        processor = LlavaProcessor.from_pretrained(args.init_from, local_files_only=True)
        model = LlavaForConditionalGeneration.from_pretrained(args.init_from, local_files_only=True)
        if args.fresh_vision:  # llava-1.5's recipe: a new projector between a CLIP tower and a pretrained LM
            fresh = LlavaForConditionalGeneration(model.config)
            model.model.vision_tower.load_state_dict(fresh.model.vision_tower.state_dict())
            model.model.multi_modal_projector.load_state_dict(fresh.model.multi_modal_projector.state_dict())
    else:
        processor = word_level_processor()
        model = build_llava(processor.tokenizer, "tiny", text_layers=args.text_layers)
    device = torch.device(args.device)
    backbone = LlavaBackbone(model.to(device), processor, freeze=False)
    heads = PatchHeads(backbone.vision_hidden_size).to(device)
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=args.lr, weight_decay=0.01)
    train = SyntheticVQADataset(args.sample_offset + args.steps * args.batch_size, "train", args.seed)
    eval_set = SyntheticVQADataset(args.eval_size, "eval", args.seed)
    clip = None
    if has_clip(args):  # built last, so that a phase without one draws the same initial weights as before
        tower = model.model.vision_tower
        saved = args.init_from / "clip" if args.init_from is not None else None
        clip = (share_vision_tower(CLIPModel.from_pretrained(saved, local_files_only=True), tower)
                if saved is not None and saved.is_dir() else build_clip(processor.tokenizer, tower)).to(device)
    check_set = SyntheticVQADataset(args.check_size, "eval", args.seed)
    return Pretraining(model, processor, backbone, heads, optimizer, train, eval_set, device, clip, clip_processor(),
                       check_set)


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
    """The LLaVA and its processor in ``out``; the CLIP and its processor in ``out/clip``."""
    run.model.save_pretrained(out)
    run.processor.save_pretrained(out)
    if run.clip is not None:
        run.clip.save_pretrained(out / "clip")
        run.clip_processor.save_pretrained(out / "clip")


def pretrain(run: Pretraining, args: argparse.Namespace) -> tuple[int, float]:
    """The training loop, probing and saving every ``--probe-every`` steps; (steps run, wall seconds)."""
    collate = VQACollator(run.processor)
    probe = [collate([run.eval_set[j] for j in range(i, min(i + 64, len(run.eval_set)))])
             for i in range(0, min(320, len(run.eval_set)), 64)]
    curriculum_rng = torch.Generator().manual_seed(args.seed)
    run.model.model.vision_tower.requires_grad_(not args.freeze_vision)
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


def final_report(run: Pretraining, args: argparse.Namespace, argv: list[str] | None, stages: dict,
                 checks: dict[str, dict], commit: str) -> dict:
    """The final evaluation (stock generate), the stages' steps and wall seconds, the tower checks, and the phase's
    record, appended to the earlier phases'."""
    run.model.eval()
    prompts = VQACollator(run.processor, with_answers=False)
    eval_set = run.eval_set
    batches = (prompts([eval_set[j] for j in range(i, min(i + 64, len(eval_set)))]) for i in range(0, len(eval_set), 64))
    accuracy = evaluate_accuracy(lambda b: generate_baseline_answers(run.backbone, b), batches, desc="final eval")
    report = {
        **stages, "eval_size": args.eval_size,
        "accuracy": {k: round(v, 4) for k, v in sorted(accuracy.items())},
        "majority_baseline": round(majority_baseline(eval_set), 4),
        "tower_checks": checks,
        "machine": machine(run.device),
        "command": "python scripts/pretrain_tiny_backbone.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    report["phases"] = earlier_phases(args.init_from)
    report["commit"] = commit
    report["phases"].append({key: report[key] for key in ("command", "clip_steps", "clip_wall_time_s", "steps",
                                                          "wall_time_s", "machine", "commit")})
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    commit = source_commit()  # at the start: the code this phase runs, even if the checkout moves on meanwhile
    run = build(args)
    args.out.mkdir(parents=True, exist_ok=True)
    checks = {"before this phase": check_tower(run)}
    clip_wall = 0.0
    if args.clip_steps > 0:
        clip_wall = clip_stage(run, args)
        checks["after the CLIP stage"] = check_tower(run)
        save(run, args.out)
    n_steps, wall = pretrain(run, args)
    checks["after the LLaVA stage"] = check_tower(run)
    if run.clip is not None:  # which way round this tower's patch-text cosine points (models/clip_relevance.py)
        run.clip.config.patch_text_sign = 1 if checks["after the LLaVA stage"]["question_over_patches"] >= 0.5 else -1
    stages = {"clip_steps": args.clip_steps, "clip_wall_time_s": round(clip_wall, 1), "steps": n_steps,
              "wall_time_s": round(wall, 1)}
    report = final_report(run, args, argv, stages, checks, commit)
    save(run, args.out)
    write_model_card(args.out, args, run.model, report, run.clip)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
