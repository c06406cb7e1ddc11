"""Picking a backend for a model imports no other framework: a backend that names its
framework's modules (``peftcore_backend_modules``) is asked about a model only when one of
the model's classes comes from them. Each check runs in a fresh interpreter, where
``sys.modules`` shows what was imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.subprocess_env import child_env


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=child_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_a_model_of_no_framework_builds_no_runtime() -> None:
    """An object of no framework's classes: no backend's runtime is built (no framework
    imported), and the error still lists every installed backend."""
    out = _run(
        """
        import sys
        from peftcore.plugins import get_plugin_manager
        from peftcore.errors import BackendError
        manager = get_plugin_manager()
        claims = {name: b.may_own(object()) for name, b in manager.backends().items()}
        imported = sorted(m for m in ("torch", "singa") if m in sys.modules)
        try:
            manager.select_backend(object())
        except BackendError as exc:
            listed = all(f"- {name} (" in str(exc) for name in claims)
        print(claims.get("torch"), claims.get("singa"), imported, listed)
        """
    )
    assert out == "False False [] True"


def test_detecting_a_singa_model_leaves_torch_unimported() -> None:
    pytest.importorskip("torch")  # the point: torch is installed, and still not imported
    out = _run(
        """
        import sys
        from peftcore.errors import BackendError
        from peftcore.plugins import get_plugin_manager
        try:
            get_plugin_manager().get_backend("singa")
        except BackendError as exc:
            print("SKIP", str(exc).replace("\\n", " "))
            raise SystemExit(0)
        from peftcore_singa.compat import import_singa
        import_singa()
        from singa import layer, model
        import peftcore

        class Net(model.Model):
            def __init__(self):
                super().__init__()
                self.fc1 = layer.Linear(4, 3)

            def forward(self, x):
                return self.fc1(x)

        peft_model = peftcore.get_peft_model(Net(), peftcore.LoraConfig(r=2, target_modules=["fc1"]))
        print(type(peft_model).__name__, peft_model.backend_name, "torch" in sys.modules)
        """
    )
    if out.startswith("SKIP"):
        pytest.skip(out)
    assert out == "SingaPeftModel singa False"


def test_detecting_a_torch_model_still_finds_torch() -> None:
    pytest.importorskip("torch")
    out = _run(
        """
        import sys
        import torch
        import peftcore
        net = torch.nn.Sequential(torch.nn.Linear(4, 3))
        peft_model = peftcore.get_peft_model(net, peftcore.LoraConfig(r=2, target_modules=["0"]))
        print(peft_model.backend_name, "singa" in sys.modules)
        """
    )
    assert out == "torch False"
