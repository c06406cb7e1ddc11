"""Run Hugging Face PEFT's own ``tests/test_custom_models.py`` against HF PEFT and against
peftcore (through the name-mapping ``peft`` module of :mod:`shim`), on the cases of the
methods peftcore claims (:mod:`select_cases`), and print the two pass rates side by side.

    python benchmarks/hf_peft_suite/run.py PEFT_CHECKOUT [--only peftcore] [-k EXPR]

``PEFT_CHECKOUT`` is a local copy of HF PEFT's repository (its ``tests/`` folder is used;
nothing of it is copied into this project). Results go to ``results.json`` next to this
script (per case: outcome for each library, and peftcore's first error line), and a
summary table by test function to stdout. Needs HF PEFT installed for the baseline run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
IMPLEMENTATIONS = ("hf", "peftcore")


def run_suite(checkout: Path, implementation: str, extra: Sequence[str], timeout: int) -> dict[str, dict[str, str]]:
    """``{case id: {"outcome": passed|failed|skipped|error, "message": ...}}`` of one run."""
    with tempfile.TemporaryDirectory(prefix="hf-peft-suite-") as scratch:
        report = Path(scratch) / "junit.xml"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        env.setdefault("HF_HUB_OFFLINE", "1")
        command = [
            sys.executable, "-m", "pytest", "tests/test_custom_models.py", "-p", "benchmarks.hf_peft_suite.plugin",
            f"--peft-impl={implementation}", "-o", "addopts=", "-p", "no:cacheprovider", "-q",
            f"--junitxml={report}", "--tb=line", "-W", "ignore::DeprecationWarning", *extra,
        ]
        subprocess.run(command, cwd=checkout, env=env, timeout=timeout, stdout=subprocess.DEVNULL, check=False)
        if not report.exists():
            raise SystemExit(f"the {implementation} run wrote no report; run by hand: {' '.join(command)}")
        return read_junit(report)


def read_junit(path: Path) -> dict[str, dict[str, str]]:
    cases: dict[str, dict[str, str]] = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or "").strip().splitlines()[0][:300] if child.get("message") else ""
                break
        cases[name] = {"outcome": outcome, "message": message}
    return cases


def function_of(case: str) -> str:
    return case.split("[", 1)[0]


def summarise(results: dict[str, dict[str, dict[str, str]]]) -> str:
    cases = sorted(set().union(*(r.keys() for r in results.values())))
    lines = [f"{len(cases)} selected cases"]
    for implementation, found in results.items():
        counts = Counter(found.get(c, {"outcome": "missing"})["outcome"] for c in cases)
        lines.append(f"  {implementation:9} passed {counts['passed']:5} ({100 * counts['passed'] / max(1, len(cases)):.1f}%)"
                     f"  failed {counts['failed']}  error {counts['error']}  skipped {counts['skipped']}")
    if "peftcore" in results:
        by_function: dict[str, Counter] = defaultdict(Counter)
        for case in cases:
            outcome = results["peftcore"].get(case, {"outcome": "missing"})["outcome"]
            by_function[function_of(case)][outcome] += 1
        lines.append("\npeftcore, by test function: failed (and skipped) of all cases, most failures first:")
        for function, counts in sorted(by_function.items(), key=lambda kv: -kv[1]["failed"] - kv[1]["error"]):
            failed = counts["failed"] + counts["error"]
            if failed:
                lines.append(f"  {failed:4} ({counts['skipped']}) /{sum(counts.values()):<4} {function}")
        messages = Counter(r["message"] for r in results["peftcore"].values() if r["outcome"] in ("failed", "error"))
        lines.append("\npeftcore's most common failure messages:")
        lines.extend(f"  {count:4}  {message[:200]}" for message, count in messages.most_common(25))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a local copy of HF PEFT's repository")
    parser.add_argument("--only", choices=IMPLEMENTATIONS, help="run one library only")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, to run part of the cases")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per library run")
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    args = parser.parse_args(argv)
    if not (args.checkout / "tests" / "test_custom_models.py").is_file():
        raise SystemExit(f"{args.checkout} has no tests/test_custom_models.py (give HF PEFT's repository root)")
    extra = ["-k", args.keyword] if args.keyword else []
    previous = json.loads(args.results.read_text()) if args.results.exists() else {}
    results = {}
    for implementation in IMPLEMENTATIONS:
        if args.only in (None, implementation):
            results[implementation] = run_suite(args.checkout, implementation, extra, args.timeout)
        elif implementation in previous and not args.keyword:
            results[implementation] = previous[implementation]
    if not args.keyword:
        args.results.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(summarise(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
