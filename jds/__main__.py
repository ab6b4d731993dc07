"""``python -m jds``: the ``jds`` command."""

import sys

from jds.cli import entry

sys.exit(entry())
