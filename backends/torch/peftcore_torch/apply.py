"""Build a RewritePlan into a torch model, and the model-wide adapter operations.

Op builders have the signature ``builder(model, modules, op, adapter_name)`` where
``modules`` maps every module path (wrappers included) to its module; a builder that
wraps a layer replaces it with :func:`replace_module`. Third-party plugins add builders
for their own op types through the ``peftcore_op_builders(backend="torch")`` hook, with
adapter layers subclassing :class:`~peftcore_torch.layers.AdapterLayer` so that export,
merge and the rest work on them unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from peftcore.errors import PlanError, did_you_mean
from peftcore.plan import AddLora, PlanOp, RewritePlan, SaveModule
from peftcore.methods.bitfit import TrainBias
from peftcore.methods.prompt_tuning import AddPrompt
from peftcore_torch.bitfit import BiasAdapter
from peftcore_torch.describe import walk
from peftcore_torch.layers import AdapterLayer
from peftcore_torch.lora import LoraEmbedding, LoraLinear, is_conv1d
from peftcore_torch.modules_to_save import SavedModule
from peftcore_torch.prompt import PromptEmbedding
from peftcore_torch.prompt_inputs import PromptInputHook, takes_token_inputs
from peftcore_torch.prefix import build_prefix
from peftcore_torch.unipelt import build_bottleneck_adapter, build_gate

Builder = Callable[[nn.Module, dict, Any, str], None]


def module_index(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def replace_module(model: nn.Module, modules: dict[str, nn.Module], path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` in ``model`` (and in the ``modules`` index)."""
    parent_path, _, child = path.rpartition(".")
    parent = modules[parent_path] if parent_path else model
    setattr(parent, child, new)
    modules[path] = new


def wrap_layer(
    model: nn.Module, modules: dict[str, nn.Module], path: str, wrapper_type: type[AdapterLayer]
) -> AdapterLayer:
    """The ``wrapper_type`` adapter layer at ``path``, wrapping the layer there if needed."""
    if path not in modules:
        raise PlanError(f"the model has no module {path!r}{did_you_mean(path, modules)}")
    current = modules[path]
    if isinstance(current, wrapper_type):
        return current
    if isinstance(current, AdapterLayer):
        raise PlanError(
            f"module {path!r} already carries a {type(current).__name__}; it cannot also take a {wrapper_type.__name__}"
        )
    wrapper = wrapper_type(current)
    replace_module(model, modules, path, wrapper)
    return wrapper


def build_freeze_base(model: nn.Module, modules: dict, op: PlanOp, adapter_name: str) -> None:
    adapter_params = {id(p) for layer in adapter_layers(model).values() for p in _adapter_params(layer)}
    for param in model.parameters():
        if id(param) not in adapter_params:
            param.requires_grad_(False)


def build_lora(model: nn.Module, modules: dict, op: AddLora, adapter_name: str) -> None:
    target = modules.get(op.path)
    base = target.base_layer if isinstance(target, AdapterLayer) else target
    if isinstance(base, nn.Embedding):
        wrapper_type: type[AdapterLayer] = LoraEmbedding
    elif isinstance(base, nn.Linear) or (base is not None and is_conv1d(base)):
        wrapper_type = LoraLinear
    else:
        kind = type(base).__name__ if base is not None else "missing"
        raise PlanError(f"torch backend cannot put LoRA on {op.path!r} ({kind}); it supports Linear, Conv1D, Embedding")
    wrap_layer(model, modules, op.path, wrapper_type).add(adapter_name, op)


def build_modules_to_save(model: nn.Module, modules: dict, op: SaveModule, adapter_name: str) -> None:
    wrap_layer(model, modules, op.path, SavedModule).add(adapter_name, op)


def build_bitfit(model: nn.Module, modules: dict, op: TrainBias, adapter_name: str) -> None:
    wrap_layer(model, modules, op.path, BiasAdapter).add(adapter_name, op)


def build_prompt(model: nn.Module, modules: dict, op: AddPrompt, adapter_name: str) -> None:
    target = modules.get(op.path)
    base = target.base_layer if isinstance(target, AdapterLayer) else target
    if not isinstance(base, nn.Embedding):
        kind = type(base).__name__ if base is not None else "missing"
        raise PlanError(f"torch backend prompts an nn.Embedding; {op.path!r} is {kind}")
    layer = wrap_layer(model, modules, op.path, PromptEmbedding)
    assert isinstance(layer, PromptEmbedding)
    if layer.input_hook is None and takes_token_inputs(model):
        layer.input_hook = PromptInputHook(model, layer)
    layer.add(adapter_name, op)


