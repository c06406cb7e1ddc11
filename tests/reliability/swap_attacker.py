"""A local attacker with write access to a save directory, for ``test_round3_files.py``.

Run as ``python swap_attacker.py MODE OUTSIDE STOP REPORT FOLDER...``. Until the file
``STOP`` exists it polls each ``FOLDER`` as fast as it can and:

- ``temp`` mode: swaps every hidden temporary file it sees (``.*.tmp``, peftcore's
  staging and backup names) for a symbolic link to the file ``OUTSIDE``;
- ``folder`` mode: moves every real subfolder named ``b`` away and puts a symbolic link
  to the folder ``OUTSIDE`` in its place.

It then writes the number of swaps it made to ``REPORT``.
"""

from __future__ import annotations

import os
import sys


def swap_temp_files(folder: str, outside: str) -> int:
    swaps = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.islink(path):
                continue
            os.unlink(path)
            os.symlink(outside, path)
            swaps += 1
        except OSError:
            pass  # the saver got there first
    return swaps


def swap_subfolder(folder: str, outside: str, count: int) -> int:
    path = os.path.join(folder, "b")
    try:
        if os.path.islink(path) or not os.path.isdir(path):
            if os.path.islink(path):
                os.unlink(path)  # let the next save make a real folder again
            return 0
        os.rename(path, os.path.join(folder, f"moved-{count}"))
        os.symlink(outside, path)
        return 1
    except OSError:
        return 0


def main() -> None:
    mode, outside, stop, report, *folders = sys.argv[1:]
    swaps = 0
    while not os.path.exists(stop):
        for folder in folders:
            swaps += swap_temp_files(folder, outside) if mode == "temp" else swap_subfolder(folder, outside, swaps)
    with open(report, "w", encoding="utf-8") as handle:
        handle.write(str(swaps))


if __name__ == "__main__":
    main()
