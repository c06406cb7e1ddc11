"""Measurement 7: many distinct adapters in one batch. The GPT-2-shaped model holds N LoRA
adapters (N = 1, 8, 32, 64, 256; identical in both libraries); a batch of 64 rows names
them round-robin (so min(N, 64) distinct adapters per batch). Each N is timed for a forward
of 64 x 16 tokens and for ``generate(adapter_names=...)`` of 8 new tokens after 8, peftcore
vs HF PEFT vs the base model, under ``torch.no_grad()``. S-LoRA and Punica show the cost
need not grow with N; the goal is at most 1.10x the base model at every N.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List

from harness import Clock, Result, Settings, alternate, median, progress
from models import add_peftcore_adapter, fill_adapters, gpt2_model, hf_config, token_batch, with_hf, with_peftcore

ROWS = 64
COUNTS = (1, 8, 32, 64, 256)
TARGET = 1.10


def _models(base: Any, count: int) -> Dict[str, Any]:
    names = [f"adapter{i}" for i in range(count)]
    theirs = with_hf(copy.deepcopy(base), adapter_name=names[0], random_init=True)
    ours = with_peftcore(copy.deepcopy(base), adapter_name=names[0], random_init=True)
    for name in names[1:]:
        theirs.add_adapter(name, hf_config(random_init=True))
        add_peftcore_adapter(ours, name)
    for model in (theirs, ours):
        fill_adapters(model)
        model.eval()
    return {"base model": base, "peftcore": ours, "HF PEFT": theirs}


def _forward(model: Any, ids: Any, rows: Any) -> Callable[[], Any]:
    kwargs = {} if rows is None else {"adapter_names": rows}
    return lambda: model(input_ids=ids[:, :16], **kwargs).logits


def _generate(model: Any, ids: Any, rows: Any) -> Callable[[], Any]:
    import torch

    prompt = ids[:, :8]
    kwargs = {} if rows is None else {"adapter_names": rows}
    return lambda: model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8,
        do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs,
    )


def run(settings: Settings, clock: Clock) -> List[Result]:
    import torch

    base = gpt2_model(settings.device).eval()
    ids = token_batch(ROWS, settings.device)
    results: List[Result] = []
    for count in COUNTS[:3] if settings.quick else COUNTS:
        progress(f"many adapters: building {count} in each library")
        models = _models(base, count)
        rows = [f"adapter{row % count}" for row in range(ROWS)]
        for kind, make in (("forward 64x16", _forward), ("generate 64 rows, 8 tokens", _generate)):
            calls = {name: make(model, ids, None if name == "base model" else rows) for name, model in models.items()}
            with torch.no_grad():
                ours, theirs = calls["peftcore"](), calls["HF PEFT"]()
                same = torch.allclose(ours.float(), theirs.float(), atol=1e-3, rtol=1e-3)
                times = alternate(calls, settings.rounds(5, 2), clock, label=f"{count} adapters, {kind}")
            ms = {name: [1000.0 * t for t in values] for name, values in times.items()}
            results.append(Result(
                key=f"many_{count}_{kind.split()[0]}",
                title=f"7. mixed batch, {count} adapters, {kind}",
                unit="ms/call",
                peftcore=median(ms["peftcore"]),
                hf=median(ms["HF PEFT"]),
                reference=median(ms["base model"]),
                reference_name="base model",
                ratio_target=TARGET,
                target_text=f"<= {TARGET:.2f}x base model",
                note="" if same else "outputs differ from HF PEFT's",
                samples=ms,
            ))
    return results
