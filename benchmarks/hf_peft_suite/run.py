"""Run Hugging Face PEFT's own test files (``test_custom_models.py`` and the model-level
``test_decoder_models.py``, ``test_encoder_decoder_models.py``,
``test_feature_extraction_models.py``, ``test_seq_classifier.py``, ``test_config.py``)
against HF PEFT and against peftcore (through the name-mapping ``peft`` module of
:mod:`shim`), on the cases of the methods peftcore claims (:mod:`select_cases`), and
print the two pass rates side by side.

    python benchmarks/hf_peft_suite/run.py PEFT_CHECKOUT [--files F ...] [--only peftcore] [-k EXPR]

``PEFT_CHECKOUT`` is a local copy of HF PEFT's repository (its ``tests/`` folder is used;
nothing of it is copied into this project). Hub models are replaced by tiny local ones
(:mod:`local_models`, built once). The baseline (HF) run selects the cases; the peftcore
run runs exactly those. Results go to ``results.json`` next to this script (per case:
outcome for each library, and the first error line), and a summary by file and by test
function to stdout. Needs HF PEFT installed for the baseline run.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.hf_peft_suite import local_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
IMPLEMENTATIONS = ("hf", "peftcore")


FILES = (
    "test_custom_models.py", "test_decoder_models.py", "test_encoder_decoder_models.py",
    "test_feature_extraction_models.py", "test_seq_classifier.py", "test_config.py",
)


def run_suite(
    checkout: Path, implementation: str, files: Sequence[str], extra: Sequence[str], timeout: int,
    selection: Path, models: Path,
) -> dict[str, dict[str, str]]:
    """``{case id: {"outcome": passed|failed|skipped|error, "message": ...}}`` of one run.
    The HF run writes the ids it selects to ``selection``; the peftcore run reads them."""
    with tempfile.TemporaryDirectory(prefix="hf-peft-suite-") as scratch:
        report = Path(scratch) / "junit.xml"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        env.setdefault("HF_HUB_OFFLINE", "1")
        chosen = f"--write-selection={selection}" if implementation == "hf" else f"--read-selection={selection}"
        command = [
            sys.executable, "-m", "pytest", *(f"tests/{name}" for name in files), "-p", "benchmarks.hf_peft_suite.plugin",
            f"--peft-impl={implementation}", chosen, f"--local-models={models}", "-o", "addopts=", "-p",
            "no:cacheprovider", "-q", f"--junitxml={report}", "--tb=line", "-W", "ignore::DeprecationWarning", *extra,
        ]
        subprocess.run(command, cwd=checkout, env=env, timeout=timeout, stdout=subprocess.DEVNULL, check=False)
        if not report.exists():
            raise SystemExit(f"the {implementation} run wrote no report; run by hand: {' '.join(command)}")
        return read_junit(report)


def case_name(classname: str, name: str) -> str:
    """``file.py::Class::test[params]`` from a JUnit ``classname`` (``tests.test_x.Class``)."""
    parts = classname.split(".")
    module = next((i for i, part in enumerate(parts) if part.startswith("test_")), len(parts) - 1)
    return "::".join([f"{parts[module]}.py", *parts[module + 1 :], name])


def read_junit(path: Path) -> dict[str, dict[str, str]]:
    cases: dict[str, dict[str, str]] = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = case_name(case.get("classname", ""), case.get("name") or "")
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


def file_of(case: str) -> str:
    return case.split("::", 1)[0]


def summarise(results: dict[str, dict[str, dict[str, str]]]) -> str:
    cases = sorted(set().union(*(r.keys() for r in results.values())))
    lines = [f"{len(cases)} selected cases"]
    for implementation, found in results.items():
        counts = Counter(found.get(c, {"outcome": "missing"})["outcome"] for c in cases)
        lines.append(f"  {implementation:9} passed {counts['passed']:5} ({100 * counts['passed'] / max(1, len(cases)):.1f}%)"
                     f"  failed {counts['failed']}  error {counts['error']}  skipped {counts['skipped']}")
    if "hf" in results and "peftcore" in results:
        hf_passed = [c for c in cases if results["hf"].get(c, {}).get("outcome") == "passed"]
        both = [c for c in hf_passed if results["peftcore"].get(c, {}).get("outcome") == "passed"]
        lines.append(f"\npeftcore passes {len(both)} of the {len(hf_passed)} cases HF PEFT passes "
                     f"({100 * len(both) / max(1, len(hf_passed)):.1f}%); by file:")
        for name in sorted({file_of(c) for c in cases}):
            mine = [c for c in hf_passed if file_of(c) == name]
            ours = [c for c in both if file_of(c) == name]
            lines.append(f"  {name:36} {len(ours):5} of {len(mine):5} ({100 * len(ours) / max(1, len(mine)):.1f}%)")
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
    parser.add_argument("--files", nargs="+", default=list(FILES), choices=FILES, help="which of HF's test files to run")
    parser.add_argument("--models", type=Path, default=None, help="folder for the tiny local models (built once)")
    parser.add_argument("--only", choices=IMPLEMENTATIONS, help="run one library only")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, to run part of the cases")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per library run")
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    args = parser.parse_args(argv)
    missing = [name for name in args.files if not (args.checkout / "tests" / name).is_file()]
    if missing:
        raise SystemExit(f"{args.checkout}/tests lacks {', '.join(missing)} (give HF PEFT's repository root)")
    extra = ["-k", args.keyword] if args.keyword else []
    previous = json.loads(args.results.read_text()) if args.results.exists() else {}
    models = args.models or local_models.default_root()
    local_models.prepare(models)  # once, before both runs: both load the same files
    results = {}
    with tempfile.TemporaryDirectory(prefix="hf-peft-selection-") as scratch:
        selection = Path(scratch) / "selection.json"
        if args.only == "peftcore":  # the cases of the last HF run
            selection.write_text(json.dumps(sorted(previous.get("hf", {}))))
        for implementation in IMPLEMENTATIONS:
            if args.only in (None, implementation):
                results[implementation] = run_suite(
                    args.checkout, implementation, args.files, extra, args.timeout, selection, models
                )
            elif implementation in previous and not args.keyword:
                results[implementation] = previous[implementation]
    if not args.keyword:
        args.results.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(summarise(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
