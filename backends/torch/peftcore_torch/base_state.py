"""The base model's own state inside a torch PeftModel (HF PEFT's
``get_base_model_state_dict``/``set_base_model_state_dict``), HF's ``_get_submodules``
helper and ``load_peft_weights`` (an adapter file's tensors as torch tensors).

Adapter layers keep the layer they wrap as ``base_layer``, so the base model's weight
``lin0.weight`` sits at ``lin0.base_layer.weight`` while adapters are in. These
functions translate between the two key sets and leave every adapter tensor out.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from peftcore.io import WEIGHTS_NAME
from peftcore.safetensors_reader import read_safetensors
from peftcore_torch.layers import AdapterLayer


class BaseStateResult(NamedTuple):
    """What :func:`set_base_model_state_dict` reports, as ``load_state_dict`` does."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """``(parent, module, name)`` of the module at dotted path ``key`` (HF PEFT's
    ``_get_submodules``)."""
    parent = model.get_submodule(key.rpartition(".")[0]) if "." in key else model
    name = key.split(".")[-1]
    return parent, model.get_submodule(key), name


def _base_model(model: Any) -> nn.Module:
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _original_keys(model: nn.Module) -> dict[str, str]:
    """The base model's original state-dict key of each non-adapter entry, by its key now."""
    adapter_tensors = {
        id(tensor)
        for module in model.modules()
        if isinstance(module, AdapterLayer)
        for tensor in [*module.parameters(), *module.buffers()]
        if not _inside(tensor, module.base_layer)
    }
    keys: dict[str, str] = {}
    hops: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in adapter_tensors:
            continue
        parts, module, original, index = key.split("."), model, [], 0
        while index < len(parts) - 1:
            if isinstance(module, AdapterLayer):
                hop = hops.setdefault(id(module), _base_hop(module))
                if parts[index : index + len(hop)] == hop:  # the adapter layer's own path to its base layer
                    module, index = module.base_layer, index + len(hop)
                    continue
            original.append(parts[index])
            module, index = getattr(module, parts[index]), index + 1
        keys[key] = ".".join([*original, parts[-1]])
    return keys


def _base_hop(layer: AdapterLayer) -> list[str]:
    """The module names from ``layer`` to its base layer (``["base_layer"]``; trainable
    tokens keep it at ``token_adapter.base_layer``, as HF PEFT does)."""
    for name, module in layer.named_modules():
        if name and module is layer.base_layer:
            return name.split(".")
    return [layer.base_layer_attribute]


def _inside(tensor: torch.Tensor, module: nn.Module) -> bool:
    return any(tensor is own for own in [*module.parameters(), *module.buffers()])


def get_base_model_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original keys, without adapter tensors, from
    a PeftModel (or a model with adapters injected)."""
    base = _base_model(model)
    state = base.state_dict()
    return {original: state[key] for key, original in _original_keys(base).items()}


def set_base_model_state_dict(model: Any, state_dict: dict[str, torch.Tensor], strict: bool = True) -> BaseStateResult:
    """Load a base-model state dict (original keys) into the model under its adapters; the
    inverse of :func:`get_base_model_state_dict`. With ``strict``, missing or unexpected
    keys raise a ``RuntimeError`` before anything is copied."""
    base = _base_model(model)
    current_of = {original: key for key, original in _original_keys(base).items()}
    missing = [key for key in current_of if key not in state_dict]
    unexpected = [key for key in state_dict if key not in current_of]
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"set_base_model_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    mapped = {current_of[key]: value for key, value in state_dict.items() if key in current_of}
    base.load_state_dict(mapped, strict=False)
    return BaseStateResult(missing_keys=missing, unexpected_keys=unexpected)


def load_peft_weights(model_id: str, device: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The tensors of the adapter saved in directory ``model_id`` under their file keys,
    as torch tensors on ``device`` (default CPU), as HF PEFT's ``load_peft_weights``
    returns them. The file is read with peftcore's checked safetensors reader."""
    path = os.path.join(os.fspath(model_id), WEIGHTS_NAME)
    tensors, _ = read_safetensors(path)
    return {key: torch.from_numpy(np.array(tensors[key], copy=True)).to(device or "cpu") for key in tensors}
