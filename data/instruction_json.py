"""LLaVA instruction-JSON data: ``[{"id", "image", "conversations": [...]}, ...]``.

The format of LLaVA-1.5's training and evaluation files. A record is one image and a
conversation of alternating ``{"from": "human", "value": ...}`` / ``{"from": "gpt", "value": ...}``
turns; the human turn of the first pair holds the ``<image>`` marker. This loader serves
single-turn VQA: the first human/gpt pair becomes (question, answer); later turns are not
used. The whole file is checked when the data set is built (structure, and every image's
header), so that a bad record stops the run before any model work; with ``on_bad_sample="skip"`` bad records are left out and
counted (``skipped``), never dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image


class BadSampleError(ValueError):
    pass


@dataclass(frozen=True)
class InstructionSample:
    id: str
    image: Any
    question: str
    answer: str
    question_type: str = "all"


@dataclass(frozen=True)
class _Record:
    id: str
    image_path: Path
    question: str
    answer: str


SKIP_HINT = "fix the record, or set data_settings.on_bad_sample: skip to leave such samples out"


def _parse_record(record: Any, index: int, image_folder: Path, source: Path) -> tuple[_Record, bool]:
    """The record, and whether its human turn had to be rewritten to hold exactly one <image>."""
    where = f"{source}, sample #{index}"
    if not isinstance(record, dict):
        raise BadSampleError(f"expected an object with id/image/conversations, got {type(record).__name__} ({where})")
    sample_id = str(record.get("id", f"#{index}"))
    where = f"{source}, sample {sample_id!r}"
    if "image" not in record:
        raise BadSampleError(f"no 'image' field; text-only samples are not supported ({where})")
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise BadSampleError(f"'conversations' must be a list of at least a human and a gpt turn ({where})")
    for i, turn in enumerate(turns[:2]):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise BadSampleError(f"conversations[{i}] must be an object with 'from' and a string 'value' ({where})")
    human, gpt = turns[0], turns[1]
    if human["from"] != "human" or gpt["from"] != "gpt":
        raise BadSampleError(f"the first two turns must come from 'human' then 'gpt', got {human['from']!r} then "
                             f"{gpt['from']!r} ({where})")
    rewritten = human["value"].count("<image>") != 1
    question = human["value"].replace("<image>", "").strip()
    answer = gpt["value"].strip()
    if not question:
        raise BadSampleError(f"the human turn has no question besides <image> ({where})")
    if not answer:
        raise BadSampleError(f"the gpt turn (the answer) is empty ({where})")
    image_path = image_folder / record["image"]
    if not image_path.is_file():
        raise BadSampleError(f"image file {image_path} does not exist ({where})")
    try:
        with Image.open(image_path) as img:  # reads the header only: a full decode of every image would take hours
            img.size
    except (OSError, Image.DecompressionBombError) as err:
        raise BadSampleError(f"image file {image_path} is not a readable image: {err} ({where})") from err
    return _Record(sample_id, image_path, question, answer), rewritten


class LlavaInstructionDataset:
    """Map-style data set over a LLaVA instruction JSON file; images are read on access.

    ``skipped``: one reason per record left out (``on_bad_sample: skip``); ``rewritten``: ids of records whose
    human turn held no ``<image>`` or several (the image is placed once, before the question, as in LLaVA-1.5);
    ``unreadable``: ids of images found broken only when read in full (a truncated body), replaced by the next
    sample under ``skip``.
    """

    def __init__(self, json_path: str | Path, image_folder: str | Path, on_bad_sample: str = "error"):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.json_path, self.image_folder = Path(json_path), Path(image_folder)
        self.on_bad_sample = on_bad_sample
        if not self.json_path.is_file():
            raise BadSampleError(f"instruction file does not exist ({self.json_path}): set data_settings.train_json / "
                                 "eval_json to LLaVA-format JSON files (README: preparing LLaVA instruction data)")
        if not self.image_folder.is_dir():
            raise BadSampleError(f"image folder does not exist ({self.image_folder}): set data_settings.image_folder "
                                 "to the folder the JSON's 'image' paths are relative to")
        try:
            records = json.loads(self.json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadSampleError(f"not valid JSON: {err} ({self.json_path}): fix the file") from err
        if not isinstance(records, list):
            raise BadSampleError(f"expected a JSON list of samples, got {type(records).__name__} ({self.json_path}): "
                                 "give a file in LLaVA's instruction format")
        self.records: list[_Record] = []
        self.skipped: list[str] = []  # one reason per skipped sample
        self.rewritten: list[str] = []
        self.unreadable: list[str] = []
        for index, record in enumerate(records):
            try:
                parsed, rewritten = _parse_record(record, index, self.image_folder, self.json_path)
            except BadSampleError as err:
                if on_bad_sample == "error":
                    raise BadSampleError(f"{err}: {SKIP_HINT}") from None
                self.skipped.append(str(err))
                continue
            self.records.append(parsed)
            if rewritten:
                self.rewritten.append(parsed.id)
        if not self.records:
            reasons = "; ".join(self.skipped[:3]) + (f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else "")
            raise BadSampleError(f"no usable samples, all {len(self.skipped)} skipped ({self.json_path}): {reasons}")

    def drop(self, ids: set[str], reason: str) -> None:
        """Leave out the records ``ids`` (found bad by a later check), counting each in ``skipped``."""
        self.skipped += [f"{reason} ({self.json_path}, sample {r.id!r})" for r in self.records if r.id in ids]
        self.records = [r for r in self.records if r.id not in ids]
        if not self.records:
            raise BadSampleError(f"no usable samples left after leaving out {len(ids)} ({reason}) ({self.json_path})")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> InstructionSample:
        for offset in range(len(self.records)):
            record = self.records[(index + offset) % len(self.records)]
            try:
                with Image.open(record.image_path) as img:
                    image = img.convert("RGB")
                return InstructionSample(record.id, image, record.question, record.answer)
            except OSError as err:
                # The header was read at load; the body (truncated data) only now. Under skip the next sample
                # takes its place (deterministically, so a resumed run reads the same batches).
                if self.on_bad_sample == "error":
                    raise BadSampleError(f"cannot read image {record.image_path}: {err} ({self.json_path}, sample "
                                         f"{record.id!r}): {SKIP_HINT}") from err
                if record.id not in self.unreadable:
                    self.unreadable.append(record.id)
        raise BadSampleError(f"no image of the file can be read ({self.json_path}): check data_settings.image_folder")
