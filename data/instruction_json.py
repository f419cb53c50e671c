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


def _parse_record(record: Any, index: int, image_folder: Path, source: Path) -> _Record:
    where = f"{source}, sample #{index}"
    if not isinstance(record, dict):
        raise BadSampleError(f"{where}: expected an object with id/image/conversations, got {type(record).__name__}")
    sample_id = str(record.get("id", f"#{index}"))
    where = f"{source}, sample {sample_id!r}"
    if "image" not in record:
        raise BadSampleError(f"{where}: no 'image' field (text-only samples are not supported)")
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise BadSampleError(f"{where}: 'conversations' must be a list of at least a human and a gpt turn")
    for i, turn in enumerate(turns[:2]):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise BadSampleError(f"{where}: conversations[{i}] must be an object with 'from' and a string 'value'")
    human, gpt = turns[0], turns[1]
    if human["from"] != "human" or gpt["from"] != "gpt":
        raise BadSampleError(f"{where}: the first two turns must come from 'human' then 'gpt', "
                             f"got {human['from']!r} then {gpt['from']!r}")
    question = human["value"].replace("<image>", "").strip()
    answer = gpt["value"].strip()
    if not question:
        raise BadSampleError(f"{where}: the human turn has no question besides <image>")
    if not answer:
        raise BadSampleError(f"{where}: the gpt turn (the answer) is empty")
    image_path = image_folder / record["image"]
    if not image_path.is_file():
        raise BadSampleError(f"{where}: image file {image_path} does not exist")
    try:
        with Image.open(image_path) as img:  # reads the header only
            img.size
    except OSError as err:
        raise BadSampleError(f"{where}: image file {image_path} is not a readable image ({err})") from err
    return _Record(sample_id, image_path, question, answer)


class LlavaInstructionDataset:
    """Map-style data set over a LLaVA instruction JSON file; images are read on access."""

    def __init__(self, json_path: str | Path, image_folder: str | Path, on_bad_sample: str = "error"):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.json_path, self.image_folder = Path(json_path), Path(image_folder)
        self.on_bad_sample = on_bad_sample
        if not self.json_path.is_file():
            raise FileNotFoundError(f"instruction file {self.json_path} does not exist (data_settings.train_json / eval_json)")
        try:
            records = json.loads(self.json_path.read_text())
        except json.JSONDecodeError as err:
            raise BadSampleError(f"{self.json_path}: not valid JSON ({err})") from err
        if not isinstance(records, list):
            raise BadSampleError(f"{self.json_path}: expected a JSON list of samples, got {type(records).__name__}")
        self.records: list[_Record] = []
        self.skipped: list[str] = []  # one reason per skipped sample
        for index, record in enumerate(records):
            try:
                self.records.append(_parse_record(record, index, self.image_folder, self.json_path))
            except BadSampleError as err:
                if on_bad_sample == "error":
                    raise BadSampleError(f"{err} (set data_settings.on_bad_sample: skip to leave such samples out)") from None
                self.skipped.append(str(err))
        if not self.records:
            raise BadSampleError(f"{self.json_path}: no usable samples ({len(self.skipped)} skipped)")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> InstructionSample:
        record = self.records[index]
        try:
            with Image.open(record.image_path) as img:
                image = img.convert("RGB")
        except OSError as err:
            # The header was read at load; a file that breaks later (truncated data) is an error: skipping
            # it here would silently change the batch the sampler chose.
            raise BadSampleError(f"{self.json_path}, sample {record.id!r}: cannot read image {record.image_path} "
                                 f"({err}); fix or remove the file, or drop the sample from the JSON") from err
        return InstructionSample(record.id, image, record.question, record.answer)
