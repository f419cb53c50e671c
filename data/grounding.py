"""Relevance boxes from what public data sets ship: LLaVA instruction records with ``relevant_boxes``.

- GQA: each question's ``annotations`` name the scene-graph objects its question, answer and full answer refer to
  (``{"question": {"2": "1234"}, "answer": {...}, "fullAnswer": {...}}``: word span -> object id), and the image's
  scene graph gives every object's box (``x``, ``y``, ``w``, ``h`` in pixels) and the image's ``width`` and ``height``.
- Grounding records inside a LLaVA file (RefCOCO and Visual Genome in LLaVA-1.5's mixture): their conversations
  write regions as ``[x0, y0, x1, y1]`` in fractions of the padded square LLaVA-1.5 trains on (the image centred on a
  square of its longer side, ``expand2square``); the boxes are moved back onto the image itself.
- TextVQA: the OCR tokens of the image (``ocr_info``: ``word`` and ``bounding_box`` with ``top_left_x``,
  ``top_left_y``, ``width``, ``height`` in fractions of the image; rotation is ignored) whose words are the answer's.

The box format is data/relevance.py's. scripts/gqa_to_llava.py, scripts/grounding_boxes.py and
scripts/textvqa_to_llava.py read the files and call these.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

from data.relevance import Box

SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5's prompt for its short-answer data
DECIMALS = 4  # boxes are written rounded: 1e-4 of an image's side is far below a pixel of any processor
TEXT_BOX = re.compile(r"\[\s*(\d*\.?\d+)\s*,\s*(\d*\.?\d+)\s*,\s*(\d*\.?\d+)\s*,\s*(\d*\.?\d+)\s*\]")
# words too common to mark an OCR token as the answer's
STOPWORDS = frozenset({"a", "an", "the", "of", "and", "or", "to", "in", "on", "at", "is", "for"})


def read_json(path: str | Path, kind: type = dict) -> Any:
    """The JSON value of a file, which must be a ``kind``; ValueError naming the file and what is wrong."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if not isinstance(value, kind):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not the {kind.__name__} this format has")
    return value


def write_records(path: Path, records: list, counts: dict[str, int]) -> str:
    """Write the records as a JSON list through a temporary file beside ``path`` (a crash or a full disk never
    leaves half a file, nor touches one already there, which may be the input itself); the line a converter prints."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(records))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    found = ", ".join(f"{n} {what}" for what, n in counts.items()) or "no boxes found"
    return f"wrote {path}: {len(records)} records ({found})"


def clipped_box(x0: float, y0: float, x1: float, y1: float) -> Box | None:
    """The box inside [0, 1] x [0, 1], rounded to DECIMALS; None when nothing of it is left."""
    box = tuple(round(min(max(v, 0.0), 1.0), DECIMALS) for v in (x0, y0, x1, y1))
    return box if box[0] < box[2] and box[1] < box[3] else None


def llava_record(record_id: str, image: str, question: str, answer: str, prompt: str,
                 relevant: Iterable[Box | None], distractors: Iterable[Box | None] | None = None) -> dict:
    """One LLaVA instruction record of a single turn (the prompt, when given, after the question on its own line, as
    LLaVA-1.5 asks its short-answer data), with its boxes when it has any (each once, in order)."""
    question = f"{question.strip()}\n{prompt}" if prompt else question.strip()
    record = {"id": record_id, "image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                                 {"from": "gpt", "value": answer.strip()}]}
    relevant = list(dict.fromkeys(b for b in relevant if b is not None))
    if relevant:
        record["relevant_boxes"] = [list(b) for b in relevant]
        if distractors is not None:
            record["distractor_boxes"] = [list(b) for b in dict.fromkeys(d for d in distractors if d is not None)
                                          if b not in relevant]
    return record


# ----------------------------------------------------------------------------- GQA
def gqa_records(questions: dict, scene_graphs: dict, image_folder: str = "gqa/images", prompt: str = SHORT_ANSWER,
                distractors: bool = False) -> tuple[list[dict], Counter]:
    """One record per GQA question (``questions``: question id -> question, as in ``train_balanced_questions.json``;
    ``scene_graphs``: image id -> scene graph, as in ``train_sceneGraphs.json``), its relevant boxes those of the
    objects its annotations name; ``distractors``: the image's other objects too. Questions without an annotated
    object that the scene graph holds keep no boxes (counted)."""
    records, counts = [], Counter()
    for question_id, question in questions.items():
        graph = scene_graphs.get(question["imageId"])
        named = [object_id for part in ("question", "answer", "fullAnswer")
                 for object_id in (question.get("annotations") or {}).get(part, {}).values()]
        objects = graph.get("objects", {}) if graph is not None else {}
        counts["no scene graph"] += graph is None
        counts["annotated objects missing from the scene graph"] += sum(o not in objects for o in named) if graph else 0
        boxes = {object_id: gqa_box(obj, graph["width"], graph["height"]) for object_id, obj in objects.items()}
        record = llava_record(str(question_id), f"{image_folder}/{question['imageId']}.jpg", question["question"],
                              question["answer"], prompt, (boxes[o] for o in named if o in boxes),
                              boxes.values() if distractors else None)
        counts["with boxes" if "relevant_boxes" in record else "without boxes"] += 1
        records.append(record)
    return records, +counts


def gqa_box(obj: dict, width: int, height: int) -> Box | None:
    """A scene-graph object's box (x, y, w, h in pixels) in fractions of its image."""
    return clipped_box(obj["x"] / width, obj["y"] / height, (obj["x"] + obj["w"]) / width,
                       (obj["y"] + obj["h"]) / height)


