"""Batches of (image, conversation) in LLaVA-1.5's prompt format, through the processor.

Training text: the whole conversation, ``USER: <image>\\n{q1} ASSISTANT: {a1}</s> USER: {q2} ASSISTANT:
{a2}</s>...`` (one turn: ``USER: <image>\\n{q} ASSISTANT: {a}</s>``), or the processor's chat template
when it carries one (llava-hf checkpoints do); the labels are -100 everywhere except every answer's
tokens and its end-of-sequence token, as LLaVA trains. Generation text is the first question's prompt,
up to ``ASSISTANT:``. The processor expands ``<image>`` (its own image token: ``<|image_pad|>`` for a
Qwen2-VL checkpoint) into one placeholder per vision token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from models.sequences import IGNORE_INDEX
PROMPT_TEMPLATE = "USER: {image}\n{question} ASSISTANT:"
NEXT_TURN_TEMPLATE = "{conversation} USER: {question} ASSISTANT:"


class Sample(Protocol):
    id: str
    image: Any
    question: str
    answer: str


def build_prompt(question: str, image_token: str = "<image>") -> str:
    """LLaVA-1.5's prompt, with the processor's image token (``<|image_pad|>`` for a Qwen2-VL checkpoint's)."""
    return PROMPT_TEMPLATE.format(image=image_token, question=question.strip())


def sample_turns(sample) -> tuple[tuple[str, str], ...]:
    """The sample's (question, answer) turns: ``turns`` where it has them (instruction data), else its one pair."""
    return getattr(sample, "turns", None) or ((sample.question, sample.answer),)


def render_conversation(processor, turns, answered: bool = True) -> str:
    """The training text of the conversation ``turns`` through its last answer and that answer's end token, or
    (``answered=False``) up to its last answer: the prompt that asks for it. Rendered with the processor's chat
    template when it has one (the image before the first question, every answer followed by the end token), else
    in LLaVA-1.5's format."""
    eos = processor.tokenizer.eos_token
    if getattr(processor, "chat_template", None) is None:
        text = ""
        for k, (question, answer) in enumerate(turns):
            text = (build_prompt(question, getattr(processor, "image_token", "<image>")) if k == 0 else
                    NEXT_TURN_TEMPLATE.format(conversation=text, question=question.strip()))
            if answered or k < len(turns) - 1:
                text = f"{text} {answer.strip()}{eos}"
        return text
    messages = []
    for k, (question, answer) in enumerate(turns):
        image = [{"type": "image"}] if k == 0 else []
        messages += [{"role": "user", "content": [*image, {"type": "text", "text": question.strip()}]},
                     {"role": "assistant", "content": [{"type": "text", "text": answer.strip() + eos}]}]
    if answered:  # the text stops at the last answer's end token, whatever the template writes after a message
        return processor.apply_chat_template(messages, continue_final_message=True)
    return processor.apply_chat_template(messages[:-1], add_generation_prompt=True)


def conversation_cuts(processor, turns) -> list[str]:
    """The training text cut before and after every answer: [up to answer 1, through answer 1, up to answer 2, ...];
    the last is the whole text."""
    return [render_conversation(processor, turns[:k], answered) for k in range(1, len(turns) + 1)
            for answered in (False, True)]


def adds_special_tokens(tokenizer, text: str) -> bool:
    """Whether the tokenizer should add its special tokens to ``text``: not when a chat template already wrote the
    begin-of-sequence token (it would be doubled)."""
    return not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))


@dataclass
class VQACollator:
    """Turns a list of samples into model inputs.

    ``with_answers=True`` (training): every turn of the conversation, and ``labels`` mark the answers.
    ``with_answers=False`` (generation): the first question's prompt only, plus the reference ``answers``.
    Either way the batch carries ``ids``, ``question_types`` (``all`` where a sample has none), ``relevance`` (each
    sample's relevance boxes or None) and ``image_sizes_wh``.
    """

    processor: Any
    with_answers: bool = True

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        if self.with_answers:
            cuts = [conversation_cuts(self.processor, sample_turns(s)) for s in samples]
            texts = [c[-1] for c in cuts]
        else:
            texts = [build_prompt(s.question, getattr(self.processor, "image_token", "<image>")) for s in samples]
        special = adds_special_tokens(self.processor.tokenizer, texts[0])
        batch = dict(self.processor(images=[s.image for s in samples], text=texts, padding=True, return_tensors="pt",
                                    add_special_tokens=special))
        if self.with_answers:
            batch["labels"] = self._answer_labels(batch["input_ids"], batch["attention_mask"], samples, cuts, special)
        batch["ids"] = [s.id for s in samples]
        batch["answers"] = [s.answer for s in samples]
        batch["question_types"] = [getattr(s, "question_type", "all") for s in samples]
        # relevance boxes (data/relevance.py), None for a sample without, and the image sizes (width, height) they
        # are mapped onto the vision tokens with (trainers/training/losses.irrelevant_tokens)
        batch["relevance"] = [getattr(s, "relevance", None) for s in samples]
        batch["image_sizes_wh"] = [s.image.size for s in samples]
        return batch

    def _answer_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, samples,
                       cuts: list[list[str]], special: bool) -> torch.Tensor:
        """Labels that keep only every answer's tokens and its end token.

        The answers' spans are found on the text tokenized with the image token unexpanded (each cut a token prefix
        of the next), then placed on the processor's tokens from the right: every answer follows the image, so from
        the first answer on the two sequences are the same tokens, at the end of the real (unpadded) positions."""
        tokenizer = self.processor.tokenizer
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        flat = tokenizer([c for sample_cuts in cuts for c in sample_cuts], add_special_tokens=special)["input_ids"]
        for b, sample in enumerate(samples):
            pieces, flat = flat[: len(cuts[b])], flat[len(cuts[b]):]
            for k, (shorter, longer) in enumerate(zip(pieces, pieces[1:])):
                if longer[: len(shorter)] != shorter:
                    where = f"{'after' if k % 2 else 'before'} answer {k // 2 + 1}"
                    raise ValueError(
                        f"sample {sample.id!r}: the conversation cut {where} does not tokenize as the start of the "
                        f"longer text ({shorter[-8:]} vs {longer[: len(shorter)][-8:]} at its end); the tokenizer "
                        "merges that answer with the text around it")
            whole, first = pieces[-1], len(pieces[0])  # first: where the first answer starts
            real = attention_mask[b].nonzero().squeeze(-1)  # (T_real,) the real (unpadded) positions
            offset = len(real) - len(whole)  # whole[i] sits at real[offset + i], for i >= first
            tail = real[offset + first:] if offset + first >= 0 else real[:0]
            if input_ids[b, tail].tolist() != whole[first:]:
                raise ValueError(
                    f"sample {sample.id!r}: from the first answer on, the processor's tokens "
                    f"({input_ids[b, tail].tolist()[:8]}...) are not the tokenizer's ({whole[first:][:8]}...); the "
                    "image token merges with the text around it")
            for start, end in zip(pieces[0::2], pieces[1::2]):  # (up to answer k, through answer k)
                span = real[offset + len(start): offset + len(end)]
                labels[b, span] = input_ids[b, span]
        return labels
