"""Follow-up runs that test an explanation where a paper's claim does not hold here.

    python benchmarks/quality/ablate.py            # the runs below, resumable (ablations.jsonl)
    python benchmarks/quality/ablate.py --report   # their table, as markdown

Each run is the main protocol's (``run.py``: same data, K, step budget, batch, Trainer
setup) with one thing changed; the comparison rows come from the main results file.
The findings are written up by hand in ``analysis.md``, which the report includes.

- ``unipelt_lora_only`` (UniPELT with only its gated LoRA) against ``lora``: UniPELT's
  gate replaces LoRA's ``alpha / r`` scaling (2 here) by a sigmoid near 0.5 at the start,
  as in UniPELT's reference code, so its LoRA part moves about four times less per step.
- ``lora_alpha_4`` (LoRA with ``alpha / r = 0.5``): plain LoRA at the gate's scale.
- ``bitfit`` at a learning rate above its grid (2e-2): whether BitFit's gap to full
  fine-tuning is the grid's edge (5e-3, its largest rate, won the selection).
- ``residual_ln_scale_one``: residual prompt tuning whose layer norm starts at scale 1
  (a standard LayerNorm, as the paper's code) instead of peftcore's 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks.quality`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality import data  # noqa: E402
from benchmarks.quality.methods import DEFAULT_PROMPT_LENGTH, METHODS, method_spec  # noqa: E402
from benchmarks.quality.results import ResultStore, run_records  # noqa: E402
from benchmarks.quality.run import FULL, PlannedRun  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "ablations.jsonl"
K = 500

#: (method, learning rate): the runs, each with the main protocol's seeds at K.
PLAN = (("unipelt_lora_only", 2e-3), ("lora_alpha_4", 2e-3), ("bitfit", 2e-2), ("residual_ln_scale_one", 3e-2))
#: Rows from the main results to compare with: (method, learning rate or None for its selected one).
COMPARE = (("lora", None), ("unipelt", None), ("adapter", None), ("prefix_tuning", None), ("bitfit", None),
           ("full", None), ("prompt_tuning", None), ("residual_prompt_tuning", None))


def planned() -> list[PlannedRun]:
    return [
        PlannedRun(name, K, seed, lr, DEFAULT_PROMPT_LENGTH if method_spec(name).uses_prompt_length else None, FULL.steps[K])
        for name, lr in PLAN
        for seed in FULL.seeds
    ]


def table(main_runs: Sequence[dict[str, Any]], ablation_runs: Sequence[dict[str, Any]]) -> str:
    """Test accuracy (mean ± std over seeds) of the ablations beside the main runs they explain."""
    from benchmarks.quality.report import select_lr

    rows = ["| run | learning rate | test accuracy at K=500, % (mean ± std, n) |", "|---|---|---|"]

    def row(label: str, lr: float, runs: Sequence[dict[str, Any]]) -> None:
        values = [100 * r["test_accuracy"] for r in runs if r.get("test_accuracy") is not None]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append(f"| {label} | {lr:g} | {statistics.fmean(values):.1f} ± {std:.1f} (n={len(values)}) |")

    for name, lr in COMPARE:
        chosen = lr if lr is not None else select_lr(main_runs, name, K)
        if chosen is not None:
            length = DEFAULT_PROMPT_LENGTH if METHODS[name].uses_prompt_length else None
            runs = [r for r in main_runs if r["method"] == name and r["k"] == K and r["lr"] == chosen
                    and r.get("prompt_length") == length]
            row(f"{METHODS[name].label} (main run)", chosen, runs)
    for name, lr in PLAN:
        runs = [r for r in ablation_runs if r["method"] == name and r["lr"] == lr]
        row(f"{method_spec(name).label} (ablation)", lr, runs)
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--report", action="store_true", help="print the table of the runs done")
    args = parser.parse_args(argv)
    store = ResultStore(RESULTS)
    if args.report:
        main_runs = run_records(ResultStore(HERE / "results.jsonl").records)
        print(table(main_runs, run_records(store.records)))
        return 0
    from dataclasses import asdict

    from tqdm import tqdm

    from benchmarks.quality import train

    splits = data.load_splits()
    encoded = {"test": train.encode(splits.test[:FULL.test_size])}
    todo = [run for run in planned() if store.get(run.key) is None]
    for run in tqdm(todo, desc="ablations", unit="run"):
        record = train.job_record({**asdict(run), "eval_held_out": False, "eval_test": True}, splits, encoded)
        store.add(record)
        tqdm.write(f"{run.method:20} seed={run.seed} lr={run.lr:g} test {100 * record['test_accuracy']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
