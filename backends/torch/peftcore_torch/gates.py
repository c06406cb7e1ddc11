"""Gates for UniPELT's adapter layers (torch): the base of every gated layer.

A gate is ``sigmoid(x @ weight.T + bias)`` on a submodule's input ``x``, averaged over
every axis between the batch and the features: one value per example. Each gated layer
keeps the last forward's values per adapter (``recorded_gates``, which the core reads
for ``PeftModel.gate_values``).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peftcore.errors import AdapterError, PlanError
from peftcore.methods.unipelt_ops import AddGate
from peftcore_torch.layers import AdapterLayer


def gate_of(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One gate value per example (shape ``(batch,)``) from input ``x`` of shape ``(batch, ..., in)``."""
    per_position = torch.sigmoid(F.linear(x.to(weight.dtype), weight, bias))[..., 0]
    return per_position.reshape(per_position.shape[0], -1).mean(dim=1)


class GatedLayer(AdapterLayer):
    """Adds optional per-adapter gates (``gate_weight``, ``gate_bias``) to an adapter layer.

    Subclasses put ``"gate_weight", "gate_bias"`` in ``adapter_tensor_names`` after their
    own tensors and map them in ``canonical_names`` to ``<stem>.weight`` / ``<stem>.bias``.
    """

    def init_gates(self) -> None:
        self.gate_weight = nn.ParameterDict()
        self.gate_bias = nn.ParameterDict()
        self.last_gates: dict[str, torch.Tensor] = {}

    def add_gate(self, adapter_name: str, op: AddGate) -> None:
        if not self.has_adapter(adapter_name):
            raise PlanError(f"gate op on {op.path!r}: adapter {adapter_name!r} has no {op.target} there to gate; "
                            f"the gate must follow the op that builds it")
        if adapter_name in self.gate_weight:
            raise AdapterError(f"the {op.target} of adapter {adapter_name!r} on {op.path!r} already has a gate")
        weight, bias = self.new_tensor(1, op.in_features), self.new_tensor(1)
        bound = 1.0 / math.sqrt(op.in_features)  # nn.Linear's default initialisation
        with torch.no_grad():
            weight.uniform_(-bound, bound)
            bias.uniform_(-bound, bound)
        self.gate_weight[adapter_name] = weight
        self.gate_bias[adapter_name] = bias

    def gate(self, adapter_name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The adapter's gate on input ``x`` (``(batch,)``), recorded; None if it has no gate."""
        if adapter_name not in self.gate_weight:
            return None
        value = gate_of(self.gate_weight[adapter_name], self.gate_bias[adapter_name], x)
        self.last_gates[adapter_name] = value.detach()
        return value

    def delete(self, adapter_name: str) -> None:
        super().delete(adapter_name)
        self.last_gates.pop(adapter_name, None)

    def recorded_gates(self, adapter_name: str) -> dict[str, np.ndarray]:
        """``{gate stem: values}`` of the last forward, if the adapter is gated here and ran."""
        value = self.last_gates.get(adapter_name)
        if value is None or adapter_name not in self.gate_weight:
            return {}
        stem = self.canonical_names["gate_weight"].rsplit(".", 1)[0]
        return {stem: value.to(torch.float32).cpu().numpy().copy()}

    def refuse_merge(self, adapter_names: list[str], what: str) -> None:
        present = [a for a in adapter_names if self.has_adapter(a)]
        if present:
            raise AdapterError(f"adapter(s) {present} cannot be merged: {what}")


def broadcast_gate(gate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(batch,)`` gate values shaped to multiply ``like`` (``(batch, ...)``)."""
    return gate.reshape(gate.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)
