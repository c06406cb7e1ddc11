"""The GPT-2-shaped model the training, memory and mixed-batch measurements share,
and the same LoRA adapter put on it by each library.

6 layers, width 512, 8 heads, vocabulary 8000, context 128, every dropout 0 (so the
runs are deterministic and the three contenders compute the same loss). LoRA r=8,
alpha=16 on ``c_attn``, ``c_proj`` (attention and MLP) and ``c_fc``: 24 layers.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterator, Tuple

LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]
RANK = 8
ALPHA = 16
VOCAB = 8000
SEQUENCE = 128


def gpt2_model(device: str, dtype: Any = None, seed: int = 0) -> Any:
    """A freshly initialised GPT-2-shaped ``GPT2LMHeadModel`` (same weights for the same seed)."""
    import torch
    import transformers

    config = transformers.GPT2Config(
        n_layer=6, n_embd=512, n_head=8, vocab_size=VOCAB, n_positions=SEQUENCE,
        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPT2LMHeadModel(config)
    return model.to(device=device, dtype=dtype or torch.float32)


def token_batch(batch: int, device: str, seed: int = 1) -> Any:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQUENCE), generator=generator).to(device)


def with_peftcore(model: Any, adapter_name: str = "default", random_init: bool = False, use_dora: bool = False) -> Any:
    import peftcore

    config = peftcore.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS, init_lora_weights=not random_init,
        use_dora=use_dora,
    )
    return peftcore.get_peft_model(model, config, adapter_name=adapter_name)


def add_peftcore_adapter(peft_model: Any, adapter_name: str) -> None:
    import peftcore

    config = peftcore.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS, init_lora_weights=False
    )
    peft_model.add_adapter(adapter_name, config)


def hf_config(random_init: bool = False, use_dora: bool = False) -> Any:
    import peft

    return peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS, init_lora_weights=not random_init,
        use_dora=use_dora,
    )


def with_hf(model: Any, adapter_name: str = "default", random_init: bool = False, use_dora: bool = False) -> Any:
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, hf_config(random_init, use_dora), adapter_name=adapter_name)


def lora_factors(model: Any) -> Iterator[Tuple[str, str, Any, Any]]:
    """``(layer path, adapter, A, B)`` for every LoRA factor pair of a peftcore or HF PEFT
    model; paths are the plain model's (HF PEFT's ``base_model.model.`` prefix dropped)."""
    for path, module in model.named_modules():
        a_store, b_store = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if a_store is None or b_store is None or not hasattr(a_store, "keys"):
            continue
        clean = path[len("base_model.model."):] if path.startswith("base_model.model.") else path
        for adapter in list(a_store.keys()):
            a, b = a_store[adapter], b_store[adapter]
            yield clean, adapter, getattr(a, "weight", a), getattr(b, "weight", b)


def fill_adapters(model: Any, seed: int = 2, scale: float = 0.05) -> Dict[str, int]:
    """Give every LoRA factor seeded random values keyed by (path, adapter), so the two
    libraries hold identical adapters. Returns the count of factor pairs per adapter."""
    import torch

    counts: Dict[str, int] = {}
    with torch.no_grad():
        for path, adapter, a, b in sorted(lora_factors(model), key=lambda item: (item[0], item[1])):
            key = sum(ord(c) * (i + 1) for i, c in enumerate(f"{path}/{adapter}")) + seed
            generator = torch.Generator().manual_seed(key)
            a.copy_((torch.randn(a.shape, generator=generator) * scale).to(a.dtype))
            b.copy_((torch.randn(b.shape, generator=generator) * scale).to(b.dtype))
            counts[adapter] = counts.get(adapter, 0) + 1
    return counts
