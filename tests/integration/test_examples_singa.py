"""``examples/singa_lora_mlp.py``, run as a user would.

The full run needs SINGA (and scikit-learn) in this interpreter and is skipped, with the
reason, where either is missing. The example's own answer to a missing SINGA (a message
and exit status 0) is checked everywhere.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from peftcore.io import read_adapter
from tests.subprocess_env import child_env

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "singa_lora_mlp.py"


def _run(code_or_args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = child_env(ROOT, ROOT / "backends" / "singa")
    return subprocess.run(
        [sys.executable, *code_or_args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


def test_example_skips_cleanly_without_singa() -> None:
    code = (
        "import runpy, sys\n"
        "sys.modules['singa'] = None  # makes `import singa` fail, as on a machine without SINGA\n"
        "sys.argv = ['singa_lora_mlp.py']\n"
        f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n"
    )
    done = _run(["-c", code])
    assert done.returncode == 0, done.stderr
    assert "skipping the SINGA LoRA example: singa is not importable" in done.stdout


def _require_singa_and_sklearn() -> None:
    from peftcore_singa.plugin import peftcore_backend

    info = peftcore_backend().info()
    if not info.available:
        pytest.skip(f"peftcore backend 'singa' unavailable: {info.reason}")
    pytest.importorskip("sklearn", reason="the example's digits data come from scikit-learn")


def _number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in the output:\n{text}"
    return float(found.group(1).replace(",", ""))


def test_example_trains_lora_and_saves_a_reloadable_adapter(tmp_path: Path) -> None:
    _require_singa_and_sklearn()
    out_dir = tmp_path / "adapter"
    done = _run([str(EXAMPLE), "--out", str(out_dir)])
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    before = _number(r"test accuracy on 0-9: ([\d.]+)", text)
    after = _number(r"after LoRA r=8 on linear1\+linear2 \(5 epochs\):\s+([\d.]+)", text)
    reloaded = _number(r"reloaded into a fresh copy of the base model, test accuracy: ([\d.]+)", text)
    assert before < 0.6  # the base never saw the digits 5-9
    assert after > 0.85 and after > before + 0.3
    assert reloaded == after
    assert _number(r"trainable parameters: ([\d,]+) of", text) == 8 * (64 + 256) + 8 * (256 + 10)
    assert _number(r"of ([\d,]+) \(", text) == 8 * (64 + 256) + 8 * (256 + 10) + 64 * 256 + 256 + 256 * 10 + 10

    files = read_adapter(str(out_dir))
    config = files.config
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (8, 16, ["linear1", "linear2"])
    shapes = {key: value.shape for key, value in files.tensors.items()}
    assert shapes == {
        "base_model.model.linear1.lora_A.weight": (8, 64),
        "base_model.model.linear1.lora_B.weight": (256, 8),
        "base_model.model.linear2.lora_A.weight": (8, 256),
        "base_model.model.linear2.lora_B.weight": (10, 8),
    }
