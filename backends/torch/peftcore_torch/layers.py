"""The base class of every adapter layer the torch backend builds.

An :class:`AdapterLayer` wraps one base layer (kept as ``base_layer``) and holds each
adapter's tensors in ``nn.ParameterDict`` attributes named by ``adapter_tensor_names``,
keyed by adapter name. Export, import, delete and (un)freezing are generic over those
dicts, so a new layer type (ours or a third-party plugin's) only writes its forward,
``add`` and ``delta_weight``.

Merging keeps a copy of the original weight while merged and restores it on unmerge,
so any number of merge/unmerge cycles leaves the base weights bit-identical.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, cast

import torch
from torch import nn

from peftcore.adapter_state import AdapterBookkeeping
from peftcore.errors import AdapterError, PlanError


class AdapterLayer(AdapterBookkeeping, nn.Module):
    """A base layer plus named adapters. Subclasses set ``adapter_tensor_names`` (and
    ``canonical_names`` where an attribute's saved name differs); the bookkeeping rules
    come from :class:`~peftcore.adapter_state.AdapterBookkeeping`."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.init_adapter_state()
        self._unmerged_weight: Optional[torch.Tensor] = None

    def base_weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.base_layer.weight)

    def new_tensor(self, *shape: int) -> nn.Parameter:
        """An uninitialised parameter on the base weight's device and dtype."""
        weight = self.base_weight()
        return nn.Parameter(torch.empty(shape, device=weight.device, dtype=weight.dtype))

    # -- what subclasses provide ----------------------------------------------------------
    def add(self, adapter_name: str, op: Any) -> None:
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's change to ``base_layer.weight``, in the weight's own layout."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def canonical_export(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Convert a stored tensor to canonical layout (identity unless overridden)."""
        return tensor

    def native_import(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Convert a canonical tensor to the stored layout (identity unless overridden)."""
        return tensor

    # -- generic adapter state ------------------------------------------------------------
    def export(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {
            self.canonical_name(name): self.canonical_export(name, getattr(self, name)[adapter_name].detach())
            for name in self.tensor_names(adapter_name)
        }

    def load(self, adapter_name: str, tensors: Mapping[str, Any]) -> None:
        """Copy canonical tensors (numpy arrays or torch tensors) into the adapter."""
        for name in self.tensor_names(adapter_name):
            key, given = self.canonical_tensor(adapter_name, tensors, name)
            target = getattr(self, name)[adapter_name]
            value = self.native_import(name, torch.as_tensor(given))
            if tuple(value.shape) != tuple(target.shape):
                raise AdapterError(f"tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value.to(device=target.device, dtype=target.dtype))

    def delete(self, adapter_name: str) -> None:
        self.forget_adapter(adapter_name)

    def set_trainable(self, adapter_name: str, trainable: bool) -> None:
        for name in self.adapter_tensor_names:
            store = getattr(self, name)
            if adapter_name in store:
                store[adapter_name].requires_grad_(trainable)

    # -- merging --------------------------------------------------------------------------
    def merge(self, adapter_names: list[str]) -> None:
        todo = [a for a in adapter_names if self.has_adapter(a) and a not in self.merged_adapters]
        if not todo:
            return
        weight = self.base_weight()
        if self._unmerged_weight is None:
            self._unmerged_weight = weight.detach().clone()
        with torch.no_grad():
            total = weight.detach().to(torch.float32)
            for name in todo:
                total = total + self.delta_weight(name).to(torch.float32)
            weight.copy_(total.to(weight.dtype))
        self.merged_adapters.extend(todo)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        assert self._unmerged_weight is not None  # saved by merge()
        with torch.no_grad():
            self.base_weight().copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged_adapters = []

    def unwrap(self, merge: bool) -> nn.Module:
        """The base layer to put back in the model, with active adapters folded in if ``merge``."""
        self.unmerge()
        if merge:
            self.merge([a for a in self.active_adapters if self.has_adapter(a)])
            self._unmerged_weight = None
        return self.base_layer

    def check_op_fits(self, op: Any, in_features: int, out_features: int) -> None:
        if (op.in_features, op.out_features) != (in_features, out_features):
            raise PlanError(
                f"plan op for {op.path!r} expects {op.in_features} -> {op.out_features} features, "
                f"the layer has {in_features} -> {out_features}"
            )
