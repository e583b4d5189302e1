"""The README's demo table is what the demo prints: check it (CI) or write it.

    python tools/readme_table.py --check runs/tiny_cpu/table.txt    exit 1 with a diff when the README differs
    python tools/readme_table.py --write runs/tiny_cpu/table.txt    put the printed table into the README
    python tools/readme_table.py --write runs/smollm2_cpu/table.txt --name smollm2_cpu

The README holds each table verbatim in the fenced block right after the line `<!-- table: NAME -->` (NAME: the
recipe, default tiny_cpu). CI checks tiny_cpu's, which it runs; smollm2_cpu's (~20 minutes) is written by hand.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(lines: list[str], name: str) -> tuple[int, int]:
    """Line indices (first, end) of the table inside the fenced block after the marker of `name`."""
    marker = f"<!-- table: {name} -->"
    at = lines.index(marker)
    if not lines[at + 1].startswith("```"):
        raise SystemExit(f"{README}: a ``` block must follow {marker!r}")
    end = next(i for i in range(at + 2, len(lines)) if lines[i].startswith("```"))
    return at + 2, end


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", metavar="TABLE_TXT")
    mode.add_argument("--write", metavar="TABLE_TXT")
    ap.add_argument("--name", default="tiny_cpu", help="the recipe whose table it is (the README's marker)")
    args = ap.parse_args(argv)
    printed = Path(args.check or args.write).read_text().rstrip("\n").splitlines()
    lines = README.read_text().splitlines()
    a, b = _block(lines, args.name)
    if args.write:
        README.write_text("\n".join(lines[:a] + printed + lines[b:]) + "\n")
        return 0
    if lines[a:b] != printed:
        sys.stdout.writelines(difflib.unified_diff([x + "\n" for x in lines[a:b]], [x + "\n" for x in printed],
                                                   "README.md", args.check))
        return 1
    print(f"README table == {args.check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
