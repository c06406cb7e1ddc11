"""Measurement 12: greedy decoding under ``torch.compile`` (inductor). Measurement 6's
models (GPT-2 shape, one unmerged LoRA adapter, identical in both libraries) are each
wrapped in ``torch.compile(dynamic=True)`` and step through 32 new tokens after a 16-token
prompt with the key/value cache, at batch 1 and 8: peftcore vs HF PEFT vs the compiled
base model.

transformers' ``generate`` compiles its steps by itself only with a compilable (static)
cache, and only on an accelerator unless its compile config says otherwise; so each
contender runs the same loop ``generate`` runs per step: call the model on the last
token with the cache, take the argmax. ``dynamic=True`` traces the cache's length as a
symbol, so a few graphs per batch size serve every step (a batch of 1 is specialised;
compilation is not timed, it is printed). Dynamo's caches are reset first: row 11
compiles the same forwards, and its graphs would count towards the limit of graphs per
function, past which dynamo runs a function eagerly. The three compiled contenders must
produce their eager tokens, and peftcore HF PEFT's (checked).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List

from bench_decode import NEW_TOKENS, PROMPT, TARGETS, build, per_token_result
from harness import Clock, Result, Settings, alternate, progress
from models import token_batch
from peftcore_torch.prompt_inputs import CACHE_NAMES


def greedy_tokens(model: Any, ids: Any) -> Any:
    """The ``NEW_TOKENS`` tokens greedy decoding gives after ``ids``, stepping ``model``
    with its key/value cache as ``generate`` does."""
    import torch

    tokens, step_ids, cache = [], ids, None
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            # the cache goes back under the name the output carries (transformers renamed it in 5.x)
            cache_kwargs = {} if cache is None else {cache[0]: cache[1]}
            out = model(input_ids=step_ids, use_cache=True, **cache_kwargs)
            name = next(name for name in CACHE_NAMES if name in out)
            cache = (name, out[name])
            step_ids = out["logits"][:, -1:].argmax(-1)
            tokens.append(step_ids)
    return torch.cat(tokens, dim=1)


def run(settings: Settings, clock: Clock) -> List[Result]:
    import torch

    torch._dynamo.reset()  # no graphs left from an earlier measurement (row 11 compiles the same forwards)
    eager = build(settings.device)
    compiled: Dict[str, Any] = {}
    batches = {batch: token_batch(batch, settings.device)[:, :PROMPT] for batch in TARGETS}
    expected = {(name, batch): greedy_tokens(model, ids) for name, model in eager.items() for batch, ids in batches.items()}
    title = "12. greedy decoding under torch.compile (inductor)"
    try:
        for name, model in eager.items():
            compiled[name] = torch.compile(model, dynamic=True)
            started = time.perf_counter()
            for ids in batches.values():
                greedy_tokens(compiled[name], ids)
            progress(f"compiled decoding: {name} compiled and ran in {time.perf_counter() - started:.0f} s")
    except Exception as exc:  # inductor needs a working C++ toolchain on CPU
        return [Result(key="compiled_decode", title=title, unit="ms/token", note=f"torch.compile failed: {exc!r}"[:300])]
    results = []
    for batch, target in TARGETS.items():
        ids = batches[batch]
        calls: Dict[str, Callable[[], Any]] = {
            name: (lambda model=model, ids=ids: greedy_tokens(model, ids)) for name, model in compiled.items()
        }
        differing = [name for name, call in calls.items() if not torch.equal(call(), expected[name, batch])]
        note = f"compiled tokens differ from eager ones: {', '.join(differing)}" if differing else ""
        if not torch.equal(expected["peftcore", batch], expected["HF PEFT", batch]):
            note = "; ".join(filter(None, [note, "tokens differ from HF PEFT's"]))
        times = alternate(calls, settings.rounds(15, 5), clock, warmup=1, label=f"compiled decoding, batch {batch}")
        row_title = f"{title}, batch {batch}, {NEW_TOKENS} new tokens"
        results.append(per_token_result(f"compiled_decode_batch{batch}", row_title, times, "compiled base model", target, note))
    return results
