"""Evaluation: greedy answers from the backbone, scored by the one answer-scoring function."""

from __future__ import annotations

from typing import Iterable

import torch
from tqdm import tqdm

from data.scoring import accuracy_by_type
from models.llava_backbone import LlavaBackbone


@torch.no_grad()
def generate_baseline_answers(backbone: LlavaBackbone, batch: dict, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers of the unpruned backbone through the stock ``generate`` (prompt-only batch)."""
    tokenizer = backbone.processor.tokenizer
    device = backbone.device
    out = backbone.model.generate(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        pixel_values=batch["pixel_values"].to(device, backbone.dtype),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new_tokens = out[:, batch["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def evaluate_accuracy(answer_fn, batches: Iterable[dict], desc: str = "eval", show_progress: bool = True) -> dict[str, float]:
    """Accuracy overall and per question type of ``answer_fn(batch) -> list[str]`` over prompt-only batches."""
    predictions, references, types = [], [], []
    for batch in tqdm(batches, desc=desc, leave=False, disable=not show_progress):
        predictions += answer_fn(batch)
        references += batch["answers"]
        types += batch["question_types"]
    return accuracy_by_type(predictions, references, types)
