"""Test modules skip, with the reason, where an optional package is missing: collection
of every module that builds models with ``tests/integration/tiny.py`` is run in a fresh
interpreter in which ``import transformers`` fails, as in an environment with SINGA and
torch but no transformers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.subprocess_env import child_env

ROOT = Path(__file__).resolve().parents[2]


def _modules_using_tiny() -> list[str]:
    here = Path(__file__).parent
    return sorted(
        str(path.relative_to(ROOT))
        for path in here.glob("test_*.py")
        if re.search(r"^from tests\.integration import tiny\b", path.read_text(encoding="utf-8"), re.M)
    )


def test_modules_using_tiny_skip_without_transformers() -> None:
    modules = _modules_using_tiny()
    assert len(modules) >= 5
    code = (
        "import sys; sys.modules['transformers'] = None; import pytest; "
        f"sys.exit(pytest.main(['-p', 'no:cacheprovider', '--collect-only', '-q', '-rs', *{modules!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=child_env(ROOT))
    assert "error" not in done.stdout.lower(), done.stdout[-3000:]
    assert done.returncode == 5, done.stdout[-3000:]  # 5: nothing collected (every module skipped)
    skipped = re.findall(r"^SKIPPED \[(\d+)\] (\S+): (.+)$", done.stdout, re.M)
    assert sum(int(count) for count, _, _ in skipped) == len(modules)
    assert all("transformers" in reason for _, _, reason in skipped), skipped


def test_qlora_tests_skip_without_bitsandbytes() -> None:
    code = (
        "import sys; sys.modules['bitsandbytes'] = None; import pytest; "
        "sys.exit(pytest.main(['-p', 'no:cacheprovider', '--collect-only', '-q', '-rs', "
        "'tests/integration/test_qlora.py']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=child_env(ROOT))
    assert done.returncode == 5, done.stdout[-3000:]  # nothing collected: the module skipped
    skipped = re.findall(r"^SKIPPED \[1\] (\S+): (.+)$", done.stdout, re.M)
    assert len(skipped) == 1 and "bitsandbytes" in skipped[0][1], done.stdout[-3000:]
