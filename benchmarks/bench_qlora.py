"""Measurements 9 and 10: QLoRA, LoRA on a 4-bit base (bitsandbytes nf4, double
quantisation), on a Llama-shaped model of 125M parameters built locally (width 768, 12
layers, MLP 3072, vocabulary 8000; every decoder linear quantised, the embeddings and
the head kept in float32 as transformers keeps them). LoRA r=8, alpha=16 on all seven
projections of every layer; batch 1 x 64 tokens; AdamW.

* ``qlora_memory``: the peak of tensor memory during a steady-state training step
  (after two warm-up steps, so AdamW's state exists): what is resident before the step
  (weights with their quantisation scales, adapters, optimizer state) plus the step's
  own peak above that (:func:`bench_memory.peak_mib`'s replay of the profiler's
  allocations on a CPU, ``max_memory_allocated`` on CUDA). peftcore and HF PEFT on the
  4-bit base, against peftcore on the float32 base (and, in the note, bfloat16).
* ``qlora_step``: the training step's time, peftcore vs HF PEFT on the same 4-bit base.

The 4-bit base is quantised by hand (each ``nn.Linear`` replaced by a ``Linear4bit``) and
flagged ``is_loaded_in_4bit`` as transformers flags a model it loads in 4-bit, so HF PEFT
uses its bitsandbytes LoRA layers.
"""

from __future__ import annotations

import gc
import warnings
from typing import Any, Callable, Dict, List, Optional

from harness import Clock, Result, Settings, alternate, median, progress

HIDDEN, LAYERS, MLP, VOCAB, TOKENS = 768, 12, 3072, 8000, 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 8, 16
MIB = 1024.0 * 1024.0


def _llama(device: str, dtype: Any) -> Any:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=TOKENS, pad_token_id=0,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype)


def _quantise_4bit(model: Any, device: str) -> Any:
    import bitsandbytes as bnb
    import torch

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear or name == "lm_head":
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=torch.float32,
                compress_statistics=True, quant_type="nf4",
            )
            layer.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer
            )
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, layer.to(device))
    model.is_loaded_in_4bit = True
    return model


def base_model(variant: str, device: str) -> Any:
    """The frozen base: ``"4-bit"``, ``"float32"`` or ``"bfloat16"``."""
    import torch

    if variant == "4-bit":
        return _quantise_4bit(_llama(device, torch.float32), device)
    return _llama(device, torch.float32 if variant == "float32" else torch.bfloat16)


class QloraStep:
    """One library's LoRA on one base, its optimizer and one batch; a call is one step."""

    def __init__(self, library: str, variant: str, device: str) -> None:
        import torch

        base = base_model(variant, device)
        if library == "HF PEFT":
            import peft

            config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
            self.model = peft.get_peft_model(base, config)
        else:
            import peftcore

            config = peftcore.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
            self.model = peftcore.get_peft_model(base, config)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, VOCAB, (1, TOKENS), generator=generator).to(device)
        self.first_loss: Optional[float] = None

    def __call__(self) -> None:
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.first_loss is None:  # B = 0 at the start: both libraries compute the base model's loss
            self.first_loss = float(loss.detach())

    def resident_bytes(self) -> int:
        """Bytes of every distinct tensor storage the model and optimizer hold."""
        from peftcore_torch.quantised import quantised_kind, scale_tensors

        tensors: List[Any] = list(self.model.parameters()) + list(self.model.buffers())
        tensors += [t for p in self.model.parameters() if quantised_kind(p) for t in scale_tensors(p)]
        for state in self.optimizer.state.values():
            tensors += [t for t in state.values() if hasattr(t, "untyped_storage")]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


def _peak_mib(step: QloraStep, device: str) -> float:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_memory import _replayed_peak

    step()
    step()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / MIB
    resident = step.resident_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return (resident + _replayed_peak(prof)) / MIB


def _memory(settings: Settings) -> Result:
    contenders = {"peftcore": ("peftcore", "4-bit"), "HF PEFT": ("HF PEFT", "4-bit"), "float32": ("peftcore", "float32")}
    if not settings.quick:
        contenders["bfloat16"] = ("peftcore", "bfloat16")
    peaks: Dict[str, float] = {}
    for name, (library, variant) in contenders.items():
        peaks[name] = _peak_mib(QloraStep(library, variant, settings.device), settings.device)
        gc.collect()
        progress(f"qlora memory: {name} {peaks[name]:.0f} MiB")
    note = f"bfloat16 base {peaks['bfloat16']:.0f} MiB" if "bfloat16" in peaks else ""
    return Result(
        key="qlora_memory",
        title="9. QLoRA peak training memory, 125M Llama, 4-bit base",
        unit="MiB at peak",
        peftcore=peaks["peftcore"],
        hf=peaks["HF PEFT"],
        reference=peaks["float32"],
        reference_name="float32 base",
        ratio_target=0.6,
        target_text="<= 0.6x float32 base",
        note=note,
        samples={name: [value] for name, value in peaks.items()},
    )


def _step_time(settings: Settings, clock: Clock) -> Result:
    steps = {name: QloraStep(name, "4-bit", settings.device) for name in ("HF PEFT", "peftcore")}
    runners: Dict[str, Callable[[], None]] = dict(steps.items())  # type: ignore[arg-type]
    times = alternate(runners, settings.rounds(6, 2), clock, warmup=1, label="qlora step")
    losses = {name: float(step.first_loss or 0.0) for name, step in steps.items()}
    agree = abs(losses["peftcore"] - losses["HF PEFT"]) <= 1e-4 * abs(losses["HF PEFT"])
    note = "" if agree else f"first-step losses differ: {losses}"
    ms = {name: [1000.0 * t for t in values] for name, values in times.items()}
    return Result(
        key="qlora_step",
        title=f"10. QLoRA training step, 125M Llama 4-bit, batch 1x{TOKENS}",
        unit="ms/step",
        peftcore=median(ms["peftcore"]),
        hf=median(ms["HF PEFT"]),
        ratio_target=1.05,
        target_text="<= 1.05x HF PEFT",
        note=note,
        samples=ms,
    )


def run(settings: Settings, clock: Clock) -> List[Result]:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        why = f"bitsandbytes not importable ({type(exc).__name__})"
        return [
            Result(key="qlora_memory", title="9. QLoRA peak training memory", unit="", note=why),
            Result(key="qlora_step", title="10. QLoRA training step", unit="", note=why),
        ]
    return [_memory(settings), _step_time(settings, clock)]
