"""Measurement 7: many distinct adapters in one batch. The GPT-2-shaped model holds N LoRA
adapters (N = 1, 8, 32, 64, 256; identical in both libraries); a batch of 64 rows names
them round-robin (so min(N, 64) distinct adapters per batch). Each N is timed for a forward
of 64 x 16 tokens and for ``generate(adapter_names=...)`` of 8 new tokens after 8, peftcore
vs HF PEFT vs the base model, under ``torch.no_grad()``. S-LoRA and Punica show the cost
need not grow with N; the goal is at most 1.10x the base model at every N. A fourth
contender runs, alone, the least adapter work a call needs: in every forward pass, each
distinct adapter folded into a weight or its factors read once and applied to its rows,
already grouped, whichever is cheaper (:func:`adapter_floor.mixed_batch_work`).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List

from adapter_floor import adapted_shapes, mixed_batch_work
from harness import Clock, Result, Settings, alternate, median, progress
from models import add_peftcore_adapter, fill_adapters, gpt2_model, hf_config, token_batch, with_hf, with_peftcore

ROWS = 64
COUNTS = (1, 8, 32, 64, 256)
FORWARD_TOKENS = 16
PROMPT = 8
NEW_TOKENS = 8
TARGET = 1.10
BOUND = "each adapter applied once a pass, folded or by products, alone"


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
    return lambda: model(input_ids=ids[:, :FORWARD_TOKENS], **kwargs).logits


def _generate(model: Any, ids: Any, rows: Any) -> Callable[[], Any]:
    import torch

    prompt = ids[:, :PROMPT]
    kwargs = {} if rows is None else {"adapter_names": rows}
    return lambda: model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs,
    )


#: the tokens of each forward pass a call makes: one pass, or the prompt's and then one per new token
CALL_TOKENS = {_forward: [ROWS * FORWARD_TOKENS], _generate: [ROWS * PROMPT] + [ROWS] * (NEW_TOKENS - 1)}


def run(settings: Settings, clock: Clock) -> List[Result]:
    import torch

    base = gpt2_model(settings.device).eval()
    ids = token_batch(ROWS, settings.device)
    shapes = adapted_shapes(base)
    results: List[Result] = []
    for count in COUNTS[:3] if settings.quick else COUNTS:
        progress(f"many adapters: building {count} in each library")
        models = _models(base, count)
        rows = [f"adapter{row % count}" for row in range(ROWS)]
        for kind, make in (("forward 64x16", _forward), ("generate 64 rows, 8 tokens", _generate)):
            calls = {name: make(model, ids, None if name == "base model" else rows) for name, model in models.items()}
            calls[BOUND] = mixed_batch_work(shapes, min(count, ROWS), CALL_TOKENS[make], settings.device)
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
                bound_name=BOUND,
            ))
    return results
