"""TextVQA questions and OCR tokens -> a LLaVA instruction file whose records carry relevant_boxes.

    python scripts/textvqa_to_llava.py TextVQA_0.5.1_train.json TextVQA_Rosetta_OCR_v0.2_train.json \
        --out textvqa_boxes.json

One one-turn record per question, its answer the most frequent of the ten, its image
``textvqa/train_images/<image_id>.jpg`` (``--image-folder``), its relevant boxes the OCR tokens that spell the answer
(data/grounding.py); ``--distractors`` adds the other OCR tokens as distractor_boxes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.grounding import SHORT_ANSWER, read_json, textvqa_records, write_records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("questions", type=Path, help="TextVQA questions, e.g. TextVQA_0.5.1_train.json")
    parser.add_argument("ocr", type=Path, help="its OCR tokens, e.g. TextVQA_Rosetta_OCR_v0.2_train.json")
    parser.add_argument("--out", type=Path, required=True, help="the LLaVA instruction JSON to write")
    parser.add_argument("--image-folder", default="textvqa/train_images", help="the images' folder, relative to "
                        "data_settings.image_folder (default: textvqa/train_images, LLaVA-1.5's layout)")
    parser.add_argument("--prompt", default=SHORT_ANSWER, help=f"put after each question (default: {SHORT_ANSWER!r}; "
                        "'' for none)")
    parser.add_argument("--distractors", action="store_true", help="also the other OCR tokens, as distractor_boxes")
    args = parser.parse_args(argv)
    try:
        records, counts = textvqa_records(read_json(args.questions), read_json(args.ocr), args.image_folder,
                                          args.prompt, args.distractors)
    except (ValueError, KeyError, TypeError) as err:
        parser.error(f"not TextVQA's format ({err!r}): give the questions file and the OCR file of the same split")
    print(write_records(args.out, records, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
