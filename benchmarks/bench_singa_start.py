"""Measurement 7: how long ``get_peft_model`` takes on a SINGA model, torch installed.

Each round starts a fresh interpreter that has SINGA (this one, or ``--singa-python``),
imports SINGA and defines a small MLP (not timed), then times ``import peftcore`` plus
``get_peft_model(model, LoraConfig(...))``: plugin discovery, backend detection and the
wrap. The reference is ``import torch`` timed the same way in the same interpreter,
which is what detection used to add when it asked the torch backend about every model.
The row also requires that torch stays out of ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Dict, List, Optional

from harness import Result, Settings, median, progress

TITLE = "7. get_peft_model on a SINGA MLP (cold interpreter)"
MARKER = "SINGA-START:"

_WRAP = """
import json, sys, time
from peftcore_singa.compat import import_singa
import_singa()
from singa import layer, model

class MLP(model.Model):
    def __init__(self):
        super().__init__()
        self.linear1, self.relu, self.linear2 = layer.Linear(64), layer.ReLU(), layer.Linear(10)

    def forward(self, x):
        return self.linear2(self.relu(self.linear1(x)))

net = MLP()
started = time.perf_counter()
import peftcore
peft_model = peftcore.get_peft_model(net, peftcore.LoraConfig(r=8, target_modules=["linear1", "linear2"]))
seconds = time.perf_counter() - started
print(MARKER + json.dumps({"seconds": seconds, "torch": "torch" in sys.modules, "backend": peft_model.backend_name}))
"""

_IMPORT_TORCH = """
import json, time
started = time.perf_counter()
import torch
print(MARKER + json.dumps({"seconds": time.perf_counter() - started}))
"""


def _child(python: str, code: str) -> Dict[str, Any]:
    done = subprocess.run(
        [python, "-c", f"MARKER = {MARKER!r}\n{code}"], capture_output=True, text=True, check=False, timeout=300
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{python} failed: {done.stderr.strip()[-600:]}")
    return dict(json.loads(lines[-1][len(MARKER) :]))


def _singa_python(singa_python: Optional[str]) -> Optional[str]:
    """An interpreter that imports SINGA: this one, else ``singa_python``."""
    for python in filter(None, (sys.executable, singa_python)):
        check = subprocess.run(
            [python, "-c", "from peftcore_singa.compat import import_singa; import_singa()"],
            capture_output=True, check=False, timeout=300,
        )
        if check.returncode == 0:
            return python
    return None


def run(settings: Settings, singa_python: Optional[str]) -> Result:
    result = Result(key="singa_start", title=TITLE, unit="s", target_text="< import torch; torch not imported")
    python = _singa_python(singa_python)
    if python is None:
        result.note = "SINGA is not importable here; pass --singa-python with an interpreter that has it"
        return result
    rounds = settings.rounds(full=7, quick=3)
    wraps: List[Dict[str, Any]] = []
    torch_imports: List[float] = []
    try:
        for i in range(rounds):
            progress(f"round {i + 1}/{rounds}")
            wraps.append(_child(python, _WRAP))
            torch_imports.append(float(_child(python, _IMPORT_TORCH)["seconds"]))
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        result.note = str(exc).replace("\n", " ")[:300]
        return result
    torch_loaded = any(w["torch"] for w in wraps)
    result.peftcore = median([float(w["seconds"]) for w in wraps])
    result.reference = median(torch_imports)
    result.reference_name = "import torch"
    result.ratio_target = 1.0
    result.other_requirements_met = not torch_loaded and all(w["backend"] == "singa" for w in wraps)
    result.samples = {"peftcore": [float(w["seconds"]) for w in wraps], result.reference_name: torch_imports}
    result.note = f"torch imported by detection: {'yes' if torch_loaded else 'no'}; {rounds} fresh interpreters"
    return result
