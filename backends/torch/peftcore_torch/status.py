"""Hugging Face PEFT's ``get_layer_status`` and ``get_model_status`` for torch models.

Each adapter layer (a :class:`~peftcore_torch.layers.AdapterLayer`, ``modules_to_save``
copies included) reports its adapters, which are active, merged and trainable, and the
devices their tensors are on; the model's status sums that up, with HF's ``"irregular"``
where the layers disagree. Names are relative to the PeftModel's ``base_model``
(``model.layers.0.self_attn.q_proj``), as HF's are. peftcore quantises no base layer, so
``quantization_backend`` is None.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from peftcore.peft_model import PeftModel
from peftcore_torch.layers import AdapterLayer

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """One adapter layer's state (HF PEFT's dataclass and field names)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclass
class TunerModelStatus:
    """The whole model's adapter state (HF PEFT's dataclass and field names)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[Optional[str], Irregular]


def _all_or_none(values: list[Any]) -> Union[bool, Irregular]:
    if all(value is True for value in values):
        return True
    if all(value is False for value in values):
        return False
    return "irregular"


def _adapter_tensors(layer: AdapterLayer) -> dict[str, list[torch.Tensor]]:
    """Each adapter's tensors in ``layer``, by adapter name."""
    stores = list(layer.adapter_layer_names) or ["modules_to_save"]
    found: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    for attribute in stores:
        store = getattr(layer, attribute, None)
        if not isinstance(store, (nn.ModuleDict, nn.ParameterDict)):
            continue
        for adapter, value in store.items():
            found[adapter].extend(value.parameters() if isinstance(value, nn.Module) else [value])
    return found


def _adapted_root(model: nn.Module) -> nn.Module:
    if isinstance(model, PeftModel):
        root = model.base_model  # HF's names start at the tuner: "model.<path>"
        if isinstance(root, nn.Module):
            return root
    return model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapter layer of ``model`` (a PeftModel, or a model with
    adapters injected); a ``ValueError`` when it has none, as in HF PEFT."""
    statuses = []
    for name, module in _adapted_root(model).named_modules():
        if not isinstance(module, AdapterLayer):
            continue
        tensors = _adapter_tensors(module)
        statuses.append(
            TunerLayerStatus(
                name=name,
                module_type=repr(module).partition("(")[0],
                enabled=not module.disable_adapters,
                active_adapters=list(module.active_adapters),
                merged_adapters=list(module.merged_adapters),
                requires_grad={
                    adapter: _all_or_none([t.requires_grad for t in group]) for adapter, group in tensors.items()
                },
                available_adapters=sorted(module.adapter_names()),
                devices={adapter: sorted({t.device.type for t in group}) for adapter, group in tensors.items()},
                quantization_backend=None,
            )
        )
    if not statuses:
        raise ValueError(
            "No adapter layers found in the model; wrap it with get_peft_model() or inject an adapter first."
        )
    return statuses


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapter state of the whole model, summed up from :func:`get_layer_status`."""
    if isinstance(model, PeftModel):
        base_model_type = type(model.get_base_model()).__name__
        trainable, total = model.get_nb_trainable_parameters()
        peft_types = {name: str(config.peft_type) for name, config in model.peft_config.items()}
        adapter_model_type = type(model.base_model).__name__
    else:
        is_transformers = any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__)
        base_model_type = type(model).__name__ if is_transformers else "other"
        params = list(model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        peft_types, adapter_model_type = {}, "None"
    layers = get_layer_status(model)
    enabled = {status.enabled for status in layers}
    active = {tuple(status.active_adapters) for status in layers}
    merged_all = set().union(*(status.merged_adapters for status in layers))
    merged: Union[list[str], Irregular] = sorted(merged_all)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_all for s in layers):
        merged = "irregular"
    requires_grad: dict[str, list[Any]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for status in layers:
        for adapter, value in status.requires_grad.items():
            requires_grad[adapter].append(value)
        for adapter, kinds in status.devices.items():
            devices[adapter].update(kinds)
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=int(trainable),
        total_params=int(total),
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters=merged,
        requires_grad={adapter: _all_or_none(values) for adapter, values in requires_grad.items()},
        available_adapters=sorted(set().union(*(status.available_adapters for status in layers))),
        devices={adapter: sorted(kinds) for adapter, kinds in devices.items()},
        quantization_backend=None,
    )
