"""The torch backend plugin (entry point ``torch`` in the ``peftcore`` group).

This module imports without torch installed: torch and the layer modules are imported
inside the hooks, and :func:`peftcore_backend_info` reports the backend unavailable
when torch cannot be imported.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

from peftcore.hookspecs import BackendInfo, hookimpl

NAME = "torch"


@hookimpl
def peftcore_backend_info() -> BackendInfo:
    try:
        import torch
    except ImportError as exc:
        return BackendInfo(NAME, "PyTorch", available=False, reason=f"torch is not importable ({exc})")
    return BackendInfo(NAME, "PyTorch", available=True, version=torch.__version__, ops=tuple(sorted(_builders())))


@hookimpl
def peftcore_detect(model: Any) -> bool:
    if "torch" not in sys.modules:
        return False
    import torch

    return isinstance(model, torch.nn.Module)


def _builders() -> dict:
    from peftcore.plugins import get_plugin_manager
    from peftcore_torch.apply import BUILDERS

    builders = dict(BUILDERS)
    for extra in get_plugin_manager().hook.peftcore_op_builders(backend=NAME):
        builders.update(extra or {})
    return builders


@hookimpl
def peftcore_describe(model: Any, example_inputs: Any) -> Any:
    from peftcore.plugins import get_plugin_manager
    from peftcore_torch.describe import describe_model

    extra: dict = {}
    for kinds in get_plugin_manager().hook.peftcore_layer_kinds(backend=NAME):
        extra.update(kinds or {})
    return describe_model(model, extra)


@hookimpl
def peftcore_peft_model_class() -> type:
    from peftcore_torch.peft_model import TorchPeftModel

    return TorchPeftModel


@hookimpl
def peftcore_apply(model: Any, plan: Any) -> Any:
    from peftcore_torch.apply import apply_plan

    return apply_plan(model, plan, _builders())


@hookimpl
def peftcore_export_adapter(model: Any, adapter_name: str) -> Mapping[str, Any]:
    from peftcore_torch.apply import export_adapter

    return export_adapter(model, adapter_name)


@hookimpl
def peftcore_import_adapter(model: Any, adapter_name: str, tensors: Mapping[str, Any]) -> None:
    from peftcore_torch.apply import import_adapter

    import_adapter(model, adapter_name, tensors)


@hookimpl
def peftcore_set_active_adapters(model: Any, adapter_names: Sequence[str]) -> None:
    from peftcore_torch.apply import set_active

    set_active(model, adapter_names)


@hookimpl
def peftcore_set_adapters_enabled(model: Any, enabled: bool) -> None:
    from peftcore_torch.apply import for_each_layer

    def switch(layer: Any) -> None:
        layer.disabled = not enabled

    for_each_layer(model, switch)


@hookimpl
def peftcore_set_batch_adapters(model: Any, adapter_names: Any) -> None:
    from peftcore_torch.row_routing import set_batch_adapters

    set_batch_adapters(model, adapter_names)


@hookimpl
def peftcore_set_trainable(model: Any, adapter_name: str, trainable: bool) -> None:
    from peftcore_torch.apply import for_each_layer

    for_each_layer(model, lambda layer: layer.set_trainable(adapter_name, trainable))


@hookimpl
def peftcore_delete_adapter(model: Any, adapter_name: str) -> None:
    from peftcore_torch.apply import delete_adapter

    delete_adapter(model, adapter_name)


@hookimpl
def peftcore_merge(model: Any, adapter_names: Sequence[str]) -> None:
    from peftcore_torch.apply import for_each_layer

    for_each_layer(model, lambda layer: layer.merge(list(adapter_names)))


@hookimpl
def peftcore_unmerge(model: Any) -> None:
    from peftcore_torch.apply import for_each_layer

    for_each_layer(model, lambda layer: layer.unmerge())


@hookimpl
def peftcore_unload(model: Any, merge: bool) -> Any:
    from peftcore_torch.apply import unload

    return unload(model, merge)


@hookimpl
def peftcore_bake(model: Any, adapter_name: str) -> None:
    from peftcore_torch.apply import bake

    bake(model, adapter_name)


@hookimpl
def peftcore_adapter_gradients(model: Any, adapter_name: str, loss: Any) -> Mapping[str, Any]:
    from peftcore_torch.apply import adapter_gradients

    return adapter_gradients(model, adapter_name, loss)


@hookimpl
def peftcore_count_parameters(model: Any) -> tuple:
    from peftcore_torch.apply import count_parameters

    return count_parameters(model)


@hookimpl
def peftcore_gate_values(model: Any, adapter_name: str) -> Mapping[str, Any]:
    from peftcore_torch.unipelt import gate_values

    return gate_values(model, adapter_name)


@hookimpl
def peftcore_build_toy_model(spec: Any, weights: Mapping[str, Any]) -> Any:
    if getattr(spec, "toy_family", "") == "attention_block":
        from peftcore_torch.attention_toy import build_attention_toy

        return build_attention_toy(spec, weights)
    from peftcore_torch.toys import build_toy

    return build_toy(spec, weights)


@hookimpl
def peftcore_toy_forward(model: Any, inputs: Any) -> Any:
    from peftcore_torch.toys import toy_forward

    return toy_forward(model, inputs)