BUILDERS: dict[str, Builder] = {
    "freeze_base": build_freeze_base,
    "lora": build_lora,
    "modules_to_save": build_modules_to_save,
    "bitfit_bias": build_bitfit,
    "prompt_embedding": build_prompt,
    "prefix": build_prefix,
    "bottleneck_adapter": build_bottleneck_adapter,
    "gate": build_gate,
}


def apply_plan(model: nn.Module, plan: RewritePlan, builders: Mapping[str, Builder]) -> nn.Module:
    """Build every op of ``plan``. On failure the model is put back as it was: the
    adapter's tensors removed, new wrappers unwrapped, trainable flags restored."""
    missing = sorted({op.op for op in plan.ops} - set(builders))
    if missing:
        raise PlanError(f"torch backend has no builder for plan op(s) {missing}; is the plugin that adds them installed?")
    modules = module_index(model)
    wrappers_before = set(adapter_layers(model))
    trainable_before = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for op in plan.ops:
            builders[op.op](model, modules, op, plan.adapter_name)
    except BaseException:
        delete_adapter(model, plan.adapter_name)
        for path, layer in adapter_layers(model).items():
            if path not in wrappers_before:
                replace_module(model, modules, path, layer.unwrap(merge=False))
        for param, flag in trainable_before:
            param.requires_grad_(flag)
        raise
    return model


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer of ``model`` by path."""
    return {path: module for path, module in walk(model) if isinstance(module, AdapterLayer)}


def _adapter_params(layer: AdapterLayer) -> list[nn.Parameter]:
    base = {id(p) for p in layer.base_layer.parameters()}
    return [p for p in layer.parameters() if id(p) not in base]


def export_adapter(model: nn.Module, adapter_name: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for path, layer in adapter_layers(model).items():
        if layer.has_adapter(adapter_name):
            for name, tensor in layer.export(adapter_name).items():
                out[f"{path}.{name}"] = to_numpy(tensor)
    return out


def import_adapter(model: nn.Module, adapter_name: str, tensors: Mapping[str, np.ndarray]) -> None:
    grouped: dict[str, dict[str, np.ndarray]] = {}
    layers = adapter_layers(model)
    for key, value in tensors.items():
        path = next((p for p in sorted(layers, key=len, reverse=True) if key.startswith(p + ".")), None)
        if path is None:
            raise PlanError(f"tensor {key!r} belongs to no adapter layer of the model")
        grouped.setdefault(path, {})[key[len(path) + 1 :]] = value
    for path, layer_tensors in grouped.items():
        layers[path].load(adapter_name, layer_tensors)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; bfloat16 (which numpy lacks) becomes float32.

    The copy is made in torch before ``.numpy()``: a numpy view makes torch mark the
    parameter's own storage non-resizable, which breaks FSDP's resharding after export.
    """
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.to(torch.float32)
    host = tensor.cpu()
    return (host.clone() if host is tensor else host).numpy()


def for_each_layer(model: nn.Module, action: Callable[[AdapterLayer], None]) -> None:
    for layer in adapter_layers(model).values():
        action(layer)


def set_active(model: nn.Module, adapter_names: Sequence[str]) -> None:
    def activate(layer: AdapterLayer) -> None:
        layer.active_adapters = list(adapter_names)

    for_each_layer(model, activate)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    for_each_layer(model, lambda layer: layer.delete(adapter_name))


def unload(model: nn.Module, merge: bool) -> nn.Module:
    modules = module_index(model)
    for path, layer in adapter_layers(model).items():
        replace_module(model, modules, path, layer.unwrap(merge))
    return model


def bake(model: nn.Module, adapter_name: str) -> None:
    for layer in adapter_layers(model).values():
        if isinstance(layer, PromptEmbedding):
            layer.bake(adapter_name)


def adapter_gradients(model: nn.Module, adapter_name: str, loss: torch.Tensor) -> dict[str, np.ndarray]:
    """d loss / d tensor for every tensor of the adapter (zeros where it did not take part)."""
    entries = [
        (f"{path}.{layer.canonical_name(attr)}", layer, attr, getattr(layer, attr)[adapter_name])
        for path, layer in adapter_layers(model).items()
        for attr in layer.tensor_names(adapter_name)
    ]
    wanted = [entry for entry in entries if entry[3].requires_grad]
    grads = torch.autograd.grad(loss, [entry[3] for entry in wanted], allow_unused=True, retain_graph=False) if wanted else []
    by_name = {entry[0]: grad for entry, grad in zip(wanted, grads)}
    out: dict[str, np.ndarray] = {}
    for name, layer, attr, tensor in entries:
        grad = by_name.get(name)
        grad = torch.zeros_like(tensor) if grad is None else grad
        out[name] = to_numpy(layer.canonical_export(attr, grad))
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total
