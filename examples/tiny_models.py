"""Model factories for ``peftcore plan --model examples.tiny_models:NAME`` (tiny, random weights)."""

from __future__ import annotations

from typing import Any


def digits_mlp() -> Any:
    """The demo's 64-256-10 MLP."""
    from torch import nn

    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(64, 256))
    model.add_module("act", nn.ReLU())
    model.add_module("fc2", nn.Linear(256, 10))
    return model


def tiny_llama() -> Any:
    """A 2-layer Llama with hidden size 64, built locally (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)
