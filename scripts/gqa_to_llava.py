"""GQA questions and scene graphs -> a LLaVA instruction file whose records carry relevant_boxes.

    python scripts/gqa_to_llava.py train_balanced_questions.json train_sceneGraphs.json --out gqa_boxes.json

One one-turn record per question, its image ``gqa/images/<imageId>.jpg`` (``--image-folder``), its relevant boxes
the scene-graph objects its annotations name (data/grounding.py); ``--distractors`` adds the image's other objects as
distractor_boxes. docs/data.md ("Relevance boxes") says how such records train.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.grounding import SHORT_ANSWER, gqa_records, read_json, write_records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("questions", type=Path, help="GQA questions, e.g. train_balanced_questions.json")
    parser.add_argument("scene_graphs", type=Path, help="GQA scene graphs, e.g. train_sceneGraphs.json")
    parser.add_argument("--out", type=Path, required=True, help="the LLaVA instruction JSON to write")
    parser.add_argument("--image-folder", default="gqa/images", help="the images' folder, relative to "
                        "data_settings.image_folder (default: gqa/images, LLaVA-1.5's layout)")
    parser.add_argument("--prompt", default=SHORT_ANSWER, help=f"put after each question (default: {SHORT_ANSWER!r}; "
                        "'' for none)")
    parser.add_argument("--distractors", action="store_true", help="also the image's other objects, as distractor_boxes")
    args = parser.parse_args(argv)
    try:
        questions, graphs = read_json(args.questions), read_json(args.scene_graphs)
        records, counts = gqa_records(questions, graphs, args.image_folder, args.prompt, args.distractors)
    except (ValueError, KeyError, TypeError) as err:
        parser.error(f"not GQA's format ({err!r}): give the questions file and the scene graphs of the same split")
    print(write_records(args.out, records, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