# ----------------------------------------------------------------------------- boxes in LLaVA's conversations
def unpadded_box(box: Box, width: int, height: int) -> Box | None:
    """A box in fractions of LLaVA-1.5's padded square (``expand2square``: the image pasted at
    ((side - width) // 2, (side - height) // 2) on a square of side max(width, height)), in fractions of the image."""
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    return clipped_box((box[0] * side - left) / width, (box[1] * side - top) / height,
                       (box[2] * side - left) / width, (box[3] * side - top) / height)


def add_grounding_boxes(records: list, image_size: Callable[[str], tuple[int, int] | None] | None,
                        padded: bool = True) -> Counter:
    """Give every image record whose conversation writes regions as ``[x0, y0, x1, y1]`` (fractions, each within
    [0, 1], x0 < x1 and y0 < y1) those regions as its ``relevant_boxes``, in place: all of a conversation's regions,
    since the vision tokens are pruned once for the whole of it. ``padded``: the regions are in fractions of
    LLaVA-1.5's padded square (its mixture's convention), else of the image itself; ``image_size(image path)``: the
    image's (width, height), or None when it cannot be read (needed when ``padded``). Records that already carry
    boxes are left as they are."""
    counts = Counter()
    for record in records:
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            continue
        written = [tuple(float(v) for v in match.groups()) for turn in record.get("conversations") or []
                   if isinstance(turn, dict) and isinstance(turn.get("value"), str)
                   for match in TEXT_BOX.finditer(turn["value"])]
        regions = [box for box in written if 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1]
        counts["bracketed numbers that are no box"] += len(written) - len(regions)
        if not regions:
            continue
        if "relevant_boxes" in record:
            counts["already with boxes"] += 1
            continue
        size = image_size(record["image"]) if padded else None
        if padded and size is None:
            counts["image unreadable"] += 1
            continue
        boxes = list(dict.fromkeys(unpadded_box(b, *size) if padded else clipped_box(*b) for b in regions))
        boxes = [list(b) for b in boxes if b is not None]
        counts["regions outside the image"] += len(regions) - len(boxes)
        if boxes:
            record["relevant_boxes"] = boxes
            counts["given boxes"] += 1
    return +counts


# ----------------------------------------------------------------------------- TextVQA
def words(text: str) -> list[str]:
    """Lower-case runs of letters and digits."""
    return re.findall(r"[a-z0-9]+", text.lower())


def textvqa_records(questions: dict, ocr: dict, image_folder: str = "textvqa/train_images",
                    prompt: str = SHORT_ANSWER, distractors: bool = False) -> tuple[list[dict], Counter]:
    """One record per TextVQA question (``questions``: ``{"data": [{"question_id", "image_id", "question",
    "answers": [10 answers]}, ...]}``; ``ocr``: ``{"data": [{"image_id", "ocr_info": [...]}, ...]}``), its answer the
    most frequent of the ten, its relevant boxes those of the OCR tokens whose every word is among the answer's words
    (STOPWORDS apart); ``distractors``: the image's other OCR tokens too. Questions whose answer no token spells keep
    no boxes (counted)."""
    tokens = {entry["image_id"]: entry.get("ocr_info") or [] for entry in ocr["data"]}
    records, counts = [], Counter()
    for question in questions["data"]:
        if not question.get("answers"):
            counts["no answer (left out)"] += 1
            continue
        answer = Counter(question["answers"]).most_common(1)[0][0]
        wanted = set(words(answer)) - STOPWORDS
        relevant, others = [], []
        for token in tokens.get(question["image_id"], []):
            box = token["bounding_box"]
            box = clipped_box(box["top_left_x"], box["top_left_y"], box["top_left_x"] + box["width"],
                              box["top_left_y"] + box["height"])
            pieces = set(words(token["word"])) - STOPWORDS
            (relevant if pieces and pieces <= wanted else others).append(box)
        counts["no OCR for the image"] += question["image_id"] not in tokens
        record = llava_record(str(question["question_id"]), f"{image_folder}/{question['image_id']}.jpg",
                              question["question"], answer, prompt, relevant, others if distractors else None)
        counts["with boxes" if "relevant_boxes" in record else "without boxes"] += 1
        records.append(record)
    return records, +counts
