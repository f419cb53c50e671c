"""Evaluation: greedy answers scored by one function, token counts and FLOPs read off real tensors.

- ``accuracy_baseline``: the unpruned backbone through the stock ``generate``;
- ``accuracy_soft``: soft pruning (no noise), each new token recomputed over the whole prefix;
- ``accuracy_hard``: hard pruning (tokens really dropped), decoding through the KV cache;
- token counts: ``avg_original_tokens`` (vision tokens per image), ``avg_merged_tokens`` (after
  the merger) with ``merged_tokens_min`` / ``merged_tokens_max`` over the images (an adaptive
  budget varies per image), ``keep_ratio_merge`` (their ratio), ``tokens_after_layer_L`` for every pruning
  layer L and ``avg_vision_tokens_per_layer``, all counted from the hard-mode prefill's tensors;
- FLOPs of the LLM prefill (models/flops.py), baseline vs hard-pruned, per sample on its real
  (unpadded) tokens: ``flops_*`` over all tokens, ``vision_flops_reduction`` over vision tokens only;
  the pruned side includes the merger's and pruners' own cost; ``prefill_ms_per_sample``, the hard prefill's
  wall-clock time over the batch size (the eval batch, so it compares between runs at the same eval_batch_size).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch
from tqdm import tqdm

from data.scoring import accuracy_by_type, normalize_answer
from models.flops import fold_flops, llm_prefill_flops
from models.llava_backbone import LlavaBackbone
from models.pruned_llava import PrunedLlava, PrunedOutput
from models.sequences import IGNORE_INDEX
from trainers.inference.timing import stopwatch


def _to_device(batch: dict, backbone: LlavaBackbone) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    return (batch["input_ids"].to(backbone.device), batch["pixel_values"].to(backbone.device, backbone.dtype),
            batch["attention_mask"].to(backbone.device), backbone.image_inputs(batch))


@torch.no_grad()
def generate_baseline_answers(backbone: LlavaBackbone, batch: dict, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers of the unpruned backbone through the stock ``generate`` (prompt-only batch)."""
    tokenizer = backbone.processor.tokenizer
    ids, pixels, mask, image_inputs = _to_device(batch, backbone)
    out = backbone.stock_generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **image_inputs,
                                  max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def generate_pruned(model: PrunedLlava, batch: dict, mode: str, tau: float,
                    max_new_tokens: int) -> tuple[list[str], PrunedOutput]:
    """Greedy answers under soft or hard pruning, and the prefill's output (token counts), with the hard
    prefill's seconds in ``prefill.prefill_seconds``."""
    tok = model.backbone.processor.tokenizer
    ids, pixels, mask, image_inputs = _to_device(batch, model.backbone)
    if mode == "hard":
        prefill_fn = lambda: model.prefill(ids, pixels, mask, image_inputs=image_inputs, tau=tau)
        (prefill, cache), seconds = stopwatch(prefill_fn, model.backbone.device)
        prefill.prefill_seconds = seconds
        tokens = model.decode(prefill, cache, max_new_tokens, tok.eos_token_id, tok.pad_token_id)
        return tok.batch_decode(tokens, skip_special_tokens=True), prefill
    # Soft masks have no cache form: each step reruns the soft forward over prompt + answer so far. The answer
    # so far is labelled (not IGNORE_INDEX), so the pruners read the question only, as in training.
    prefill, generated = None, []
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for _ in range(max_new_tokens):
        out = model(ids, pixels, mask, labels=labels, mode="soft", tau=tau, image_inputs=image_inputs)
        if prefill is None:
            prefill = out
        token = out.logits[:, -1].argmax(-1).masked_fill(done, tok.pad_token_id)
        generated.append(token)
        done |= token == tok.eos_token_id
        if bool(done.all()):
            break
        ids = torch.cat([ids, token[:, None]], dim=1)
        labels = torch.cat([labels, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        image_inputs = model.backbone.append_text(image_inputs, 1)
    return tok.batch_decode(torch.stack(generated, dim=1), skip_special_tokens=True), prefill


def majority_accuracy(references: list[str]) -> float:
    """The accuracy of always giving the most frequent reference answer: the chance level of the eval set."""
    counts = Counter(normalize_answer(r) for r in references)
    return max(counts.values()) / len(references) if references else 0.0


def collect_answers(answer_fn, batches: Iterable[dict], desc: str = "eval",
                    show_progress: bool = True) -> list[tuple[str, str, str]]:
    """(prediction, reference, question type) of every sample of prompt-only ``batches``, ``answer_fn(batch) ->
    list[str]`` answering: what :func:`evaluate_accuracy` scores, and what data-parallel evaluation gathers."""
    rows = []
    for batch in tqdm(batches, desc=desc, leave=False, disable=not show_progress):
        rows += zip(answer_fn(batch), batch["answers"], batch["question_types"])
    return rows


def answer_accuracy(rows: list[tuple[str, str, str]]) -> dict[str, float]:
    """Accuracy overall and per question type of :func:`collect_answers`' rows."""
    predictions, references, types = (list(column) for column in zip(*rows)) if rows else ([], [], [])
    return accuracy_by_type(predictions, references, types)


def evaluate_accuracy(answer_fn, batches: Iterable[dict], desc: str = "eval", show_progress: bool = True) -> dict[str, float]:
    """Accuracy overall and per question type of ``answer_fn(batch) -> list[str]`` over prompt-only batches."""
    return answer_accuracy(collect_answers(answer_fn, batches, desc, show_progress))


def sample_flops(model: PrunedLlava, prefill: PrunedOutput, attention_mask: torch.Tensor,
                 with_encoder: bool = False) -> tuple[list[int], list[int]]:
    """Per sample: LLM prefill multiply-adds unpruned, and of this hard-pruned prefill (the merger's and pruners'
    own cost included), from each sample's real tokens. ``with_encoder``: the whole prefill, the vision tower and
    the projector included (on all N tokens unpruned, on the merged ones pruned)."""
    bb = model.backbone
    d, m, n_layers = bb.hidden_size, bb.text_config.intermediate_size, bb.num_layers
    real = attention_mask.sum(dim=1).tolist()  # per sample, unpruned
    pruned_real = torch.stack([mask.sum(dim=1) for mask in prefill.layer_attention_masks], dim=1).tolist()  # (B, L)
    first_layer_vision = prefill.vision_counts[0].tolist()  # (B,) the merger's output
    questions = prefill.question_counts.tolist()
    originals = prefill.image_tokens.tolist()  # (B,) each image's vision tokens before the merger
    encoder = bb.encoder_flops if with_encoder else lambda projected: 0
    base = [llm_prefill_flops([n] * n_layers, d, m) + encoder(original) for n, original in zip(real, originals)]
    pruned = [llm_prefill_flops(counts, d, m) + module_flops(model, question, merged, original) + encoder(merged)
              for counts, merged, question, original in zip(pruned_real, first_layer_vision, questions, originals)]
    return base, pruned


def prefill_flops(model: PrunedLlava, prefill: PrunedOutput, attention_mask: torch.Tensor) -> dict[str, float]:
    """Mean per-sample LLM prefill multiply-adds, unpruned vs this hard-pruned prefill (:func:`sample_flops`), and
    the reduction over vision tokens only."""
    bb = model.backbone
    d, m, n_layers = bb.hidden_size, bb.text_config.intermediate_size, bb.num_layers
    base, pruned = sample_flops(model, prefill, attention_mask)
    vision = torch.stack(prefill.vision_counts, dim=1).tolist()  # (B, L)
    vision_base = [llm_prefill_flops([n] * n_layers, d, m) for n in prefill.image_tokens.tolist()]
    vision_pruned = [llm_prefill_flops(counts, d, m) for counts in vision]
    mean = lambda xs: sum(xs) / len(xs)
    return {
        "flops_baseline": mean(base), "flops_pruned": mean(pruned), "flops_reduction": 1 - mean(pruned) / mean(base),
        "vision_flops_reduction": 1 - mean(vision_pruned) / mean(vision_base),
    }


def stage_counts(model: PrunedLlava, per_layer: list[float]) -> str:
    """Vision tokens entering the LLM, then after each pruning layer: '72 → 57 → 45 → 36 (L2, L4, L6)'."""
    layers = sorted(model.stage_of_layer)
    if not layers:
        return f"{per_layer[0]:g}"
    return " → ".join(f"{c:g}" for c in [per_layer[0], *(per_layer[layer] for layer in layers)]) + \
        f" ({', '.join(f'L{layer}' for layer in layers)})"


def module_flops(model: PrunedLlava, question_tokens: int, merged: int | None = None,
                 original: int | None = None) -> int:
    """The merger's and the pruners' own multiply-adds for one sample with ``question_tokens`` question tokens and
    ``original`` vision tokens (default: the backbone's N) whose merger kept ``merged`` (default: the merger's K);
    each stage keeps its budget's share of ``merged`` (PrunedLlava's per-sample budgets)."""
    n = model.backbone.num_vision_tokens if original is None else original
    total = 0
    merged = model.merged_tokens if merged is None else merged
    if model.merger is not None:
        total += model.merger.flops(n, merged, question_tokens)
    n = merged
    for pruner, budget in zip(model.pruners, model.stage_budgets):
        total += pruner.flops(n, question_tokens)
        if model.fold_pruned:
            total += fold_flops(n, model.backbone.hidden_size)
        n = min(n, max(1, round(merged * budget / model.merged_tokens)))
    return total


def pruned_results(model: PrunedLlava, batches: Iterable[dict], tau: float, max_new_tokens: int,
                   show_progress: bool = True, soft: bool = True, desc: str | None = None) -> list[dict]:
    """Per batch: its size ``n``, its samples' hard (and soft) answers, references and question types, the sums over
    its samples of the token counts, prefill FLOPs and time, its fewest and most merged tokens, and its mean vision
    tokens entering each decoder layer. What :func:`summarize_pruned` turns into metrics, and what data-parallel
    evaluation gathers from every process. ``desc``: the progress bar's label."""
    was_training = model.training
    model.eval()
    results = []
    for batch in tqdm(batches, desc=desc or ("eval (soft, hard)" if soft else "eval (hard)"), leave=False,
                      disable=not show_progress):
        soft_answers = generate_pruned(model, batch, "soft", tau, max_new_tokens)[0] if soft else None
        answers, prefill = generate_pruned(model, batch, "hard", tau, max_new_tokens)
        n = len(answers)
        per_layer = prefill.vision_tokens_per_layer
        counts = {"avg_original_tokens": prefill.image_tokens.float().mean().item(), "avg_merged_tokens": per_layer[0],
                  "avg_vision_tokens_per_layer": sum(per_layer) / len(per_layer)}
        for layer in model.stage_of_layer:
            counts[f"tokens_after_layer_{layer}"] = prefill.vision_tokens_per_layer[layer]
        counts.update(prefill_flops(model, prefill, batch["attention_mask"].to(model.backbone.device)))
        counts["prefill_ms_per_sample"] = prefill.prefill_seconds * 1e3 / n
        merged = prefill.vision_counts[0]  # (B,) tokens each image kept after the merger
        results.append({"n": n, "hard": answers, "soft": soft_answers, "references": batch["answers"],
                        "types": batch["question_types"], "sums": {key: value * n for key, value in counts.items()},
                        "fewest": int(merged.min()), "most": int(merged.max()), "per_layer": per_layer})
    model.train(was_training)
    return results


def summarize_pruned(results: list[dict]) -> dict[str, float]:
    """accuracy_soft (when the results hold soft answers), accuracy_hard overall and per question type, token counts
    per stage and prefill FLOPs over the samples of :func:`pruned_results`' batches."""
    samples = sum(r["n"] for r in results)
    sums: dict[str, float] = {}
    for r in results:
        for key, value in r["sums"].items():
            sums[key] = sums.get(key, 0.0) + value
    metrics = {key: value / samples for key, value in sums.items()}
    metrics["merged_tokens_min"] = float(min(r["fewest"] for r in results))
    metrics["merged_tokens_max"] = float(max(r["most"] for r in results))
    metrics["keep_ratio_merge"] = metrics["avg_merged_tokens"] / metrics["avg_original_tokens"]
    refs = [ref for r in results for ref in r["references"]]
    types = [t for r in results for t in r["types"]]
    acc_hard = accuracy_by_type([a for r in results for a in r["hard"]], refs, types)
    if all(r["soft"] is not None for r in results):
        metrics["accuracy_soft"] = accuracy_by_type([a for r in results for a in r["soft"]], refs, types)["overall"]
    metrics["accuracy_hard"] = acc_hard["overall"]
    metrics["accuracy_majority"] = majority_accuracy(refs)
    for qtype, value in acc_hard.items():
        if qtype not in ("overall", "all"):
            metrics[f"accuracy_hard/{qtype}"] = value
    return metrics


def vision_tokens_per_layer(results: list[dict]) -> list[float]:
    """Vision tokens entering each decoder layer, the mean over the samples of :func:`pruned_results`' batches."""
    samples = sum(r["n"] for r in results)
    layers = len(results[0]["per_layer"])
    return [sum(r["n"] * r["per_layer"][layer] for r in results) / samples for layer in range(layers)]


def evaluate_pruned(model: PrunedLlava, batches: Iterable[dict], tau: float, max_new_tokens: int,
                    show_progress: bool = True, soft: bool = True) -> dict[str, float]:
    """accuracy_soft, accuracy_hard, token counts per stage and prefill FLOPs over prompt-only batches."""
    return summarize_pruned(pruned_results(model, batches, tau, max_new_tokens, show_progress, soft))
