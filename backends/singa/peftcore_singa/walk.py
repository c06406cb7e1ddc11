"""Model-walking helpers every SINGA layer file and builder uses.

:func:`~peftcore_singa.describe.walk` lists layers by path (an adapter layer in place of
its base layer); :func:`replace_layer` and :func:`wrap_layer` put an adapter layer in a
model. A builder (first-party or a plugin's, registered through ``peftcore_op_builders``)
calls ``wrap_layer(model, layers, path, MyAdapterLayer).add(adapter_name, op)``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from peftcore.adapter_layer import wrap_layer as core_wrap_layer
from peftcore_singa.describe import layer_index, walk
from peftcore_singa.layers import AdapterLayer
from peftcore_singa.unregistered import replace_held

L = TypeVar("L", bound=AdapterLayer)

__all__ = ["layer_index", "replace_layer", "walk", "wrap_layer"]


def replace_layer(model: Any, layers: dict[str, Any], path: str, new: Any) -> None:
    """Put ``new`` at ``path``: same ``_layers`` key (so the same place in the order),
    same layer name, same parent. Python lists, tuples and dicts held by the parent that
    reference the old layer (how ``register_layers`` users often keep them) are updated too."""
    parent_path, _, key = path.rpartition(".")
    parent = layers.get(parent_path) if parent_path else model
    if parent is None or parent._layers.get(key) is not layers[path]:  # held outside _layers
        grandparent = parent_path.rpartition(".")[0]  # a list slot: the list's owner holds it
        holder = parent if parent is not None else (layers[grandparent] if grandparent else model)
        replace_held(holder, layers[path], new, path)
        layers[path] = new
        return
    old = parent._layers[key]
    parent._layers[key] = new
    new.__dict__["_parent"] = parent
    new.__dict__["name"] = old.name  # directly: Layer.__setattr__ would also rename sublayers
    for attr, value in list(vars(parent).items()):
        if isinstance(value, list):
            value[:] = [new if item is old else item for item in value]
        elif isinstance(value, tuple) and any(item is old for item in value):
            parent.__dict__[attr] = tuple(new if item is old else item for item in value)
        elif isinstance(value, dict) and attr != "_layers":
            for k, item in list(value.items()):
                if item is old:
                    value[k] = new
    layers[path] = new


def wrap_layer(model: Any, layers: dict[str, Any], path: str, wrapper_type: type[L]) -> L:
    """The ``wrapper_type`` adapter layer at ``path``, wrapping the layer there if needed
    (the core's :func:`peftcore.adapter_layer.wrap_layer` over :func:`replace_layer`)."""
    return core_wrap_layer(replace_layer, model, layers, path, wrapper_type)
