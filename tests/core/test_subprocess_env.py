"""Subprocesses started by the tests keep the caller's environment and only add to it."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.subprocess_env import child_env


def test_paths_go_in_front_of_the_callers_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/opt/singa/python", "/shim"]))
    monkeypatch.setenv("SOME_SETTING", "kept")
    env = child_env("/checkout", "/shim", EXTRA="1")
    assert env["PYTHONPATH"].split(os.pathsep) == ["/checkout", "/shim", "/opt/singa/python"]
    assert env["SOME_SETTING"] == "kept" and env["EXTRA"] == "1"


def test_without_a_callers_pythonpath_only_the_given_paths_are_set(monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert child_env("/a")["PYTHONPATH"] == "/a"
    assert "PYTHONPATH" not in child_env()


def test_a_child_can_import_what_the_callers_pythonpath_provides(tmp_path, monkeypatch):
    (tmp_path / "only_on_pythonpath.py").write_text("VALUE = 42\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    code = "import only_on_pythonpath; print(only_on_pythonpath.VALUE)"
    done = subprocess.run([sys.executable, "-c", code], env=child_env("/checkout"), capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "42", done.stderr
