"""LoRA on a bare ``nn.Parameter`` for torch (LoraConfig's ``target_parameters``).

:class:`ParamLora` wraps the module that owns the parameter, as HF PEFT's
``lora.ParamWrapper`` does: during its forward the parameter is replaced by
``weight + delta`` (the delta per expert for a 3-D stack, see
:mod:`peftcore.methods.lora_params`), so the module's own forward, whatever it computes
with the parameter, sees the adapted value and gradients reach A and B. Several
parameters of one module nest wrappers (the last targeted outermost); the runtime lists
the inner ones at ``<path>.base_layer`` so the core sees each as a layer.

Merging adds the delta to the parameter itself; the core keeps the original and
restores it on unmerge, bit-exact.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, cast

import torch
from torch import nn

from peftcore.errors import AdapterError, PlanError
from peftcore.methods.lora_params import AddParamLora
from peftcore_torch.layers import AdapterLayer
from peftcore_torch.lora import FactorDict, init_linear_factors
from peftcore_torch.walk import replace_module


class ParamLora(AdapterLayer):
    """LoRA on parameter ``parameter_name`` of the wrapped module (or of the module a
    chain of other :class:`ParamLora` wrappers wraps)."""

    adapter_tensor_names: ClassVar[tuple] = ("lora_A", "lora_B")
    other_param_names: ClassVar[tuple] = ("r", "scaling")

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        self.lora_A = FactorDict()
        self.lora_B = FactorDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}

    def _get_name(self) -> str:
        return "lora.ParamWrapper"

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}"

    def adapter_store(self, attribute: str) -> Any:
        store = getattr(self, attribute)
        return store.weights if isinstance(store, FactorDict) else store

    # -- the targeted parameter -------------------------------------------------------
    def owner(self) -> nn.Module:
        """The module that owns the parameter (under any nested wrappers)."""
        module = self.base_layer
        while isinstance(module, ParamLora):
            module = module.base_layer
        return module

    def base_tensor(self, role: str) -> Optional[torch.Tensor]:
        if role != "weight":
            return None
        return cast(Optional[torch.Tensor], self.owner()._parameters.get(self.parameter_name))

    def set_base_tensor(self, role: str, tensor: Any) -> None:
        if role != "weight" or tensor is None:
            raise AdapterError(f"{type(self).__name__} cannot remove parameter {self.parameter_name!r}")
        self.owner()._parameters[self.parameter_name] = tensor

    def base_weight(self) -> torch.Tensor:
        weight = self.base_tensor("weight")
        if weight is None:
            raise AdapterError(f"the wrapped module has no parameter {self.parameter_name!r}")
        return weight

    @property
    def weight(self) -> Any:
        return getattr(self.base_layer, "weight", None)

    def _layout(self) -> tuple[int, int, int, bool, bool]:
        """``(experts, in, out, stacked, transposed)`` of the parameter."""
        shape = tuple(self.base_weight().shape)
        if len(shape) == 2:
            return 1, int(shape[1]), int(shape[0]), False, False
        transposed = bool(getattr(self.owner(), "is_transposed", False))
        if transposed:
            return int(shape[0]), int(shape[1]), int(shape[2]), True, True
        return int(shape[0]), int(shape[2]), int(shape[1]), True, False

    def features(self) -> tuple[int, int]:
        _, in_features, out_features, _, _ = self._layout()
        return in_features, out_features

    @property
    def in_features(self) -> int:
        return self.features()[0]

    @property
    def out_features(self) -> int:
        return self.features()[1]

    # -- adapters ---------------------------------------------------------------------
    def new_adapter(self, adapter_name: str, op: AddParamLora) -> dict[str, Any]:
        if op.parameter_name != self.parameter_name:
            raise PlanError(f"the adapter targets {op.parameter_name!r}, this wrapper {self.parameter_name!r}")
        experts, _, _, stacked, transposed = self._layout()
        if (experts, stacked, transposed) != (op.num_experts, op.stacked, op.transposed):
            raise PlanError(
                f"parameter {op.path}.{op.parameter_name} has {experts} expert(s) (3-D: {stacked}, transposed: "
                f"{transposed}), the adapter expects {op.num_experts} ({op.stacked}, {op.transposed})"
            )
        a = self.new_tensor(op.r * op.num_experts, op.in_features)
        b = self.new_tensor(op.out_features, op.r * op.num_experts)
        init_linear_factors(a, b, op.init, op.r)
        return {"lora_A": a, "lora_B": b, "scaling": op.scaling, "r": op.r}

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B_e @ A_e`` per expert, in the parameter's shape (float32 for a
        half-precision adapter)."""
        experts, _, _, stacked, transposed = self._layout()
        a, b = self.lora_A.weight(adapter_name), self.lora_B.weight(adapter_name)
        compute = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        rank = a.shape[0] // experts
        a_e = a.to(compute).reshape(experts, rank, a.shape[-1])
        b_e = b.to(compute).reshape(b.shape[0], rank, experts).permute(2, 0, 1)
        change = torch.bmm(b_e, a_e) * self.scaling[adapter_name]
        if not stacked:
            return change[0]
        return change.transpose(1, 2) if transposed else change

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """HF PEFT's name for :meth:`delta_weight`."""
        return self.delta_weight(adapter_name)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        running = self.adapters_to_run()
        if not running:
            return self.base_layer(x, *args, **kwargs)
        owner, original = self.owner(), self.base_weight()
        delta = self.delta_weight(running[0])
        for name in running[1:]:
            delta = delta + self.delta_weight(name)
        # a plain tensor in the parameter's slot for this call: the module reads it as usual
        owner._parameters[self.parameter_name] = original + delta.to(original.dtype)  # type: ignore[assignment]
        try:
            return self.base_layer(x, *args, **kwargs)
        finally:
            owner._parameters[self.parameter_name] = original  # type: ignore[assignment]


def build_param_lora(model: nn.Module, layers: dict, op: AddParamLora, adapter_name: str) -> None:
    """Add the adapter to the wrapper of ``op.parameter_name`` at ``op.path``, wrapping
    the module there (outside any wrappers of its other parameters) the first time."""
    current = layers.get(op.path)
    if current is None or not op.path:
        raise PlanError(f"the model has no module {op.path!r}")
    chain: list[ParamLora] = []
    module = current
    while isinstance(module, ParamLora):
        chain.append(module)
        module = module.base_layer
    if isinstance(module, AdapterLayer):
        raise PlanError(
            f"module {op.path!r} already carries a {type(module).__name__}; a parameter of it cannot also take LoRA "
            "(do not target it with target_modules as well as target_parameters)"
        )
    if not isinstance(module._parameters.get(op.parameter_name), torch.Tensor):
        raise PlanError(f"module {op.path!r} ({type(module).__name__}) has no parameter {op.parameter_name!r}")
    wrapper = next((w for w in chain if w.parameter_name == op.parameter_name), None)
    if wrapper is None:
        wrapper = ParamLora(current, op.parameter_name)
        replace_module(model, layers, op.path, wrapper)
    elif chain.index(wrapper) != op.depth:
        raise PlanError(
            f"parameter {op.path}.{op.parameter_name} is wrapped at depth {chain.index(wrapper)}, the adapter expects "
            f"{op.depth}: all adapters that use target_parameters must target the same parameters (as in HF PEFT)"
        )
    wrapper.add(adapter_name, op)
