"""Build a RewritePlan into a SINGA model, and the model-wide adapter operations.

Op builders have the signature ``builder(model, layers, op, adapter_name)`` where
``layers`` maps every layer path (wrappers included, ``""`` for the model) to its layer;
a builder that wraps a layer replaces it with :func:`replace_layer`. Third-party plugins
add builders for their own op types through the ``peftcore_op_builders(backend="singa")``
hook, with adapter layers subclassing :class:`~peftcore_singa.layers.AdapterLayer` so
that export, merge and the rest work on them unchanged.

Every operation that changes what a training step computes (apply, freezing, switching
or deleting adapters, merging, unloading) also drops a graph recorded by a SINGA
``Model`` in graph mode (see :func:`invalidate_graph`), so the next ``train_one_batch``
records the new computation instead of replaying the old one.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import layer  # noqa: E402

from peftcore.errors import PlanError, did_you_mean  # noqa: E402
from peftcore.methods.bitfit import TrainBias  # noqa: E402
from peftcore.methods.prompt_tuning import AddPrompt  # noqa: E402
from peftcore.plan import AddLora, PlanOp, RewritePlan, SaveModule  # noqa: E402
from peftcore_singa.bitfit import BiasAdapter, base_bias  # noqa: E402
from peftcore_singa.describe import layer_index, walk  # noqa: E402
from peftcore_singa.layers import AdapterLayer, set_trainable_flags, to_numpy  # noqa: E402
from peftcore_singa.lora import LoraEmbedding, LoraLinear  # noqa: E402
from peftcore_singa.modules_to_save import SavedModule  # noqa: E402
from peftcore_singa.prompt import PromptEmbedding  # noqa: E402

Builder = Callable[[Any, dict, Any, str], None]


def replace_layer(model: Any, layers: dict[str, Any], path: str, new: Any) -> None:
    """Put ``new`` at ``path``: same ``_layers`` key (so the same place in the order),
    same layer name, same parent. Python lists, tuples and dicts held by the parent that
    reference the old layer (how ``register_layers`` users often keep them) are updated too."""
    parent_path, _, key = path.rpartition(".")
    parent = layers[parent_path] if parent_path else model
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


def wrap_layer(model: Any, layers: dict[str, Any], path: str, wrapper_type: type[AdapterLayer]) -> AdapterLayer:
    """The ``wrapper_type`` adapter layer at ``path``, wrapping the layer there if needed."""
    if path not in layers or not path:
        raise PlanError(f"the model has no layer {path!r}{did_you_mean(path, [p for p in layers if p])}")
    current = layers[path]
    if isinstance(current, wrapper_type):
        return current
    if isinstance(current, AdapterLayer):
        raise PlanError(
            f"layer {path!r} already carries a {type(current).__name__}; it cannot also take a {wrapper_type.__name__}"
        )
    wrapper = wrapper_type(current, path)
    replace_layer(model, layers, path, wrapper)
    return wrapper


def build_freeze_base(model: Any, layers: dict, op: PlanOp, adapter_name: str) -> None:
    adapter_ids = {id(t) for wrapper in adapter_layers(model).values() for t in wrapper.adapter_tensors()}
    for t in all_params(model):
        if id(t) not in adapter_ids:
            set_trainable_flags(t, False)


def build_lora(model: Any, layers: dict, op: AddLora, adapter_name: str) -> None:
    target = layers.get(op.path)
    base = target.base_layer if isinstance(target, AdapterLayer) else target
    if isinstance(base, layer.Embedding):
        wrapper_type: type[AdapterLayer] = LoraEmbedding
    elif isinstance(base, (layer.Linear, layer.Gemm)):
        wrapper_type = LoraLinear
    else:
        kind = type(base).__name__ if base is not None else "missing"
        raise PlanError(f"singa backend cannot put LoRA on {op.path!r} ({kind}); it supports Linear, Gemm, Embedding")
    if not base._initialized:
        raise PlanError(f"layer {op.path!r} is not initialised (no forward has reached it); pass example_inputs")
    wrap_layer(model, layers, op.path, wrapper_type).add(adapter_name, op)


def build_modules_to_save(model: Any, layers: dict, op: SaveModule, adapter_name: str) -> None:
    wrap_layer(model, layers, op.path, SavedModule).add(adapter_name, op)


def _initialised_base(layers: dict, path: str) -> Any:
    target = layers.get(path)
    base = target.base_layer if isinstance(target, AdapterLayer) else target
    if base is not None and not base._initialized:
        raise PlanError(f"layer {path!r} is not initialised (no forward has reached it); pass example_inputs")
    return base


def build_bitfit(model: Any, layers: dict, op: TrainBias, adapter_name: str) -> None:
    base = _initialised_base(layers, op.path)
    if base is not None and not isinstance(base, (layer.Linear, layer.Gemm)) and base_bias(base) is None:
        raise PlanError(
            f"singa backend trains the bias of Linear, Gemm and layers with a 'bias' tensor; "
            f"{op.path!r} ({type(base).__name__}) has none"
        )
    wrap_layer(model, layers, op.path, BiasAdapter).add(adapter_name, op)


def build_prompt(model: Any, layers: dict, op: AddPrompt, adapter_name: str) -> None:
    base = _initialised_base(layers, op.path)
    if not isinstance(base, layer.Embedding):
        kind = type(base).__name__ if base is not None else "missing"
        raise PlanError(f"singa backend prompts a layer.Embedding; {op.path!r} is {kind}")
    wrap_layer(model, layers, op.path, PromptEmbedding).add(adapter_name, op)


BUILDERS: dict[str, Builder] = {
    "freeze_base": build_freeze_base,
    "lora": build_lora,
    "modules_to_save": build_modules_to_save,
    "bitfit_bias": build_bitfit,
    "prompt_embedding": build_prompt,
}


def apply_plan(model: Any, plan: RewritePlan, builders: Mapping[str, Builder]) -> Any:
    """Build every op of ``plan``. On failure the model is put back as it was: the
    adapter's tensors removed, new wrappers unwrapped, trainable flags restored."""
    missing = sorted({op.op for op in plan.ops} - set(builders))
    if missing:
        raise PlanError(
            f"singa backend has no builder for plan op(s) {missing}; is the plugin that adds them installed?"
        )
    layers = layer_index(model)
    wrappers_before = set(adapter_layers(model))
    flags_before = [(t, t.stores_grad, t.requires_grad) for t in all_params(model)]
    try:
        for op in plan.ops:
            builders[op.op](model, layers, op, plan.adapter_name)
    except BaseException:
        delete_adapter(model, plan.adapter_name)
        for path, wrapper in adapter_layers(model).items():
            if path not in wrappers_before:
                replace_layer(model, layers, path, wrapper.base_layer)
        for t, stores, requires in flags_before:
            t.stores_grad, t.requires_grad = stores, requires
        raise
    finally:
        invalidate_graph(model)
    return model


