"""Regenerate the sharding golden files (``tests/golden/sharding/<preset>__<layout>.txt``).

The goldens are ``jds explain``'s text for every preset under a few layouts (the
``LAYOUTS`` table in ``tests/test_memory.py``). Run this after an intended change to the
models, the rules or the ZeRO plan, then review ``git diff tests/golden``::

    python scripts/update_goldens.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    """Run the golden tests with ``JDS_UPDATE_GOLDENS=1``, which rewrites the files."""
    env = {**os.environ, "JDS_UPDATE_GOLDENS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "tests/test_memory.py", "-k", "goldens"]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
