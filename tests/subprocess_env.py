"""The environment for a Python subprocess a test starts: the caller's, with paths added.

A test never replaces ``PYTHONPATH``: on a machine where a package (a SINGA source
build, say) is importable only through it, a replaced one hides that package from the
child. Paths a test needs go in front; what the caller had stays behind them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def child_env(*paths: Union[str, Path], **variables: str) -> dict[str, str]:
    """``os.environ`` plus ``variables``, with ``paths`` put in front of ``PYTHONPATH``."""
    env = {**os.environ, **variables}
    entries = [str(path) for path in paths if str(path)]
    existing = env.get("PYTHONPATH", "")
    entries += [entry for entry in existing.split(os.pathsep) if entry and entry not in entries]
    if entries:
        env["PYTHONPATH"] = os.pathsep.join(entries)
    return env
