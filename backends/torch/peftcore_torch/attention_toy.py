"""The conformance suite's one-block attention toy (:mod:`peftcore.testing.unipelt_reference`) in torch.

Its attention opts in to prefixes the way any custom torch attention can: the class
sets ``peftcore_prefix_support = True`` and passes its keys, values and mask through
:func:`peftcore_torch.prefix.extend_key_values` before attending.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from peftcore_torch.prefix import extend_key_values


class ToyAttention(nn.Module):
    """Single-head attention; ``o`` projects its output (the block adds the residual)."""

    peftcore_prefix_support = True

    def __init__(self, dim: int, causal: bool) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = (proj(x).unsqueeze(1) for proj in (self.q, self.k, self.v))  # (batch, 1 head, seq, dim)
        seq = x.shape[1]
        mask = torch.ones(seq, seq, dtype=torch.bool, device=x.device)
        if self.causal:
            mask = mask.tril()
        key, value, extended = extend_key_values(self, query, key, value, mask[None, None])
        assert extended is not None  # a mask in, a mask out
        scores = (query @ key.transpose(-1, -2)) / math.sqrt(x.shape[-1])
        scores = scores.masked_fill(~extended, float("-inf"))
        return self.o((scores.softmax(dim=-1) @ value).squeeze(1))


class ToyFeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ToyBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, causal: bool) -> None:
        super().__init__()
        self.attn = ToyAttention(dim, causal)
        self.ffn = ToyFeedForward(dim, ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(x)
        return h + self.ffn(h)


class AttentionToyModel(nn.Module):
    def __init__(self, spec: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList([ToyBlock(spec.dim, spec.ffn_dim, spec.causal)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def build_attention_toy(spec: Any, weights: Mapping[str, np.ndarray]) -> nn.Module:
    model = AttentionToyModel(spec)
    model.load_state_dict({key: torch.from_numpy(np.asarray(value)) for key, value in weights.items()}, strict=True)
    return model