def adapter_layers(model: Any) -> dict[str, AdapterLayer]:
    """Every adapter layer of ``model`` by path."""
    return {path: node for path, node in walk(model) if isinstance(node, AdapterLayer)}


def all_params(model: Any) -> list[Any]:
    """Every parameter tensor of the model, once each: ``get_params()`` of the model and
    of every initialised layer (a container that never ran its own forward is skipped by
    SINGA's ``get_params``, its sublayers are not skipped here)."""
    found: dict[int, Any] = {}
    sources = [model] + [node for _, node in walk(model)]
    for node in sources:
        if node is model or node._initialized:
            for t in node.get_params().values():
                found.setdefault(id(t), t)
    return list(found.values())


def export_adapter(model: Any, adapter_name: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for path, wrapper in adapter_layers(model).items():
        if wrapper.has_adapter(adapter_name):
            for name, array in wrapper.export(adapter_name).items():
                out[f"{path}.{name}"] = array
    return out


def adapter_gradients(model: Any, adapter_name: str, loss: Any) -> dict[str, np.ndarray]:
    """d loss / d tensor for every tensor of the adapter, canonical layout (zeros where a
    tensor did not take part). Runs SINGA's backward without any optimizer step."""
    from singa import autograd

    entries = {}
    for path, wrapper in adapter_layers(model).items():
        for attr in wrapper.tensor_names(adapter_name):
            entries[id(getattr(wrapper, attr)[adapter_name])] = (path, wrapper, attr)
    found: dict[int, np.ndarray] = {}
    for param, grad in autograd.backward(loss):
        if id(param) in entries:
            found[id(param)] = to_numpy(grad)
    out: dict[str, np.ndarray] = {}
    for key, (path, wrapper, attr) in entries.items():
        stored = getattr(wrapper, attr)[adapter_name]
        grad = found.get(key, np.zeros(tuple(stored.shape), dtype=np.float32))
        out[f"{path}.{wrapper.canonical_name(attr)}"] = np.ascontiguousarray(wrapper.canonical_export(attr, grad))
    return out


def import_adapter(model: Any, adapter_name: str, tensors: Mapping[str, np.ndarray]) -> None:
    grouped: dict[str, dict[str, np.ndarray]] = {}
    wrappers = adapter_layers(model)
    ordered = sorted(wrappers, key=len, reverse=True)
    for key, value in tensors.items():
        path = next((p for p in ordered if key.startswith(p + ".")), None)
        if path is None:
            raise PlanError(f"tensor {key!r} belongs to no adapter layer of the model")
        grouped.setdefault(path, {})[key[len(path) + 1 :]] = value
    for path, layer_tensors in grouped.items():
        wrappers[path].load(adapter_name, layer_tensors)


def for_each_layer(model: Any, action: Callable[[AdapterLayer], None]) -> None:
    for wrapper in adapter_layers(model).values():
        action(wrapper)
    invalidate_graph(model)


def set_active(model: Any, adapter_names: Sequence[str]) -> None:
    def activate(wrapper: AdapterLayer) -> None:
        wrapper.active_adapters = list(adapter_names)

    for_each_layer(model, activate)


def delete_adapter(model: Any, adapter_name: str) -> None:
    for_each_layer(model, lambda wrapper: wrapper.delete(adapter_name))


def unload(model: Any, merge: bool) -> Any:
    layers = layer_index(model)
    for path, wrapper in adapter_layers(model).items():
        replace_layer(model, layers, path, wrapper.unwrap(merge))
    invalidate_graph(model)
    return model


def bake(model: Any, adapter_name: str) -> None:
    """Turn the adapter's residual prompt MLPs into plain prompts (see :meth:`PromptEmbedding.bake`)."""
    for wrapper in adapter_layers(model).values():
        if isinstance(wrapper, PromptEmbedding):
            wrapper.bake(adapter_name)
    invalidate_graph(model)


def count_parameters(model: Any) -> tuple[int, int]:
    """``(trainable, total)``; trainable means ``stores_grad`` (what SINGA optimizers update)."""
    trainable = total = 0
    for t in all_params(model):
        size = int(np.prod(t.shape))
        total += size
        if t.stores_grad:
            trainable += size
    return trainable, total


def invalidate_graph(model: Any) -> None:
    """Drop the graph a SINGA ``Model`` recorded in graph mode (``use_graph=True``), so
    the next ``train_one_batch`` re-records it with the model as it is now."""
    if not model.__dict__.get("_buffered", False):
        return
    model._buffered = False
    model._results = None
    seen: set[int] = set()
    for t in all_params(model):
        dev = t.device
        if dev.id() not in seen:
            seen.add(dev.id())
            dev.ResetGraph()
