"""Measurement 2: LoRA injection into a Llama-7B-shaped model on the meta device, every
linear layer (``target_modules="all-linear"``), peftcore vs HF PEFT.

The work is :mod:`inject_llama` (still runnable on its own, with ``--profile``): each
round builds a fresh meta model per library (not timed) and times the injection only,
alternating which library goes first. Wall time: injection is Python-bound and short.
"""

from __future__ import annotations

from typing import Dict, List

from harness import Result, Settings, median, progress
from inject_llama import TARGET_RATIO, time_once

RANK = 8


def run(settings: Settings) -> Result:
    layers = 8 if settings.quick else 32
    rounds = settings.rounds(7, 3)
    names = ["peftcore", "HF PEFT"]
    for name in names:  # warm-up: first-use imports and plugin discovery are not measured
        time_once(name, 1, "all-linear", RANK)
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    counts: Dict[str, int] = {}
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            elapsed, counts[name] = time_once(name, layers, "all-linear", RANK)
            seconds[name].append(elapsed)
        progress(f"inject round {round_index + 1}/{rounds}: " + ", ".join(f"{n} {seconds[n][-1]:.3f}s" for n in names))
    note = "" if len(set(counts.values())) == 1 else f"trainable counts differ: {counts}"
    return Result(
        key="inject",
        title=f"2. inject LoRA, Llama-7B shape on meta ({layers} layers, all-linear)",
        unit="s",
        peftcore=median(seconds["peftcore"]),
        hf=median(seconds["HF PEFT"]),
        ratio_target=TARGET_RATIO,
        target_text=f"<= {TARGET_RATIO}x HF PEFT",
        note=note,
        samples=seconds,
    )
