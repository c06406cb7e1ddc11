"""``modules_to_save``: a full trainable copy of a module per adapter."""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from peftcore.errors import AdapterError
from peftcore.plan import SaveModule
from peftcore_torch.layers import AdapterLayer
from peftcore_torch.walk import is_conv1d


class SavedModule(AdapterLayer):
    """Runs the first active adapter's copy of the module, or the original when none."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.copies = nn.ModuleDict()

    def adapter_names(self) -> list[str]:
        return list(self.copies.keys())

    def add(self, adapter_name: str, op: SaveModule) -> None:
        if adapter_name in self.copies:
            raise AdapterError(f"module {op.path!r} already has a copy for adapter {adapter_name!r}")
        clone = copy.deepcopy(self.base_layer)
        clone.requires_grad_(True)
        self.copies[adapter_name] = clone

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        running = self.adapters_to_run()
        module = self.copies[running[0]] if running else self.base_layer
        return module(*args, **kwargs)

    def _named(self, adapter_name: str) -> dict[str, tuple[nn.Module, str]]:
        found = {}
        for mod_name, module in self.copies[adapter_name].named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                key = f"{mod_name}.{param_name}" if mod_name else param_name
                found[key] = (module, param_name)
        return found

    def export(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out = {}
        for key, (module, param_name) in self._named(adapter_name).items():
            value = getattr(module, param_name).detach()
            out[key] = value.T if (param_name == "weight" and is_conv1d(module)) else value
        return out

    def load(self, adapter_name: str, tensors: Mapping[str, Any]) -> None:
        for key, (module, param_name) in self._named(adapter_name).items():
            if key not in tensors:
                raise AdapterError(f"tensor {key!r} missing for saved module of adapter {adapter_name!r}")
            value = torch.as_tensor(tensors[key])
            if param_name == "weight" and is_conv1d(module):
                value = value.T
            target = getattr(module, param_name)
            if tuple(value.shape) != tuple(target.shape):
                raise AdapterError(f"tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value.to(device=target.device, dtype=target.dtype))

    def delete(self, adapter_name: str) -> None:
        if adapter_name in self.copies:
            del self.copies[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_trainable(self, adapter_name: str, trainable: bool) -> None:
        if adapter_name in self.copies:
            self.copies[adapter_name].requires_grad_(trainable)

    def merge(self, adapter_names: list[str]) -> None:
        """Nothing to fold: forward already runs the trained copy."""

    def unmerge(self) -> None:
        """Nothing was folded."""

    def unwrap(self, merge: bool) -> nn.Module:
        """With ``merge``, the active adapter's trained copy; without, the original module."""
        running = [a for a in self.active_adapters if a in self.copies]
        return self.copies[running[0]] if merge and running else self.base_layer
