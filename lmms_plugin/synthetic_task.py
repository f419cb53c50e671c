"""A local lmms-eval task over the synthetic VQA questions: no hub download, scored like the project's evaluator.

    python -m lmms_plugin.synthetic_task outputs/lmms_task --size 200 --seed 0
    lmms-eval --model pruned_llava --model_args pretrained=backbones/tiny-llava,pruner=outputs/pruned_best \
        --tasks vtp_synthetic_vqa --include_path outputs/lmms_task

Writes the images (PNG), ``questions.json``, the task's YAML and its ``utils.py`` into one folder
(lmms-eval reads data files by absolute path, so the folder is written where it is used). The
metric is ``exact_match`` with the project's answer normalisation (data/scoring.is_correct), so
its score equals ``accuracy_hard`` of the trainer's evaluation on the same questions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data.synthetic_vqa import SyntheticVQADataset

TASK = "vtp_synthetic_vqa"

UTILS = '''\
from PIL import Image

from data.scoring import is_correct


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(is_correct(results[0], doc["answer"]))}
'''


def write_task(folder: str | Path, size: int, seed: int = 0, max_new_tokens: int = 4) -> Path:
    """The task folder for ``--include_path``: the first ``size`` eval questions of ``seed``'s synthetic draw."""
    folder = Path(folder).resolve()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    data = SyntheticVQADataset(size, "eval", seed)
    records = []
    for i in range(size):
        sample = data[i]
        image = folder / "images" / f"{sample.id}.png"
        sample.image.save(image)
        records.append({"id": sample.id, "image": str(image), "question": sample.question, "answer": sample.answer,
                        "question_type": sample.question_type})
    (folder / "questions.json").write_text(json.dumps(records, indent=1))
    (folder / "utils.py").write_text(UTILS)
    (folder / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "questions.json"}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: ["</s>"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_task(args.folder, args.size, args.seed))


if __name__ == "__main__":
    main()
