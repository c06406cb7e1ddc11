"""Measurement 6: peftcore's SINGA LoRA vs SINGA's own PEFT example on the digits MLP.

The comparison itself is :mod:`singa_seed` (runnable on its own); this module calls its
``run`` when SINGA is importable here, or runs it with another interpreter that has
SINGA (``--singa-python``), and turns the result into one row of the table. Nothing of
SINGA's example is part of this repository: ``--singa-seed-dir`` points at a checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any, Dict, List, Optional

from harness import Result, Settings, progress

TITLE = "6. SINGA LoRA, digits MLP, vs SINGA's PEFT example"
MARKER = "SINGA-ROWS:"
HERE = os.path.dirname(os.path.abspath(__file__))


def _singa_here() -> Optional[str]:
    """None when SINGA imports in this interpreter, else why not."""
    try:
        from peftcore_singa.compat import import_singa

        import_singa()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _rows_in_process(seed_dir: str, epochs: int, rounds: int) -> List[Dict[str, Any]]:
    import singa_seed

    return list(singa_seed.run(seed_dir, epochs=epochs, quiet=True, rounds=rounds))


def _rows_in_child(python: str, seed_dir: str, epochs: int, rounds: int) -> List[Dict[str, Any]]:
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import singa_seed\n"
        f"rows = singa_seed.run({seed_dir!r}, epochs={epochs}, quiet=True, rounds={rounds})\n"
        f"print({MARKER!r} + json.dumps(rows))\n"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{python} could not run singa_seed: {done.stderr.strip()[-600:]}")
    return list(json.loads(lines[-1][len(MARKER):]))


def run(settings: Settings, seed_dir: Optional[str], singa_python: Optional[str]) -> Result:
    skipped = Result(key="singa", title=TITLE, unit="ms/step", target_text="accuracy >= example's, time <= example's")
    if not seed_dir:
        skipped.note = "no --singa-seed-dir (a checkout of SINGA's examples/singa_peft)"
        return skipped
    if not os.path.isfile(os.path.join(HERE, "singa_seed.py")):
        skipped.note = "benchmarks/singa_seed.py is missing"
        return skipped
    epochs, rounds = (2, 1) if settings.quick else (5, 3)
    why_not = _singa_here()
    try:
        if why_not is None:
            rows = _rows_in_process(seed_dir, epochs, rounds)
        elif singa_python:
            progress(f"SINGA not importable here ({why_not}); running singa_seed with {singa_python}")
            rows = _rows_in_child(singa_python, seed_dir, epochs, rounds)
        else:
            skipped.note = f"SINGA is not importable ({why_not}); pass --singa-python with an interpreter that has it"
            return skipped
    except (FileNotFoundError, RuntimeError) as exc:
        skipped.note = str(exc).replace("\n", " ")[:300]
        return skipped
    by_name = {row["name"]: row for row in rows}
    seed_row, ours = rows[0], by_name.get("peftcore")
    if ours is None:
        skipped.note = f"singa_seed returned no peftcore row (rows: {list(by_name)})"
        return skipped
    accurate = ours["accuracy"] >= seed_row["accuracy"]
    return Result(
        key="singa",
        title=TITLE,
        unit="ms/step",
        peftcore=float(ours["ms_per_step"]),
        reference=float(seed_row["ms_per_step"]),
        reference_name="SINGA example",
        ratio_target=1.0,
        target_text="accuracy >= example's, time <= example's",
        other_requirements_met=accurate,
        note=f"test accuracy peftcore {ours['accuracy']:.3f} vs example {seed_row['accuracy']:.3f}; {epochs} epochs",
    )
