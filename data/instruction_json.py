"""LLaVA instruction-JSON data: ``[{"id", "image", "conversations": [...]}, ...]``.

The format of LLaVA-1.5's training and evaluation files (``llava_v1_5_mix665k.json``). A record is
one image and a conversation of alternating ``{"from": "human", "value": ...}`` /
``{"from": "gpt", "value": ...}`` turns. A sample keeps every (question, answer) pair, since LLaVA
trains on every answer (data/collator.py renders the whole conversation), and its first pair as
``question`` / ``answer``, what evaluation asks and scores. A record may carry relevance boxes
(``relevant_boxes``, ``distractor_boxes``: data/relevance.py), the regions its questions are about. Records without an ``image`` (text-only
conversations) are counted and left out: nothing in them can be pruned, and through a frozen backbone
they carry no gradient to the trained modules.

The whole file is checked when the data set is built (every record's structure, every image's
header), and every problem is reported at once, so that a bad file stops the run before the weights
load; with ``on_bad_sample="skip"`` bad records are left out and counted (``skipped``), never dropped
silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from data.relevance import Relevance, parse_relevance

log = logging.getLogger(__name__)  # the run's log shows it (trainers/run_log.py)


class BadSampleError(ValueError):
    pass


@dataclass(frozen=True)
class InstructionSample:
    id: str
    image: Any
    question: str  # the first turn's: what evaluation asks
    answer: str
    question_type: str = "all"
    turns: tuple[tuple[str, str], ...] = ()  # every (question, answer) in order; empty: (question, answer) alone
    relevance: Relevance | None = None  # the regions the questions are about (data/relevance.py); None: no label


@dataclass(frozen=True)
class _Record:
    id: str
    image_path: Path
    turns: tuple[tuple[str, str], ...]
    relevance: Relevance | None = None


SKIP_HINT = "fix the record, or set data_settings.on_bad_sample: skip to leave such samples out"
SPEAKERS = ("human", "gpt")
SHOWN_PROBLEMS = 20  # a longer list of bad records ends with "and N more"
IMAGE_CHECK_THREADS = 16  # the header check waits on the disk, not the CPU
IMAGE_CHECK_CHUNK = 256  # paths per thread task: one task per image would hold 665K futures
PROGRESS_FROM = 1000  # images: fewer are checked without a progress bar


def _parse_record(record: Any, sample_id: str, image_folder: Path) -> tuple[_Record, bool] | None:
    """The record, and whether its ``<image>`` had to be moved (no marker, several, or not in the first question: the
    image is placed once, before the first question); None for a text-only record (no 'image').
    BadSampleError: what is wrong with it. The image file is checked apart (:func:`image_problems`)."""
    if not isinstance(record, dict):
        raise BadSampleError(f"expected an object with id/image/conversations, got {type(record).__name__}")
    if "image" not in record:
        return None
    image = record["image"]
    if image is None:
        raise BadSampleError("the image is null ('image': null); give its path relative to data_settings.image_folder")
    if isinstance(image, list):
        raise BadSampleError(f"'image' is a list of {len(image)}: several images per record are not supported")
    if not isinstance(image, str):
        raise BadSampleError(f"'image' must be a path, got {type(image).__name__}")
    conversation = record.get("conversations")
    if not isinstance(conversation, list) or len(conversation) < 2:
        raise BadSampleError("'conversations' must be a list of at least a human and a gpt turn")
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadSampleError(f"conversations[{i}] must be an object with a string 'value'")
        if turn.get("from") != SPEAKERS[i % 2]:
            raise BadSampleError(f"conversations[{i}] must come from {SPEAKERS[i % 2]!r} (turns alternate human, gpt), "
                                 f"got {turn.get('from')!r}")
    values = [turn["value"] for turn in conversation[: len(conversation) // 2 * 2]]  # an unanswered last one: dropped
    markers = [question.count("<image>") for question in values[::2]]
    turns = tuple((q.replace("<image>", "").strip(), a.strip()) for q, a in zip(values[::2], values[1::2]))
    for k, (question, answer) in enumerate(turns):
        if not question:
            raise BadSampleError(f"conversations[{2 * k}] (a human turn) has no question besides <image>")
        if not answer:
            raise BadSampleError(f"conversations[{2 * k + 1}] (a gpt turn, the answer) is empty")
    try:
        relevance = parse_relevance(record)
    except ValueError as err:
        raise BadSampleError(str(err)) from err
    return _Record(sample_id, image_folder / image, turns, relevance), markers[0] != 1 or sum(markers) != 1


def _image_problem(path: Path) -> str | None:
    """What is wrong with the image file, from its header (a full decode of 665K images would take hours)."""
    if not path.is_file():
        return f"image file {path} does not exist"
    try:
        with Image.open(path) as img:
            img.size
    except (OSError, Image.DecompressionBombError) as err:
        return f"image file {path} is not a readable image: {err}"
    return None


def image_problems(paths: list[Path]) -> list[str | None]:
    """:func:`_image_problem` of every path, in order, over threads, with a progress bar on a large file."""
    chunks = [paths[i:i + IMAGE_CHECK_CHUNK] for i in range(0, len(paths), IMAGE_CHECK_CHUNK)]
    problems: list[str | None] = []
    with (ThreadPoolExecutor(IMAGE_CHECK_THREADS) as pool,
          tqdm(total=len(paths), desc="checking images", unit="img", disable=len(paths) < PROGRESS_FROM) as bar):
        for found in pool.map(lambda chunk: [_image_problem(p) for p in chunk], chunks):  # map keeps the order
            problems += found
            bar.update(len(found))
    return problems


class LlavaInstructionDataset:
    """Map-style data set over a LLaVA instruction JSON file; images are read on access.

    ``skipped``: one reason per record left out (``on_bad_sample: skip``); ``text_only``: how many records had no
    image (left out, never an error); ``rewritten``: ids of records whose questions held no ``<image>``, several, or
    one after the first question (the image is placed once, before the first question, as in LLaVA-1.5);
    ``truncated``: ids of conversations cut to the whole turns that fit the backbone's positions (preflight);
    ``unreadable``: ids of images found broken only when read in full (a truncated body), replaced by the next sample
    under ``skip``; ``labelled``: how many samples carry relevance boxes.
    """

    def __init__(self, json_path: str | Path, image_folder: str | Path, on_bad_sample: str = "error"):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.json_path, self.image_folder = Path(json_path), Path(image_folder)
        self.on_bad_sample = on_bad_sample
        records = self._read_records()
        bad: dict[int, tuple[str, str]] = {}  # record index -> (sample id, what is wrong)
        parsed: dict[int, _Record] = {}
        moved_marker: set[int] = set()
        self.text_only = 0
        for index, record in enumerate(records):
            sample_id = str(record["id"]) if isinstance(record, dict) and "id" in record else f"#{index}"
            try:
                result = _parse_record(record, sample_id, self.image_folder)
            except BadSampleError as err:
                bad[index] = (sample_id, str(err))
                continue
            if result is None:
                self.text_only += 1
                continue
            parsed[index] = result[0]
            if result[1]:
                moved_marker.add(index)
        indices = list(parsed)
        for index, problem in zip(indices, image_problems([parsed[i].image_path for i in indices])):
            if problem is not None:
                bad[index] = (parsed.pop(index).id, problem)
        problems = [bad[i] for i in sorted(bad)]
        if problems and on_bad_sample == "error":
            raise BadSampleError(self._listing(problems))
        self.records: list[_Record] = list(parsed.values())  # the file's order
        self.skipped: list[str] = [f"{reason} ({self.json_path}, sample {sid!r})" for sid, reason in problems]
        self.rewritten: list[str] = [parsed[i].id for i in parsed if i in moved_marker]
        self.truncated: list[str] = []
        self.unreadable: list[str] = []
        if not self.records:
            raise self._nothing_usable()

    @property
    def labelled(self) -> int:
        return sum(record.relevance is not None for record in self.records)

    def _read_records(self) -> list:
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
        if not records:
            raise BadSampleError(f"the file holds no records, an empty list ({self.json_path}): give a LLaVA "
                                 "instruction file with at least one image record")
        return records

    def _listing(self, problems: list[tuple[str, str]]) -> str:
        """One line for every bad record of the file: the count, the first SHOWN_PROBLEMS, the fix."""
        shown = "; ".join(f"sample {sample_id!r}: {reason}" for sample_id, reason in problems[:SHOWN_PROBLEMS])
        more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        return (f"{len(problems)} bad record(s) in {self.json_path}: {shown}{more}: fix them, or set "
                "data_settings.on_bad_sample: skip to leave them out")

    def _nothing_usable(self) -> BadSampleError:
        if not self.skipped:
            return BadSampleError(f"all {self.text_only} records are text-only, with no 'image' ({self.json_path}): "
                                  "there is nothing to prune in them; give a file of image records (text-only ones "
                                  "among them, as in llava_v1_5_mix665k.json, are counted and left out)")
        reasons = "; ".join(self.skipped[:3]) + (f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else "")
        text_only = f" and {self.text_only} text-only records left out" if self.text_only else ""
        return BadSampleError(f"no usable samples, all {len(self.skipped)} skipped{text_only} ({self.json_path}): "
                              f"{reasons}")

    def keep_turns(self, kept: list[int], reason: str) -> None:
        """Keep the first ``kept[i]`` turns of record i (trainers/training/preflight.py: those that fit the backbone's
        positions). A record cut short is counted in ``truncated``; one left with none is left out, counted in
        ``skipped`` with ``reason``."""
        records = []
        for record, n in zip(self.records, kept, strict=True):
            if n == 0:
                self.skipped.append(f"{reason} ({self.json_path}, sample {record.id!r})")
                continue
            if n < len(record.turns):
                self.truncated.append(record.id)
                record = dataclasses.replace(record, turns=record.turns[:n])
            records.append(record)
        if not records:
            raise BadSampleError(f"no usable samples left after leaving out {len(self.records)} ({reason}) "
                                 f"({self.json_path})")
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> InstructionSample:
        for offset in range(len(self.records)):
            record = self.records[(index + offset) % len(self.records)]
            try:
                with Image.open(record.image_path) as img:
                    image = img.convert("RGB")
                return InstructionSample(record.id, image, *record.turns[0], turns=record.turns,
                                         relevance=record.relevance)
            except OSError as err:
                # The header was read at load; the body (truncated data) only now. Under skip the next sample
                # takes its place (deterministically, so a resumed run reads the same batches).
                if self.on_bad_sample == "error":
                    raise BadSampleError(f"cannot read image {record.image_path}: {err} ({self.json_path}, sample "
                                         f"{record.id!r}): {SKIP_HINT}") from err
                if record.id not in self.unreadable:
                    self.unreadable.append(record.id)
                    log.warning(f"image {record.image_path} of sample {record.id!r} cannot be read in full ({err}): the "
                                "next sample takes its place (data_settings.on_bad_sample: skip)")
        raise BadSampleError(f"no image of the file can be read ({self.json_path}): check data_settings.image_folder")
