"""Write ``docs/cli/<command>.md``: every ``jds`` command's ``--help``, from the parsers.

    python scripts/make_cli_docs.py          # rewrite the pages
    python scripts/make_cli_docs.py --check  # exit 1 if a page differs from the code

The pages are generated, so they cannot drift from ``jds/cli.py``; ``tests/test_cli.py``
runs the check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jds.cli import cli_doc_pages

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args()
    pages = cli_doc_pages()
    stale = sorted({p.name for p in DOCS.glob("*.md")} - set(pages))
    bad = [n for n, text in pages.items()
           if not (DOCS / n).is_file() or (DOCS / n).read_text() != text]
    if args.check:
        for n in bad + stale:
            print(f"docs/cli/{n} is out of date: run python scripts/make_cli_docs.py")
        return 1 if bad or stale else 0
    DOCS.mkdir(parents=True, exist_ok=True)
    for n in stale:
        (DOCS / n).unlink()
    for n, text in pages.items():
        (DOCS / n).write_text(text)
    print(f"wrote {len(pages)} pages to {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
