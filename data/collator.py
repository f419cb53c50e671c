"""Batches of (image, question, answer) in LLaVA-1.5's prompt format, through the processor.

Training text: ``USER: <image>\\n{question} ASSISTANT: {answer}</s>``; the labels are -100
everywhere except the answer's tokens and the end-of-sequence token. Generation text stops
after ``ASSISTANT:``. The processor expands ``<image>`` (its own image token: ``<|image_pad|>`` for a
Qwen2-VL checkpoint) into one placeholder per vision token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from models.pruned_llava import IGNORE_INDEX
PROMPT_TEMPLATE = "USER: {image}\n{question} ASSISTANT:"


class Sample(Protocol):
    id: str
    image: Any
    question: str
    answer: str


def build_prompt(question: str, image_token: str = "<image>") -> str:
    """LLaVA-1.5's prompt, with the processor's image token (``<|image_pad|>`` for a Qwen2-VL checkpoint's)."""
    return PROMPT_TEMPLATE.format(image=image_token, question=question.strip())


@dataclass
class VQACollator:
    """Turns a list of samples into model inputs.

    ``with_answers=True`` (training): the answer follows the prompt and ``labels`` mark it.
    ``with_answers=False`` (generation): prompts only, plus the reference ``answers``.
    Either way the batch carries ``ids`` and, when the samples have one, ``question_types``.
    """

    processor: Any
    with_answers: bool = True

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        tokenizer = self.processor.tokenizer
        prompts = [build_prompt(s.question, getattr(self.processor, "image_token", "<image>")) for s in samples]
        if self.with_answers:
            texts = [f"{p} {s.answer.strip()}{tokenizer.eos_token}" for p, s in zip(prompts, samples)]
        else:
            texts = prompts
        batch = dict(self.processor(images=[s.image for s in samples], text=texts, padding=True, return_tensors="pt"))
        if self.with_answers:
            batch["labels"] = self._answer_labels(batch["input_ids"], batch["attention_mask"], samples)
        batch["ids"] = [s.id for s in samples]
        batch["answers"] = [s.answer for s in samples]
        batch["question_types"] = [getattr(s, "question_type", "all") for s in samples]
        grids = [getattr(s, "irrelevant", None) for s in samples]
        if all(g is not None for g in grids):  # relevance labels: (B, h, w) True at patches the question does not need
            batch["irrelevant"] = torch.as_tensor(np.stack(grids), dtype=torch.bool)
        return batch

    def _answer_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, samples) -> torch.Tensor:
        """Labels that keep only each sequence's trailing answer tokens (answer + EOS)."""
        tokenizer = self.processor.tokenizer
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for b, sample in enumerate(samples):
            answer_ids = tokenizer(" " + sample.answer.strip(), add_special_tokens=False)["input_ids"]
            answer_ids = answer_ids + [tokenizer.eos_token_id]
            positions = attention_mask[b].nonzero().squeeze(-1)  # real (unpadded) token positions
            tail = positions[-len(answer_ids):]
            if input_ids[b, tail].tolist() != answer_ids:
                raise ValueError(
                    f"sample {sample.id!r}: the answer {sample.answer!r} does not tokenize the same at the end "
                    f"of the prompt as on its own ({input_ids[b, tail].tolist()} vs {answer_ids}); "
                    "the tokenizer merges it with the preceding text"
                )
            labels[b, tail] = input_ids[b, tail]
        return labels
