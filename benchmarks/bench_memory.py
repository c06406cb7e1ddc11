"""Measurement 5: peak memory of one training step (measurement 1's), peftcore vs HF PEFT.

Reported: the peak of tensor memory in use during a steady-state step (after two
warm-up steps, so AdamW's state already exists) above what was in use just before it:
activations kept for backward, gradients, temporaries.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
* CPU: torch's profiler with ``profile_memory=True`` records every allocation and free
  of the step; replaying them in time order (each operator's own allocations at its
  end) gives the peak. The allocation sequence is deterministic, so one step per
  contender is enough. (The process's resident-set high-water mark, reset just before
  the step through ``/proc/self/clear_refs``, agreed to 0.2 MiB when this was written.)
"""

from __future__ import annotations

import gc
from typing import Dict

from harness import Result, Settings, progress

CONTENDERS = ("floor", "HF PEFT", "peftcore")
MIB = 1024.0 * 1024.0


def _replayed_peak(prof: object) -> float:
    """Peak bytes above the start from a memory-profiled run's events."""
    changes = []
    for event in prof.events():  # type: ignore[attr-defined]
        if event.name == "[memory]":  # an allocation or free outside any operator
            changes.append((event.time_range.start, event.cpu_memory_usage))
        else:
            changes.append((event.time_range.end, event.self_cpu_memory_usage))
    changes.sort(key=lambda change: change[0])
    level = peak = 0
    for _, delta in changes:
        level += delta
        peak = max(peak, level)
    return float(peak)


def peak_mib(contender: str, device: str) -> float:
    """MiB above the pre-step level at the peak of one steady-state training step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_train import TrainingStep

    step = TrainingStep(contender, device)
    step()
    step()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MIB
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return _replayed_peak(prof) / MIB


def run(settings: Settings) -> Result:
    peaks: Dict[str, float] = {}
    for name in CONTENDERS:
        peaks[name] = peak_mib(name, settings.device)
        gc.collect()
    progress("peak memory: " + ", ".join(f"{n} {peaks[n]:.2f} MiB" for n in CONTENDERS))
    return Result(
        key="peak_memory",
        title="5. peak memory of a training step",
        unit="MiB above pre-step",
        peftcore=peaks["peftcore"],
        hf=peaks["HF PEFT"],
        ratio_target=1.0,
        target_text="<= HF PEFT",
        note=f"floor {peaks['floor']:.1f} MiB",
        samples={name: [value] for name, value in peaks.items()},
    )
