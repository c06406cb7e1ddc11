"""Measurement 6: unmerged greedy decoding. The GPT-2-shaped model with one LoRA adapter
(identical in both libraries) generates 32 new tokens greedily after a 16-token prompt,
with the key/value cache, at batch 1 and batch 8: peftcore vs HF PEFT vs the base model
alone. This is how an adapter is served without merging it (to switch adapters, or to
keep the base shared); each new token runs every adapter layer on one row, so the cost
is the adapter layers' per-call overhead, not their arithmetic.

The three contenders must produce the same tokens (checked before timing).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List

from harness import Clock, Result, Settings, alternate, median
from models import fill_adapters, gpt2_model, token_batch, with_hf, with_peftcore

PROMPT = 16
NEW_TOKENS = 32
TARGETS = {1: 1.05, 8: 1.03}


def build(device: str) -> Dict[str, Any]:
    base = gpt2_model(device).eval()
    ours = with_peftcore(copy.deepcopy(base), random_init=True).eval()
    theirs = with_hf(copy.deepcopy(base), random_init=True).eval()
    fill_adapters(ours)
    fill_adapters(theirs)
    return {"base model": base, "peftcore": ours, "HF PEFT": theirs}


def _greedy(model: Any, ids: Any) -> Callable[[], Any]:
    import torch

    mask = torch.ones_like(ids)

    def run() -> Any:
        with torch.no_grad():
            return model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                do_sample=False, eos_token_id=None, pad_token_id=0,
            )

    return run


def run(settings: Settings, clock: Clock) -> List[Result]:
    import torch

    models = build(settings.device)
    results = []
    for batch, target in TARGETS.items():
        ids = token_batch(batch, settings.device)[:, :PROMPT]
        calls = {name: _greedy(model, ids) for name, model in models.items()}
        ours, theirs, plain = calls["peftcore"](), calls["HF PEFT"](), calls["base model"]()
        note = ""
        if not torch.equal(ours, theirs):
            note = "tokens differ from HF PEFT's"
        elif torch.equal(ours, plain):
            note = "the adapter changed no token"
        times = alternate(calls, settings.rounds(15, 5), clock, warmup=1, label=f"decoding, batch {batch}")
        title = f"6. unmerged greedy decoding, batch {batch}, {NEW_TOKENS} new tokens"
        results.append(per_token_result(f"decode_batch{batch}", title, times, "base model", target, note))
    return results


def per_token_result(
    key: str, title: str, times: Dict[str, List[float]], reference_name: str, target: float, note: str
) -> Result:
    """A decoding row: each contender's seconds per call of ``NEW_TOKENS`` tokens, as
    milliseconds per token against the base model's (named ``reference_name``)."""
    ms = {name: [1000.0 * t / NEW_TOKENS for t in values] for name, values in times.items()}
    ms[reference_name] = ms.pop("base model")  # keyed by the reference's name, as the table pairs rounds by it
    return Result(
        key=key,
        title=title,
        unit="ms/token",
        peftcore=median(ms["peftcore"]),
        hf=median(ms["HF PEFT"]),
        reference=median(ms[reference_name]),
        reference_name=reference_name,
        ratio_target=target,
        target_text=f"<= {target:.2f}x {reference_name}",
        note=note,
        samples=ms,
    )
