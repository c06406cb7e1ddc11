"""Model-walking helpers every torch layer file and builder uses (the backend's bottom module).

- :func:`walk` lists a model's modules by path, an adapter layer in place of its base
  layer (it does not descend into adapter layers).
- :func:`replace_module` and :func:`wrap_layer` put an adapter layer in a model; a
  builder (first-party or a plugin's, registered through ``peftcore_op_builders``) calls
  ``wrap_layer(model, layers, path, MyAdapterLayer).add(adapter_name, op)``.
"""

from __future__ import annotations

from typing import Iterator, TypeVar

from torch import Tensor, nn

from peftcore.adapter_layer import wrap_layer as core_wrap_layer
from peftcore_torch.layers import AdapterLayer

L = TypeVar("L", bound=AdapterLayer)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight stored ``(in, out)``), without importing transformers."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, Tensor) and weight.dim() == 2


def walk(model: nn.Module, prefix: str = "", nested: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that yields an adapter layer in place of its base layer and does
    not descend into it. With ``nested``, an adapter layer that wraps another (LoRA on
    several parameters of one module, :mod:`peftcore_torch.param_lora`) also yields the
    inner one at ``<path>.base_layer``, innermost first, so unwrapping in this order
    puts each base back in the right place."""
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, AdapterLayer):
            if nested:
                yield from _inner_adapter_layers(child, path)
            yield path, child
        else:
            yield path, child
            yield from walk(child, path, nested)


def _inner_adapter_layers(layer: AdapterLayer, path: str) -> Iterator[tuple[str, nn.Module]]:
    inner = getattr(layer, layer.base_layer_attribute, None)
    if isinstance(inner, AdapterLayer):
        inner_path = f"{path}.{layer.base_layer_attribute}"
        yield from _inner_adapter_layers(inner, inner_path)
        yield inner_path, inner


def innermost_base(module: nn.Module) -> nn.Module:
    """The module under every adapter layer wrapped around ``module``."""
    while isinstance(module, AdapterLayer):
        module = getattr(module, module.base_layer_attribute)
    return module


def replace_module(model: nn.Module, layers: dict[str, nn.Module], path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` in ``model`` (and in the ``layers`` index)."""
    parent_path, _, child = path.rpartition(".")
    parent = layers[parent_path] if parent_path else model
    setattr(parent, child, new)
    layers[path] = new


def wrap_layer(model: nn.Module, layers: dict[str, nn.Module], path: str, wrapper_type: type[L]) -> L:
    """The ``wrapper_type`` adapter layer at ``path``, wrapping the module there if needed
    (the core's :func:`peftcore.adapter_layer.wrap_layer` over :func:`replace_module`)."""
    return core_wrap_layer(replace_module, model, layers, path, wrapper_type)
