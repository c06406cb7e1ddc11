"""Shared pieces of the benchmark harness: settings, A/B timing, results, the machine.

Timing runs every contender in the same process, one after the other, the order
rotated and reversed from round to round so that none always runs first, and reports
medians. On a CPU with one torch thread (the default here) the clock is the calling
thread's CPU time, which does not count time the thread spent waiting for a core that
other processes held; with more threads, or on CUDA, it is wall time (CUDA
synchronised before each reading).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

LIBRARIES = ("peftcore", "HF PEFT")


@dataclass(frozen=True)
class Settings:
    """What every measurement needs to know about this run."""

    device: str  # "cpu" or "cuda"
    threads: int
    quick: bool

    def rounds(self, full: int, quick: int) -> int:
        return quick if self.quick else full


class Clock:
    """Seconds, as described in the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.cuda = settings.device == "cuda"
        self.thread_time = not self.cuda and settings.threads == 1
        self.name = "thread CPU time" if self.thread_time else "wall time"

    def __call__(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.thread_time() if self.thread_time else time.perf_counter()


def alternate(
    runners: Dict[str, Callable[[], Any]], rounds: int, clock: Clock, warmup: int = 1, label: str = ""
) -> Dict[str, List[float]]:
    """Time each runner ``rounds`` times, interleaved; returns seconds per call by name."""
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        if round_index % 2:
            order = order[::-1]
        for name in order:
            start = clock()
            runners[name]()
            times[name].append(clock() - start)
        progress(f"{label} round {round_index + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    return times


def fix_allocation_placement() -> bool:
    """Make every model's large tensors land in memory the same way, so that no contender
    is faster only for having been built first. glibc raises its mmap threshold each
    time a large block is freed, so a model built after another gets its weights from the
    heap instead of fresh mmapped pages, and ran 2 to 5% slower here (the same weights,
    decoding; 11% in single runs): fixing the threshold at 32 MiB (glibc's largest dynamic value)
    removes that. The trim threshold is set as glibc's dynamic rule sets it, twice the
    mmap threshold: fixing one alone left trimming at its 128 KiB start, so that whichever
    contender's call ended with the most memory free at the heap's top handed it back and
    took it again, page by page, at its next call (15,000-51,000 page faults a 64-row
    ``generate``, landing on one contender or another by heap order). Returns whether it
    could (glibc on Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        # M_MMAP_THRESHOLD (which also stops the dynamic raise), then M_TRIM_THRESHOLD
        return bool(libc.mallopt(-3, 32 << 20)) and bool(libc.mallopt(-1, 64 << 20))
    except (OSError, AttributeError):
        return False


def median(values: List[float]) -> float:
    return float(statistics.median(values))


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Result:
    """One row of the table: peftcore and HF PEFT, optionally against a reference.

    ``lower_is_better`` rows state the target as a bound on ``ratio_target`` (peftcore
    over the reference, or over HF PEFT when there is no reference) or, for exact
    rows, on the value itself (``exact_target``). A row may also time, in the same
    rounds, the least work any adapter implementation adds to the reference, alone
    (``bound_name``, :mod:`adapter_floor`): :meth:`bound_ratio`, printed beside the
    verdict, is about the best a library doing that work could reach on this machine
    (measured, so as noisy as any ratio here).
    """

    key: str
    title: str
    unit: str
    peftcore: Optional[float] = None
    hf: Optional[float] = None
    reference: Optional[float] = None
    reference_name: str = ""
    ratio_target: Optional[float] = None
    exact_target: Optional[float] = None
    target_text: str = ""
    note: str = ""
    #: False when a requirement besides the ratio failed (the row is then NOT met)
    other_requirements_met: Optional[bool] = None
    samples: Dict[str, List[float]] = field(default_factory=dict)
    bound_name: str = ""

    def __post_init__(self) -> None:
        # ratio_of pairs rounds through the reference's samples, found by reference_name: a row
        # that keys them otherwise would fall back to a ratio of medians without a word
        timed = len(self.samples.get("peftcore", ())) > 1
        if timed and self.reference is not None and self.reference_name not in self.samples:
            raise ValueError(
                f"row {self.key!r}: the reference {self.reference_name!r} has no samples "
                f"(samples are keyed {sorted(self.samples)}); key them by the reference's name"
            )
        if timed and self.bound_name and (self.reference is None or self.bound_name not in self.samples):
            raise ValueError(f"row {self.key!r}: the bound {self.bound_name!r} needs a reference and its own samples")

    @property
    def skipped(self) -> bool:
        return self.peftcore is None

    def ratio(self, value: Optional[float]) -> Optional[float]:
        """``value`` over the reference (or HF PEFT), a ratio of medians."""
        base = self.reference if self.reference is not None else self.hf
        if value is None or base is None or base == 0:
            return None
        return value / base

    def ratio_of(self, contender: str) -> Optional[float]:
        """The contender's (``"peftcore"`` or ``"HF PEFT"``) ratio to the reference: the
        median of the per-round ratios where both were timed in the same rounds. The
        machine drifts between rounds by more than the differences measured (the same
        model timed under two names differs by up to 4% in medians), and a round's
        calls run back to back, so pairing them cancels the drift; else a ratio of medians."""
        value = self.peftcore if contender == "peftcore" else self.hf
        base_name = self.reference_name if self.reference is not None else "HF PEFT"
        ours, theirs = self.samples.get(contender), self.samples.get(base_name)
        if value is not None and ours and theirs and len(ours) == len(theirs) > 1 and all(theirs):
            return median([a / b for a, b in zip(ours, theirs)])
        return self.ratio(value)

    def bound_ratio(self) -> Optional[float]:
        """The reference plus the least adapter work (``bound_name``), over the reference:
        the median over rounds of ``(reference + work) / reference``. The work is timed
        alone, so the ratio carries the noise of a short call, not of a second
        whole-model call."""
        work, reference = self.samples.get(self.bound_name), self.samples.get(self.reference_name)
        if not self.bound_name or not work or not reference or len(work) != len(reference) or not all(reference):
            return None
        return median([(base + extra) / base for extra, base in zip(work, reference)])

    @property
    def met(self) -> Optional[bool]:
        if self.skipped:
            return None
        if self.other_requirements_met is False:
            return False
        if self.exact_target is not None:
            return self.peftcore == self.exact_target
        ratio = self.ratio_of("peftcore")
        if self.ratio_target is None or ratio is None:
            return None
        return ratio <= self.ratio_target

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["met"] = self.met
        return out


def _number(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    if unit == "max abs change":
        return "0" if value == 0 else f"{value:.1e}"
    if unit.startswith("MiB"):
        return f"{value:.1f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def markdown_table(results: List[Result]) -> str:
    """The results as one markdown table."""
    lines = [
        "| measurement | unit | peftcore | HF PEFT | reference | peftcore ratio | HF PEFT ratio | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.title} | {r.unit} | - | - | - | - | - | {r.target_text} | skipped: {r.note} |")
            continue
        against = r.reference_name if r.reference is not None else "HF PEFT"
        ours, theirs = r.ratio_of("peftcore"), r.ratio_of("HF PEFT") if r.reference is not None else None
        ref = f"{_number(r.reference, r.unit)} ({r.reference_name})" if r.reference is not None else "-"
        if r.exact_target is not None:
            ours = theirs = None  # a ratio of an exact quantity says nothing
        verdict = {True: "**met**", False: "**NOT met**", None: "-"}[r.met]
        bound = r.bound_ratio()
        least = f"{r.reference_name} + {r.bound_name}: {bound:.3f}x" if bound is not None else ""
        notes = [text for text in (least, r.note) if text]
        if notes:
            verdict += f" ({'; '.join(notes)})"
        lines.append(
            f"| {r.title} | {r.unit} | {_number(r.peftcore, r.unit)} | {_number(r.hf, r.unit)} | {ref} | "
            f"{f'{ours:.3f}x {against}' if ours is not None else '-'} | "
            f"{f'{theirs:.3f}x {against}' if theirs is not None else '-'} | {r.target_text} | {verdict} |"
        )
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception as exc:  # a missing library is reported, not fatal
        return f"not importable ({type(exc).__name__})"


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (how busy the machine was), where known."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine(settings: Settings, clock: Clock) -> Dict[str, Any]:
    """What produced the numbers."""
    info: Dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": settings.threads,
        "device": settings.device,
        "clock": clock.name,
        "quick": settings.quick,
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "load_average_end": load_average(),
        "python": platform.python_version(),
    }
    for module in ("torch", "transformers", "peft", "peftcore"):
        info[module] = _version(module)
    if settings.device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_text(info: Dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (
        f"{info['date']}; CPU {info['cpu']} ({info['cpu_cores']} cores){gpu}; device {info['device']}, "
        f"{info['torch_threads']} torch thread(s), clock: {info['clock']}{' (--quick)' if info['quick'] else ''}; "
        f"{info['os']}; load average (1/5/15 min) at start {info.get('load_average_start')}, "
        f"at end {info.get('load_average_end')}; python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}, peft {info['peft']}, peftcore {info['peftcore']}; "
        f"glibc mmap and trim thresholds fixed: {info.get('allocation_placement_fixed')}; ratios: median of per-round ratios"
    )
