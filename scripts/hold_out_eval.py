"""Cut an evaluation file out of a LLaVA instruction mixture (LLaVA-665K has none) for in-training evaluation.

    python scripts/hold_out_eval.py llava_v1_5_mix665k.json --out data/llava665k --size 500

Writes ``OUT/train.json`` (the mixture less the held-out records) and ``OUT/eval.json`` (``--size``
one-turn records whose answer is at most ``--max-answer-words`` words), as data/splits.py describes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from data.splits import hold_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mixture", type=Path, help="the instruction JSON, e.g. llava_v1_5_mix665k.json")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.json and eval.json")
    parser.add_argument("--size", type=int, default=500, help="held-out questions (default 500)")
    parser.add_argument("--max-answer-words", type=int, default=3, help="longest answer held out (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size < 1 or args.max_answer_words < 1:
        parser.error("--size and --max-answer-words must be at least 1")
    try:
        records = json.loads(args.mixture.read_text())
    except (OSError, json.JSONDecodeError) as err:
        parser.error(f"cannot read {args.mixture}: {err}")
    if not isinstance(records, list):
        parser.error(f"{args.mixture} holds a {type(records).__name__}, not a JSON list of records")
    try:
        train, held = hold_out(records, args.size, args.max_answer_words, args.seed)
    except ValueError as err:
        parser.error(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.json").write_text(json.dumps(train))
    (args.out / "eval.json").write_text(json.dumps(held))
    print(f"wrote {args.out / 'train.json'} ({len(train)} records) and {args.out / 'eval.json'} ({len(held)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
