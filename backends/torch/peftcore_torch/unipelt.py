"""UniPELT's gates and bottleneck adapter for torch, and the builders of their plan ops.

A gate is ``sigmoid(x @ weight.T + bias)`` on a submodule's input ``x``, averaged over
every axis between the batch and the features: one value per example. Each gated
layer keeps the last forward's values per adapter (:mod:`peftcore_torch.gates`).

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
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.errors import AdapterError, PlanError
from peftcore.methods.unipelt_ops import AddBottleneckAdapter, AddGate
from peftcore_torch.gates import GatedLayer, broadcast_gate
from peftcore_torch.layers import AdapterLayer
from peftcore_torch.lora import LoraLinear
from peftcore_torch.prefix import AttentionPrefix, prefix_holder
from peftcore_torch.walk import is_conv1d, wrap_layer

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


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
        if isinstance(layer, cls):
            return layer
        layer.__class__ = cls
        assert isinstance(layer, cls)
        layer.init_gates()
        return layer

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.adapters_to_run():
            a = self.lora_A.weight(name)
            update = F.linear(F.linear(self.lora_dropout[name](x.to(a.dtype)), a), self.lora_B.weight(name))
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
    # made by name in __init__
    down_weight: nn.ParameterDict
    down_bias: nn.ParameterDict
    up_weight: nn.ParameterDict
    up_bias: nn.ParameterDict
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
        weight = self.base_weight()
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

    layer: Any = modules.get(op.path)
    if op.target == "prefix":
        layer = prefix_holder(layer)
        expected: type[GatedLayer] = AttentionPrefix
    elif op.target == "adapter":
        expected = BottleneckAdapter
    else:
        expected = GatedLoraLinear
        if isinstance(layer, LoraLinear):
            layer = GatedLoraLinear.upgrade(layer)
    if not isinstance(layer, expected):
        raise PlanError(f"gate op on {op.path!r}: there is no {op.target} there to gate (found {type(layer).__name__}); "
                        f"the gate must follow the op that builds it")
    layer.add_gate(adapter_name, op)


def build_bottleneck_adapter(model: nn.Module, modules: dict, op: AddBottleneckAdapter, adapter_name: str) -> None:
    target = modules.get(op.path)
    base = target.base_layer if isinstance(target, AdapterLayer) else target
    if not (isinstance(base, nn.Linear) or (base is not None and is_conv1d(base))):
        kind = type(base).__name__ if base is not None else "missing"
        raise PlanError(f"torch backend puts a bottleneck adapter on a Linear or Conv1D; {op.path!r} is {kind}")
    wrap_layer(model, modules, op.path, BottleneckAdapter).add(adapter_name, op)
