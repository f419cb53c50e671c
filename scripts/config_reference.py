"""Write docs/configuration.md from configs/schema.py (configs/reference.py renders it).

    python scripts/config_reference.py            # writes the page
    python scripts/config_reference.py --check    # exit 1 when the page differs from what it would write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from configs.reference import PAGE, ROOT, render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare the page with the schema instead of writing it")
    parser.add_argument("--page", type=Path, default=PAGE, help=f"the page (default: {PAGE.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    try:
        text = render()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    page = args.page.resolve()
    shown = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
    if args.check:
        if not page.is_file() or page.read_text() != text:
            print(f"{shown} is out of date with configs/schema.py; run python scripts/config_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    page.write_text(text)
    print(f"wrote {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
