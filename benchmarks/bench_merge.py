"""Measurement 4: merge then unmerge 100 times; the largest change left in any base weight.

The GPT-2-shaped model in float32 and in bfloat16, with the same non-zero LoRA adapter
in both libraries. HF PEFT unmerges by subtracting the update it added, so rounding
accumulates; peftcore keeps the original weight while merged and puts it back.
"""

from __future__ import annotations

from typing import Any, Dict, List

from harness import Result, Settings, progress
from models import fill_adapters, gpt2_model, with_hf, with_peftcore

CYCLES = 100


def _base_weights(model: Any) -> Dict[str, Any]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}


def drift(library: str, dtype: Any, device: str, cycles: int) -> float:
    """Largest absolute change in any base weight after ``cycles`` merge/unmerge rounds."""
    import torch

    model = gpt2_model(device, dtype=dtype)
    wrapped = with_peftcore(model, random_init=True) if library == "peftcore" else with_hf(model, random_init=True)
    fill_adapters(wrapped)
    before = _base_weights(wrapped)
    for _ in range(cycles):
        wrapped.merge_adapter()
        wrapped.unmerge_adapter()
    after = _base_weights(wrapped)
    with torch.no_grad():
        return max(float((after[name].float() - before[name].float()).abs().max()) for name in before)


def run(settings: Settings) -> List[Result]:
    import torch

    results = []
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        changes = {library: drift(library, dtype, settings.device, CYCLES) for library in ("peftcore", "HF PEFT")}
        progress(f"merge/unmerge x{CYCLES} {label}: " + ", ".join(f"{k} {v:.3e}" for k, v in changes.items()))
        results.append(
            Result(
                key=f"merge_drift_{label}",
                title=f"4. merge+unmerge x{CYCLES}, {label}: largest base-weight change",
                unit="max abs change",
                peftcore=changes["peftcore"],
                hf=changes["HF PEFT"],
                exact_target=0.0,
                target_text="exactly 0",
            )
        )
    return results
