"""``modules_to_save``: a full trainable copy of a module per adapter.

SINGA tensors wrap SWIG objects that ``copy.deepcopy`` cannot copy, so
:func:`clone_layer` copies a layer tree by hand: a shallow copy of each layer with a
fresh ``_layers`` dict and a ``clone()`` of every Tensor attribute, renamed under
``<path>.modules_to_save.<adapter>``. Tensors a layer keeps inside lists or dicts (not
as attributes) are not copied and stay shared with the original; every SINGA layer this
backend knows keeps its parameters as attributes.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import tensor  # noqa: E402

from peftcore.adapter_layer import AdapterTensor  # noqa: E402
from peftcore.plan import SaveModule  # noqa: E402
from peftcore_singa.describe import ParamView, native_params, walk  # noqa: E402
from peftcore_singa.layers import AdapterLayer  # noqa: E402
from peftcore_singa.tensors import set_trainable_flags  # noqa: E402


def clone_layer(source: Any, name: str) -> Any:
    """A copy of ``source`` and its registered sublayers with cloned tensors; the copy's
    layers are named ``name`` / ``name.<key>`` and its tensors ``<layer name>.<attr>``."""
    clone = copy.copy(source)
    clone.__dict__["_layers"] = {}
    clone.__dict__["name"] = name
    for attr, value in vars(source).items():
        if isinstance(value, tensor.Tensor):
            copied = value.clone()
            copied.name = f"{name}.{attr}"
            copied.requires_grad = value.requires_grad
            copied.stores_grad = value.stores_grad
            clone.__dict__[attr] = copied
    for key, child in source._layers.items():
        child_clone = clone_layer(child, f"{name}.{key}")
        child_clone.__dict__["_parent"] = clone
        clone._layers[key] = child_clone
    return clone


def adopt_names(source: Any, clone: Any) -> None:
    """Give ``clone``'s layers and tensors the names of their counterparts in ``source``
    (used when a trained copy replaces the original module for good)."""
    clone.__dict__["name"] = source.name
    for attr, value in vars(clone).items():
        original = source.__dict__.get(attr)
        if isinstance(value, tensor.Tensor) and isinstance(original, tensor.Tensor):
            value.name = original.name
    for key, child in clone._layers.items():
        if key in source._layers:
            adopt_names(source._layers[key], child)


class ModulesToSaveWrapper(AdapterLayer):
    """Runs the first active adapter's copy of the module, or the original when none."""

    def __init__(self, base_layer: Any, path: str) -> None:
        super().__init__(base_layer, path)
        self.modules_to_save: dict[str, Any] = {}

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def adapter_tensors(self, adapter_name: Any = None) -> list[Any]:
        found = []
        for adapter, clone in self.modules_to_save.items():
            if adapter_name is None or adapter == adapter_name:
                found.extend(clone.get_params().values())
        return found

    def add(self, adapter_name: str, op: SaveModule) -> None:
        if adapter_name in self.modules_to_save:
            raise ValueError(f"module {op.path!r} already has a copy for adapter {adapter_name!r}")
        clone = clone_layer(self.base_layer, f"{self.path}.modules_to_save.{adapter_name}")
        clone.__dict__["_parent"] = self
        self.modules_to_save[adapter_name] = clone
        for t in self.adapter_tensors(adapter_name):
            set_trainable_flags(t, True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        running = self.adapters_to_run()
        module = self.modules_to_save[running[0]] if running else self.base_layer
        return module(*args, **kwargs)

    def _views(self, adapter_name: str) -> dict[str, ParamView]:
        clone = self.modules_to_save[adapter_name]
        found: dict[str, ParamView] = {}
        for rel, node in [("", clone), *walk(clone)]:
            for param_name, view in native_params(node).items():
                found[f"{rel}.{param_name}" if rel else param_name] = view
        return found

    def adapter_tensors_of(self, adapter_name: str) -> list[AdapterTensor]:
        """Every parameter of the adapter's copy, by its path in the layer, in canonical layout."""
        return [
            AdapterTensor(key, functools.partial(getattr, view, "tensor"), None, view.to_canonical, view.to_native)
            for key, view in self._views(adapter_name).items()
        ]

    def delete(self, adapter_name: str) -> None:
        self.modules_to_save.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def get_states(self) -> dict[str, Any]:
        states = super().get_states()
        for clone in self.modules_to_save.values():
            states.update(clone.get_states())
        return states

    def merge(self, adapter_names: Any) -> None:
        """Nothing to fold: forward already runs the trained copy."""

    def unmerge(self) -> None:
        """Nothing was folded."""

    def unwrap(self, merge: bool) -> Any:
        """With ``merge``, the active adapter's trained copy; without, the original module."""
        running = [a for a in self.active_adapters if a in self.modules_to_save]
        if not (merge and running):
            return self.base_layer
        chosen = self.modules_to_save[running[0]]
        adopt_names(self.base_layer, chosen)
        chosen.__dict__["_parent"] = self.base_layer._parent
        return chosen
