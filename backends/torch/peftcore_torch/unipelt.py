"""UniPELT's gates and bottleneck adapter for torch, and the builders of their plan ops.

A gate is ``sigmoid(x @ weight.T + bias)`` on a submodule's input ``x``, averaged over
every axis between the batch and the features: one value per example. Each gated
layer keeps the last forward's values per adapter (:func:`gate_values` reads them).

The ``gate`` op attaches to what earlier ops of the plan built at its path: a
:class:`~peftcore_torch.lora.LoraLinear` (the gate then replaces the LoRA's
``alpha / r`` scaling), a :class:`BottleneckAdapter`, or an attention prefix
(:mod:`peftcore_torch.prefix`). A ``LoraLinear`` is turned into a :class:`GatedLoraLinear`
in place by reassigning its class, as ``torch.nn.utils.parametrize`` does, so other
adapters on the layer, and references to it, stay as they were.

Nothing gated can be merged into base weights: the gate depends on the input. Those
layers' ``merge`` raises :class:`~peftcore.errors.AdapterError`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peftcore.errors import AdapterError, PlanError
from peftcore.methods.unipelt_ops import AddBottleneckAdapter, AddGate
from peftcore_torch.layers import AdapterLayer
from peftcore_torch.lora import LoraLinear

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


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


class GatedLoraLinear(GatedLayer, LoraLinear):
    """A LoRA linear whose gated adapters are scaled by their gate instead of ``alpha / r``."""

    adapter_tensor_names = ("lora_A", "lora_B", "gate_weight", "gate_bias")
    canonical_names = {"gate_weight": "lora_gate.weight", "gate_bias": "lora_gate.bias"}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.init_gates()

    @classmethod
    def upgrade(cls, layer: LoraLinear) -> GatedLoraLinear:
        """Turn a plain ``LoraLinear`` into a ``GatedLoraLinear`` in place."""
        if not isinstance(layer, cls):
            layer.__class__ = cls
            layer.init_gates()
        return layer  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.adapters_to_run():
            a = self.lora_A[name]
            update = F.linear(F.linear(self.lora_dropout[name](x.to(a.dtype)), a), self.lora_B[name])
            gate = self.gate(name, x)
            update = update * (broadcast_gate(gate, update) if gate is not None else self.scaling[name])
            result = result + update.to(result.dtype)
        return result

    def merge(self, adapter_names: list[str]) -> None:
        gated = [a for a in adapter_names if a in self.gate_weight]
        self.refuse_merge(gated, "a gated LoRA's update depends on the input through its gate, so it is not a weight change")
        super().merge(adapter_names)


class BottleneckAdapter(GatedLayer):
    """``y + gate * up(act(down(y)))`` on the output ``y`` of a linear layer (Houlsby-style)."""

    adapter_tensor_names = ("down_weight", "down_bias", "up_weight", "up_bias", "gate_weight", "gate_bias")
    canonical_names = {
        "down_weight": "adapter.down.weight", "down_bias": "adapter.down.bias",
        "up_weight": "adapter.up.weight", "up_bias": "adapter.up.bias",
        "gate_weight": "adapter.gate.weight", "gate_bias": "adapter.gate.bias",
    }

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for name in self.adapter_tensor_names[:4]:
            setattr(self, name, nn.ParameterDict())
        self.init_gates()
        self.activation: dict[str, str] = {}

    def add(self, adapter_name: str, op: AddBottleneckAdapter) -> None:
        if self.has_adapter(adapter_name):
            raise AdapterError(f"layer {op.path!r} already has an adapter named {adapter_name!r}")
        weight = self.base_layer.weight
        features = int(weight.shape[1]) if type(self.base_layer).__name__ == "Conv1D" else int(weight.shape[0])
        if features != op.features:
            raise PlanError(f"bottleneck_adapter op for {op.path!r} expects {op.features} output features, the layer has {features}")
        down_w, down_b = self.new_tensor(op.bottleneck, op.features), self.new_tensor(op.bottleneck)
        up_w, up_b = self.new_tensor(op.features, op.bottleneck), self.new_tensor(op.features)
        with torch.no_grad():
            nn.init.kaiming_uniform_(down_w, a=math.sqrt(5))
            for zero in (down_b, up_w, up_b):  # the up projection starts at zero: identity at init
                zero.zero_()
        for name, tensor in zip(self.adapter_tensor_names[:4], (down_w, down_b, up_w, up_b)):
            getattr(self, name)[adapter_name] = tensor
        self.activation[adapter_name] = op.activation

    def delete(self, adapter_name: str) -> None:
        super().delete(adapter_name)
        self.activation.pop(adapter_name, None)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        out = result
        for name in self.adapters_to_run():
            y = result.to(self.down_weight[name].dtype)
            hidden = _ACTIVATIONS[self.activation[name]](F.linear(y, self.down_weight[name], self.down_bias[name]))
            update = F.linear(hidden, self.up_weight[name], self.up_bias[name])
            gate = self.gate(name, y)
            if gate is not None:
                update = update * broadcast_gate(gate, update)
            out = out + update.to(result.dtype)
        return out

    def merge(self, adapter_names: list[str]) -> None:
        self.refuse_merge(adapter_names, "a bottleneck adapter is a non-linear function of the layer's output, not a weight change")


def build_gate(model: nn.Module, modules: dict, op: AddGate, adapter_name: str) -> None:
    from peftcore_torch.prefix import AttentionPrefix, prefix_holder

    layer: Any = modules.get(op.path)
    if op.target == "prefix":
        layer = prefix_holder(layer)
        expected: type = AttentionPrefix
    elif op.target == "adapter":
        expected = BottleneckAdapter
    else:
        expected = LoraLinear
        if isinstance(layer, LoraLinear):
            layer = GatedLoraLinear.upgrade(layer)
    if not isinstance(layer, expected):
        raise PlanError(f"gate op on {op.path!r}: there is no {op.target} there to gate (found {type(layer).__name__}); "
                        f"the gate must follow the op that builds it")
    layer.add_gate(adapter_name, op)


def build_bottleneck_adapter(model: nn.Module, modules: dict, op: AddBottleneckAdapter, adapter_name: str) -> None:
    from peftcore_torch.apply import wrap_layer
    from peftcore_torch.lora import is_conv1d

    target = modules.get(op.path)
    base = target.base_layer if isinstance(target, AdapterLayer) else target
    if not (isinstance(base, nn.Linear) or (base is not None and is_conv1d(base))):
        kind = type(base).__name__ if base is not None else "missing"
        raise PlanError(f"torch backend puts a bottleneck adapter on a Linear or Conv1D; {op.path!r} is {kind}")
    wrap_layer(model, modules, op.path, BottleneckAdapter).add(adapter_name, op)


def gate_values(model: nn.Module, adapter_name: str) -> dict[str, np.ndarray]:
    """Every recorded gate of ``adapter_name``, keyed ``<op path>.<gate stem>``."""
    from peftcore_torch.apply import adapter_layers

    values: dict[str, np.ndarray] = {}
    for path, layer in adapter_layers(model).items():
        if isinstance(layer, GatedLayer):
            for stem, value in layer.recorded_gates(adapter_name).items():
                values[f"{path}.{stem}"] = value
    return values
