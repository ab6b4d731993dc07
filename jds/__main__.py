"""``python -m jds``: the ``jds`` command."""

import sys

from jds.cli import main

sys.exit(main())
