"""LoRA layers for torch: ``nn.Linear``, transformers' ``Conv1D`` and ``nn.Embedding``.

A is ``(r, in_features)`` and B ``(out_features, r)`` for every base type (canonical
layout); only the merge transposes for ``Conv1D``, whose weight is ``(in, out)``, and
for ``nn.Embedding``, whose table is ``(num_embeddings, dim)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.errors import AdapterError
from peftcore.plan import AddLora
from peftcore_torch.layers import AdapterLayer


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight stored ``(in, out)``), without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


class _LoraMixin(AdapterLayer):
    adapter_tensor_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}

    def _add_tensors(self, adapter_name: str, op: AddLora) -> None:
        if self.has_adapter(adapter_name):
            raise AdapterError(f"layer {op.path!r} already has an adapter named {adapter_name!r}")
        a = self.new_tensor(op.r, op.in_features)
        b = self.new_tensor(op.out_features, op.r)
        _initialise(a, b, op)
        self.lora_A[adapter_name] = a
        self.lora_B[adapter_name] = b
        self.lora_dropout[adapter_name] = nn.Dropout(op.dropout) if op.dropout > 0 else nn.Identity()
        self.scaling[adapter_name] = op.scaling
        self.r[adapter_name] = op.r

    def delete(self, adapter_name: str) -> None:
        super().delete(adapter_name)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]
        self.scaling.pop(adapter_name, None)
        self.r.pop(adapter_name, None)

    def canonical_delta(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B @ A`` as ``(out, in)``, computed in float32 for low-precision weights."""
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        compute = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        return (b.to(compute) @ a.to(compute)) * self.scaling[adapter_name]


class LoraLinear(_LoraMixin):
    """LoRA around ``nn.Linear`` or transformers' ``Conv1D``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)

    def features(self) -> tuple[int, int]:
        weight = self.base_layer.weight
        if self.fan_in_fan_out:
            return int(weight.shape[0]), int(weight.shape[1])
        return int(weight.shape[1]), int(weight.shape[0])

    def add(self, adapter_name: str, op: AddLora) -> None:
        self.check_op_fits(op, *self.features())
        self._add_tensors(adapter_name, op)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.canonical_delta(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.adapters_to_run():
            a = self.lora_A[name]
            lora_in = self.lora_dropout[name](x.to(a.dtype))
            update = F.linear(F.linear(lora_in, a), self.lora_B[name]) * self.scaling[name]
            result = result + update.to(result.dtype)
        return result


class LoraEmbedding(_LoraMixin):
    """LoRA around ``nn.Embedding``: A is looked up like a table, then projected by B."""

    def features(self) -> tuple[int, int]:
        return int(self.base_layer.num_embeddings), int(self.base_layer.embedding_dim)

    def add(self, adapter_name: str, op: AddLora) -> None:
        self.check_op_fits(op, *self.features())
        self._add_tensors(adapter_name, op)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.canonical_delta(adapter_name).T

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        for name in self.adapters_to_run():
            looked_up = F.embedding(
                x, self.lora_A[name].T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
            )
            update = (looked_up @ self.lora_B[name].T) * self.scaling[name]
            result = result + update.to(result.dtype)
        return result


def _initialise(a: torch.Tensor, b: torch.Tensor, op: AddLora) -> None:
    with torch.no_grad():
        if op.init == "gaussian":
            nn.init.normal_(a, std=1.0 / op.r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if op.init == "random":
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)
