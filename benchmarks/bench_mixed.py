"""Measurement 3: mixed-adapter batch inference. 8 LoRA adapters on the GPT-2-shaped model,
a batch of 32 x 128 tokens whose row i names adapter ``i % 8``: peftcore vs HF PEFT
(both ``model(input_ids, adapter_names=[...])``) vs the base model alone, under
``torch.no_grad()``. The two libraries hold identical adapter weights and their logits
are checked to agree.

Run on its own, this file compares ways of routing rows inside one LoRA layer on the
layer shapes of this model (see ``peftcore_torch.row_routing`` for which one peftcore
takes when): grouping rows by adapter (HF PEFT's way), stacking every row's A and B for
batched products, and folding each adapter into a temporary weight, on interleaved and
on sorted rows::

    python benchmarks/bench_mixed.py
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

from harness import Clock, Result, Settings, alternate, median
from models import RANK, add_peftcore_adapter, fill_adapters, gpt2_model, hf_config, token_batch, with_hf, with_peftcore

ADAPTERS = 8
BATCH = 32


def _adapter_names() -> List[str]:
    return [f"adapter{i}" for i in range(ADAPTERS)]


def build(device: str) -> Dict[str, Any]:
    """The base model and each library's model with the same 8 adapters."""
    names = _adapter_names()
    base = gpt2_model(device).eval()
    hf_model = with_hf(copy.deepcopy(base), adapter_name=names[0], random_init=True)
    for name in names[1:]:
        hf_model.add_adapter(name, hf_config(random_init=True))
    ours = with_peftcore(copy.deepcopy(base), adapter_name=names[0], random_init=True)
    for name in names[1:]:
        add_peftcore_adapter(ours, name)
    for model in (hf_model, ours):
        fill_adapters(model)
        model.eval()
    return {"base": base, "HF PEFT": hf_model, "peftcore": ours}


def run(settings: Settings, clock: Clock) -> Result:
    import torch

    models = build(settings.device)
    ids = token_batch(BATCH, settings.device)
    rows = [_adapter_names()[i % ADAPTERS] for i in range(BATCH)]
    calls: Dict[str, Callable[[], Any]] = {
        "base model": lambda: models["base"](input_ids=ids).logits,
        "HF PEFT": lambda: models["HF PEFT"](input_ids=ids, adapter_names=rows).logits,
        "peftcore": lambda: models["peftcore"](input_ids=ids, adapter_names=rows).logits,
    }
    with torch.no_grad():
        ours, theirs, base = calls["peftcore"](), calls["HF PEFT"](), calls["base model"]()
        note = ""
        if not torch.allclose(ours, theirs, atol=1e-3, rtol=1e-3):
            note = f"logits differ from HF PEFT's by {float((ours - theirs).abs().max()):.2e}"
        elif torch.allclose(ours, base):
            note = "adapters had no effect"
        del ours, theirs, base
        times = alternate(calls, settings.rounds(16, 4), clock, warmup=1, label="mixed batch")
    ms = {name: [1000.0 * t for t in values] for name, values in times.items()}
    return Result(
        key="mixed_batch",
        title=f"3. mixed-adapter inference, {ADAPTERS} adapters, batch {BATCH}x128",
        unit="ms/batch",
        peftcore=median(ms["peftcore"]),
        hf=median(ms["HF PEFT"]),
        reference=median(ms["base model"]),
        reference_name="base model",
        ratio_target=1.05,
        target_text="<= 1.05x base model",
        note=note,
        samples=ms,
    )


# -- routing strategies inside one layer (run this file) ------------------------------------
def _strategies(in_features: int, out_features: int, tokens: int) -> Dict[str, Callable[[], Any]]:
    import torch

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(in_features, out_features, generator=generator) * 0.02
    bias = torch.zeros(out_features)
    a = [torch.randn(RANK, in_features, generator=generator) for _ in range(ADAPTERS)]
    b = [torch.randn(out_features, RANK, generator=generator) for _ in range(ADAPTERS)]
    x = torch.randn(BATCH, tokens, in_features, generator=generator)
    row_adapter = torch.arange(BATCH) % ADAPTERS
    groups = [(row_adapter == i).nonzero().squeeze(1) for i in range(ADAPTERS)]

    def base() -> Any:
        return torch.addmm(bias, x.view(-1, in_features), weight).view(BATCH, tokens, out_features)

    def grouped() -> Any:
        out = base()
        for i, rows in enumerate(groups):
            hidden = x.index_select(0, rows) @ a[i].t() * 2.0
            out.index_add_(0, rows, hidden @ b[i].t())
        return out

    def stacked() -> Any:
        out = base()
        a_rows, b_rows = torch.stack(a)[row_adapter], torch.stack(b)[row_adapter]
        hidden_t = torch.bmm(a_rows, x.transpose(1, 2)) * 2.0
        return out.baddbmm_(hidden_t.transpose(1, 2), b_rows.transpose(1, 2))

    def folded() -> Any:
        out = torch.empty(BATCH, tokens, out_features)
        for i, rows in enumerate(groups):
            folded_weight = torch.addmm(weight, a[i].t(), b[i].t(), alpha=2.0)
            product = torch.addmm(bias, x.index_select(0, rows).view(-1, in_features), folded_weight)
            out.index_copy_(0, rows, product.view(-1, tokens, out_features))
        return out

    per_adapter = BATCH // ADAPTERS

    def folded_sorted() -> Any:  # rows sorted by adapter: each run is one product into its rows
        out = torch.empty(BATCH, tokens, out_features)
        for i in range(ADAPTERS):
            run = slice(i * per_adapter, (i + 1) * per_adapter)
            folded_weight = torch.addmm(weight, a[i].t(), b[i].t(), alpha=2.0)
            torch.addmm(bias, x[run].reshape(-1, in_features), folded_weight, out=out[run].view(-1, out_features))
        return out

    return {"base layer": base, "grouped by adapter": grouped, "stacked (bmm)": stacked, "folded per adapter": folded,
            "folded, rows sorted": folded_sorted}


def compare_strategies(repeats: int = 15) -> str:
    import torch

    torch.set_num_threads(1)
    names = ["grouped by adapter", "stacked (bmm)", "folded per adapter", "folded, rows sorted"]
    lines = ["| layer (in -> out) | base layer ms | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for in_features, out_features in [(512, 1536), (512, 512), (512, 2048), (2048, 512)]:
        calls = _strategies(in_features, out_features, 128)
        with torch.no_grad():
            reference = calls["grouped by adapter"]()
            for name in names[1:3]:  # the sorted variant computes a differently ordered batch
                if not torch.allclose(reference, calls[name](), atol=1e-3, rtol=1e-3):
                    raise AssertionError(f"{name} disagrees with grouping")
            samples: Dict[str, List[float]] = {name: [] for name in calls}
            order = list(calls)
            for round_index in range(repeats):  # interleaved, order reversed every round
                for name in order if round_index % 2 == 0 else order[::-1]:
                    start = time.thread_time()
                    calls[name]()
                    samples[name].append(1000.0 * (time.thread_time() - start))
        ms = {name: statistics.median(values) for name, values in samples.items()}
        base = ms["base layer"]
        ratios = " | ".join(f"{ms[n] / base:.3f}x" for n in names)
        lines.append(f"| {in_features} -> {out_features} | {base:.2f} | {ratios} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"one LoRA layer, {ADAPTERS} adapters r={RANK}, batch {BATCH}x128, rows interleaved; "
          "1 thread, thread CPU time\n")
    print(compare_strategies())
    sys.exit(0)
