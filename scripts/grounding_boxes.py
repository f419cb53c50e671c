"""Boxes written in a LLaVA instruction file's conversations -> relevant_boxes on their records.

    python scripts/grounding_boxes.py llava_v1_5_mix665k.json --image-folder /data/llava --out mix665k_boxes.json

Every image record whose conversation writes regions as ``[x0, y0, x1, y1]`` (RefCOCO and Visual Genome in
LLaVA-1.5's mixture) gets them as relevant_boxes, moved from LLaVA-1.5's padded square onto the image (each image's
size is read from its header under ``--image-folder``; ``--unpadded`` when the file's boxes are already in fractions
of the image). Other records are written unchanged (data/grounding.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from data.grounding import add_grounding_boxes, read_json, write_records


def header_size(folder: Path):
    """image path -> (width, height) from the file's header, None when it cannot be read."""
    def size(image: str) -> tuple[int, int] | None:
        try:
            with Image.open(folder / image) as img:
                return img.size
        except (OSError, Image.DecompressionBombError):
            return None
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("instructions", type=Path, help="a LLaVA instruction JSON, e.g. llava_v1_5_mix665k.json")
    parser.add_argument("--out", type=Path, required=True, help="the instruction JSON to write")
    parser.add_argument("--image-folder", type=Path, help="the folder the records' image paths are relative to "
                        "(data_settings.image_folder); needed unless --unpadded")
    parser.add_argument("--unpadded", action="store_true", help="the boxes are in fractions of the image itself, not of "
                        "LLaVA-1.5's padded square")
    args = parser.parse_args(argv)
    if not args.unpadded and (args.image_folder is None or not args.image_folder.is_dir()):
        parser.error("--image-folder must be the images' folder: a padded-square box needs its image's size "
                     "(or pass --unpadded)")
    try:
        records = read_json(args.instructions, list)
    except ValueError as err:
        parser.error(str(err))
    counts = add_grounding_boxes(records, header_size(args.image_folder) if not args.unpadded else None,
                                 padded=not args.unpadded)
    print(write_records(args.out, records, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
