"""Measurement 1: one LoRA training step (forward, backward, AdamW step) on the GPT-2-shaped
model, batch 8 x 128 tokens: peftcore vs HF PEFT vs the floor. Measurement 8 is the same
step with DoRA (``use_dora=True``) on both sides.

The floor is the same model with every weight frozen and the backward pass run through
the activations only (``enable_input_require_grads``): what any adapter method must pay
at least. All three are built from the same seed and compute the same loss (checked).
The LoRA row also times the LoRA layers' own products alone
(:func:`adapter_floor.training_products`): the floor plus them is about the least a
library composing LoRA from BLAS products can reach. Its goal is issue 27's, 1.05x the
floor (1.10x until 2026-12-08).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from adapter_floor import adapted_shapes, training_products
from harness import Clock, Result, Settings, alternate, median
from models import SEQUENCE, gpt2_model, token_batch, with_hf, with_peftcore

BATCH = 8
CONTENDERS = ("floor", "HF PEFT", "peftcore")
BOUND = "the LoRA products alone"


class TrainingStep:
    """A model, its optimizer and one batch; calling it runs one training step."""

    def __init__(self, contender: str, device: str, use_dora: bool = False) -> None:
        import torch

        model = gpt2_model(device)
        if contender == "floor":
            model.requires_grad_(False)
            model.enable_input_require_grads()
            wrapped: Any = model
        elif contender == "HF PEFT":
            wrapped = with_hf(model, use_dora=use_dora)
        else:
            wrapped = with_peftcore(model, use_dora=use_dora)
        model.train()
        self.model = wrapped
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in trainable)
        self.optimizer: Optional[Any] = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
        self.ids = token_batch(BATCH, device)
        self.last_loss = float("nan")

    def __call__(self) -> None:
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = float(loss.detach())


def run(settings: Settings, clock: Clock, use_dora: bool = False) -> Result:
    steps: Dict[str, TrainingStep] = {name: TrainingStep(name, settings.device, use_dora) for name in CONTENDERS}
    first_losses = {}
    for name, step in steps.items():
        step()
        first_losses[name] = step.last_loss
    runners: Dict[str, Callable[[], None]] = dict(steps.items())  # type: ignore[arg-type]
    if not use_dora:  # DoRA's least work is more than these products; its row has no bound
        runners[BOUND] = training_products(adapted_shapes(steps["floor"].model), BATCH * SEQUENCE, settings.device)
    times = alternate(runners, settings.rounds(15, 4), clock, warmup=1, label="train step")
    note = ""
    if max(first_losses.values()) - min(first_losses.values()) > 1e-4:
        note = f"first-step losses differ: {first_losses}"
    if steps["peftcore"].trainable != steps["HF PEFT"].trainable:
        note += f" trainable counts differ ({steps['peftcore'].trainable} vs {steps['HF PEFT'].trainable})"
    ms = {name: [1000.0 * t for t in values] for name, values in times.items()}
    key, title, target = (
        ("dora_train_step", f"8. DoRA training step, GPT-2 shape, batch {BATCH}x128", 1.30)
        if use_dora
        else ("train_step", f"1. LoRA training step, GPT-2 shape, batch {BATCH}x128", 1.05)
    )
    return Result(
        key=key,
        title=title,
        unit="ms/step",
        peftcore=median(ms["peftcore"]),
        hf=median(ms["HF PEFT"]),
        reference=median(ms["floor"]),
        reference_name="floor",
        ratio_target=target,
        target_text=f"<= {target:.2f}x floor",
        note=note.strip(),
        samples=ms,
        bound_name="" if use_dora else BOUND,
    )
