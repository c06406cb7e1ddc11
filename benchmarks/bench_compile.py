"""Measurement 11: the LoRA training step of measurement 1 under ``torch.compile``
(inductor, the default backend): peftcore vs HF PEFT vs the compiled frozen floor.

Each contender's model is wrapped in ``torch.compile`` and run once before timing, so
compilation is not timed (it is printed). The floor is measurement 1's: every weight
frozen, the backward through the activations only. Compiled and eager steps give the
same first loss (checked). Needs a C++ compiler for inductor's CPU kernels; without one
the row says so. A fourth contender runs the LoRA layers' own products alone
(:func:`adapter_floor.training_products`): the compiled floor plus them is about the least a
library composing LoRA from BLAS products can reach.
"""

from __future__ import annotations

import time
from typing import Callable, Dict

from adapter_floor import adapted_shapes, training_products
from bench_train import BATCH, CONTENDERS, TrainingStep
from harness import Clock, Result, Settings, alternate, median, progress
from models import SEQUENCE

TARGET = 1.05
BOUND = "the LoRA products alone"


def _compiled_step(contender: str, device: str) -> TrainingStep:
    import torch

    step = TrainingStep(contender, device)
    step.model = torch.compile(step.model)
    started = time.perf_counter()
    step()
    progress(f"compiled train step: {contender} compiled and ran once in {time.perf_counter() - started:.0f} s")
    return step


def run(settings: Settings, clock: Clock) -> Result:
    import torch

    title = f"11. LoRA training step under torch.compile (inductor), batch {BATCH}x128"
    torch._dynamo.reset()  # no graphs left from an earlier measurement (row 12 compiles the same forwards)
    try:
        steps: Dict[str, TrainingStep] = {name: _compiled_step(name, settings.device) for name in CONTENDERS}
    except Exception as exc:  # inductor needs a working C++ toolchain on CPU
        return Result(key="compiled_train_step", title=title, unit="ms/step", note=f"torch.compile failed: {exc!r}"[:300])
    first_losses = {name: step.last_loss for name, step in steps.items()}
    runners: Dict[str, Callable[[], None]] = dict(steps.items())  # type: ignore[arg-type]
    runners[BOUND] = training_products(adapted_shapes(steps["floor"].model), BATCH * SEQUENCE, settings.device)
    times = alternate(runners, settings.rounds(12, 4), clock, warmup=1, label="compiled train step")
    note = ""
    if max(first_losses.values()) - min(first_losses.values()) > 1e-4:
        note = f"first-step losses differ: {first_losses}"
    ms = {name: [1000.0 * t for t in values] for name, values in times.items()}
    ms["compiled floor"] = ms.pop("floor")  # keyed by the reference's name, as the table pairs rounds by it
    return Result(
        key="compiled_train_step",
        title=title,
        unit="ms/step",
        peftcore=median(ms["peftcore"]),
        hf=median(ms["HF PEFT"]),
        reference=median(ms["compiled floor"]),
        reference_name="compiled floor",
        ratio_target=TARGET,
        target_text=f"<= {TARGET:.2f}x compiled floor",
        note=note,
        samples=ms,
        bound_name=BOUND,
    )
