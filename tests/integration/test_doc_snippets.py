"""Every fenced Python block of README.md and docs/*.md runs as written.

A block that cannot run alone (it needs the reader's model, data, a distributed job or
SINGA) is marked on the line before its fence with ``<!-- fragment: why -->``; a
fragment must still be valid Python. Only a fragment may hold a placeholder (``...``
as a value). The rest run here, each in a fresh namespace in a temporary directory.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.subprocess_env import child_env

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
FRAGMENT = re.compile(r"<!--\s*fragment:\s*(.+?)\s*-->\s*$")


def _blocks() -> list[tuple[str, str, bool]]:
    """``(id, code, is_fragment)`` for every fenced Python block."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            found.append((f"{document.name}:{line}", match.group(1), bool(FRAGMENT.search(before))))
    return found


BLOCKS = _blocks()


def test_the_documents_have_python_blocks_and_most_run():
    assert len(BLOCKS) >= 8
    assert sum(not fragment for _, _, fragment in BLOCKS) >= 3


@pytest.mark.parametrize("where, code, fragment", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_snippet(where, code, fragment, tmp_path, monkeypatch):
    tree = ast.parse(code, filename=where)  # every block is valid Python, fragments included
    if fragment:
        return
    placeholders = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value is Ellipsis]
    assert not placeholders, f"{where}: a placeholder (...) on line(s) {placeholders}; mark the block as a fragment"
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    exec(compile(tree, where, "exec"), {"__name__": "__snippet__"})


def test_cli_docs_list_the_methods_the_torch_backend_builds():
    """docs/cli.md's sample ``peftcore backends`` output names what the command prints
    (run in a fresh interpreter: other tests register methods of their own in this one)."""
    pytest.importorskip("torch")

    def methods(line: str) -> list[str]:
        return [name.strip() for name in line.split("  ")[-1].split(",")]

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    sample = next(line for line in text.splitlines() if line.startswith("torch ") and "PyTorch" in line)
    done = subprocess.run([sys.executable, "-m", "peftcore", "backends"], cwd=ROOT, env=child_env(ROOT),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = next(line for line in done.stdout.splitlines() if line.startswith("torch "))
    assert methods(sample) == methods(printed) and len(methods(printed)) >= 8
