"""``python -m peftcore``: the command line (see :mod:`peftcore.cli`)."""

from __future__ import annotations

import sys

from peftcore.cli import main

if __name__ == "__main__":
    sys.exit(main())
