"""The results file: one JSON object per line, appended as soon as a run finishes.

A run record has ``"record": "run"`` and the fields of :func:`run_key` (which identify
it: a run whose key is already in the file is skipped when the script runs again), its
accuracies, parameter counts and times. ``"record": "meta"`` lines describe an
invocation (command, machine, versions); the report shows the latest one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

KEY_FIELDS = ("method", "k", "seed", "lr", "prompt_length", "steps")


def run_key(record: dict[str, Any]) -> tuple:
    """What identifies a run: method, K, seed, learning rate, prompt length and steps."""
    return tuple(_normalise(record.get(name)) for name in KEY_FIELDS)


def _normalise(value: Any) -> Any:
    return float(f"{value:.6g}") if isinstance(value, float) else value


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of ``path`` (none when it does not exist); a torn last line is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted write
    return records


def run_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run records, the first of each key only."""
    seen: set[tuple] = set()
    runs = []
    for record in records:
        if record.get("record") == "run" and run_key(record) not in seen:
            seen.add(run_key(record))
            runs.append(record)
    return runs


def latest_meta(records: Iterable[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The last ``meta`` record, if any."""
    metas = [r for r in records if r.get("record") == "meta"]
    return metas[-1] if metas else None


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line and flush it to disk at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()


class ResultStore:
    """The runs of one results file, keyed for resuming."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records = read_records(path)
        self.runs = {run_key(r): r for r in run_records(self.records)}

    def get(self, key: tuple) -> Optional[dict[str, Any]]:
        """The finished run with ``key``, or ``None``."""
        return self.runs.get(tuple(_normalise(v) for v in key))

    def add(self, record: dict[str, Any]) -> None:
        """Write a finished run (or a meta record) to the file and remember it."""
        append_record(self.path, record)
        self.records.append(record)
        if record.get("record") == "run":
            self.runs.setdefault(run_key(record), record)
