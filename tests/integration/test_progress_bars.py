"""Long work shows a tqdm progress bar on a terminal, and stays quiet otherwise: the
demo's training loop, run with its output on a pseudo-terminal and on a pipe."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.subprocess_env import child_env

pytest.importorskip("torch")
pytest.importorskip("tqdm")
pty = pytest.importorskip("pty")
fcntl = pytest.importorskip("fcntl")
termios = pytest.importorskip("termios")
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (
    "import torch\n"
    "from peftcore.demo import _train\n"
    "model = torch.nn.Linear(4, 3)\n"
    "x, y = torch.randn(256, 4), torch.randint(0, 3, (256,))\n"
    "_train(model, list(model.parameters()), x, y, epochs=2, lr=0.1, seed=0, label='training')\n"
)


def _run(terminal: bool) -> str:
    if not terminal:
        done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=child_env(ROOT), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr
    leader, follower = pty.openpty()
    # a terminal of 24 x 100 (a new pseudo-terminal is 0 x 0, where a bar has no room)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT, env=child_env(ROOT), stdout=follower,
                               stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=300) == 0
    os.close(leader)
    return b"".join(chunks).decode("utf-8", "replace")


def test_progress_bar_on_a_terminal_only():
    shown = _run(terminal=True)
    assert "training" in shown and "8/8" in shown and "step" in shown  # 2 epochs x 4 batches of 64
    assert _run(terminal=False) == ""
