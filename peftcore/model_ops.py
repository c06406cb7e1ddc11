"""The model-wide adapter operations, written once over a backend's runtime.

Each function takes the :class:`~peftcore.runtime.BackendRuntime` of the model's backend
and the native model, and works through the runtime's primitives and the adapter
layers' protocol (:class:`~peftcore.runtime.AdapterLayerProtocol`), so every backend
gets the same rules: a failed plan leaves the model as it was, tensors cross in
canonical layout as numpy arrays, merging and unloading go layer by layer.

An exception that is not a :class:`~peftcore.errors.PeftCoreError` raised by backend
code becomes a :class:`~peftcore.errors.BackendError` naming the backend and the
operation (:func:`guarded`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, cast

import numpy as np

from peftcore.capabilities import Bakes, RecordsGates, ReportsWeightDtype, RoutesRows, supports
from peftcore.errors import BackendError, PeftCoreError, PlanError
from peftcore.plan import PlanOp, RewritePlan
from peftcore.runtime import AdapterLayerProtocol, BackendRuntime, OpBuilder, OpBuilders

#: What plugin and backend code may raise that is a fault of that code, not a request to
#: stop: every ``Exception`` and ``SystemExit`` (a plugin's ``sys.exit()`` must not end the
#: user's process). ``KeyboardInterrupt`` still reaches the user.
PLUGIN_FAULTS: tuple[type[BaseException], ...] = (Exception, SystemExit)

#: The ``adapter_names`` entry for a row that runs the base model alone (HF PEFT's name).
BASE_ROW = "__base__"


@contextlib.contextmanager
def guarded(runtime: BackendRuntime, operation: str) -> Iterator[None]:
    """Turn a foreign exception from backend code into a BackendError naming both."""
    try:
        yield
    except PeftCoreError:
        raise
    except PLUGIN_FAULTS as exc:
        raise BackendError(f"backend {runtime.name!r} failed in {operation}: {type(exc).__name__}: {exc}") from exc


def adapter_layers(runtime: BackendRuntime, model: Any) -> dict[str, AdapterLayerProtocol]:
    """Every adapter layer of ``model`` by path."""
    return {path: layer for path, layer in runtime.layers(model) if runtime.is_adapter_layer(layer)}


def build_freeze_base(runtime: BackendRuntime) -> OpBuilder:
    """The ``freeze_base`` builder: every parameter that no adapter layer owns stops training."""

    def freeze(model: Any, layers: dict, op: PlanOp, adapter_name: str) -> None:
        owned = {id(t) for layer in adapter_layers(runtime, model).values() for t in runtime.adapter_parameters(layer)}
        for tensor in runtime.parameters(model):
            if id(tensor) not in owned:
                runtime.set_trainable(tensor, False)

    return freeze


def build_base_tensors(runtime: BackendRuntime) -> OpBuilder:
    """The builder of ops that train base parameters in place (:meth:`PlanOp.base_tensors`):
    it checks each parameter is there with the plan's shape; the adapter's trainable
    state (set afterwards) decides whether it trains."""

    def check(model: Any, layers: dict, op: PlanOp, adapter_name: str) -> None:
        specs = op.tensor_specs()
        for canonical, param_name in op.base_tensors().items():
            tensor = runtime.base_tensor(model, op.path, param_name)
            if tensor is None:
                raise PlanError(f"layer {op.path!r} has no {param_name!r} for the {op.op} op to train")
            expected = math.prod(specs[canonical].shape)
            if runtime.numel(tensor) != expected:
                raise PlanError(
                    f"layer {op.path!r}: its {param_name!r} has {runtime.numel(tensor)} values, the plan expects {expected}"
                )

    return check


def base_tensor_names(plan: RewritePlan) -> set[str]:
    """Canonical names of the base parameters ``plan`` trains in place."""
    return {f"{op.path}.{c}" if op.path else c for op in plan.ops for c in op.base_tensors()}


def base_tensor_entries(runtime: BackendRuntime, model: Any, plan: RewritePlan) -> list[tuple[str, Any, tuple]]:
    """``(canonical name, base tensor, canonical shape)`` of every base parameter ``plan`` trains in place."""
    entries = []
    for op in plan.ops:
        specs = op.tensor_specs()
        for canonical, param_name in op.base_tensors().items():
            name = f"{op.path}.{canonical}" if op.path else canonical
            entries.append((name, runtime.base_tensor(model, op.path, param_name), tuple(specs[canonical].shape)))
    return entries


def set_base_trainable(runtime: BackendRuntime, model: Any, plan: RewritePlan, trainable: bool) -> None:
    """Switch training of the base parameters ``plan`` trains in place."""
    with guarded(runtime, "set_trainable"):
        for _, tensor, _ in base_tensor_entries(runtime, model, plan):
            runtime.set_trainable(tensor, trainable)


def export_base_tensors(runtime: BackendRuntime, model: Any, plan: RewritePlan) -> dict[str, np.ndarray]:
    """The base parameters ``plan`` trains in place, canonically shaped numpy arrays."""
    with guarded(runtime, "exporting the adapter"):
        return {
            name: np.ascontiguousarray(runtime.to_numpy(tensor)).reshape(shape)
            for name, tensor, shape in base_tensor_entries(runtime, model, plan)
        }


def import_base_tensors(runtime: BackendRuntime, model: Any, plan: RewritePlan, tensors: Mapping[str, Any]) -> None:
    """Write the base parameters ``plan`` trains in place from ``tensors`` (canonical names)."""
    with guarded(runtime, "loading the adapter"):
        for name, tensor, shape in base_tensor_entries(runtime, model, plan):
            if name in tensors:
                runtime.write(tensor, np.asarray(tensors[name]).reshape(shape))
        runtime.model_changed(model)


def apply_plan(runtime: BackendRuntime, model: Any, plan: RewritePlan, builders: OpBuilders) -> None:
    """Build every op of ``plan`` with the builder of its class. On failure the model is
    put back as it was: the adapter's tensors removed, new adapter layers unwrapped,
    trainable flags restored."""
    missing = sorted({op.op for op in plan.ops if type(op) not in builders})
    if missing:
        raise PlanError(
            f"{runtime.name} backend has no builder for plan op(s) {missing}; is the plugin that adds them installed?"
        )
    with guarded(runtime, f"building the {plan.method} plan"):
        layers = dict(runtime.layers(model))
        layers[""] = model
        wrapped_before = set(adapter_layers(runtime, model))
        flags_before = [(t, runtime.is_trainable(t)) for t in runtime.parameters(model)]
    try:
        with guarded(runtime, f"building the {plan.method} plan"):
            for op in plan.ops:
                builders[type(op)](model, layers, op, plan.adapter_name)
    except BaseException:
        with guarded(runtime, f"undoing the {plan.method} plan"):
            for layer in adapter_layers(runtime, model).values():
                layer.delete(plan.adapter_name)
            for path, layer in adapter_layers(runtime, model).items():
                if path not in wrapped_before:
                    runtime.replace_layer(model, layers, path, layer.unwrap(merge=False))
            for tensor, flag in flags_before:
                runtime.set_trainable(tensor, flag)
        raise
    finally:
        with guarded(runtime, "model_changed"):
            runtime.model_changed(model)


def for_each_layer(runtime: BackendRuntime, model: Any, operation: str, action: Callable[[Any], None]) -> None:
    """Run ``action`` on every adapter layer, then tell the runtime the model changed."""
    with guarded(runtime, operation):
        for layer in adapter_layers(runtime, model).values():
            action(layer)
        runtime.model_changed(model)


def set_active(runtime: BackendRuntime, model: Any, adapter_names: Sequence[str]) -> None:
    def activate(layer: Any) -> None:
        # a layer that runs one adapter at a time lists only the one it holds (HF PEFT's wrapper)
        single = getattr(type(layer), "single_active", False)
        layer.active_adapters = [n for n in adapter_names if n in layer.adapter_names()] if single else list(adapter_names)

    for_each_layer(runtime, model, "set_adapter", activate)


def set_enabled(runtime: BackendRuntime, model: Any, enabled: bool) -> None:
    def switch(layer: Any) -> None:
        layer.disabled = not enabled

    for_each_layer(runtime, model, "enabling adapters" if enabled else "disabling adapters", switch)


def place_adapter_tensors(runtime: BackendRuntime, model: Any, adapter_name: str, upcast: bool, on_meta: bool) -> None:
    """See :meth:`BackendRuntime.place_adapter_tensors`; for every adapter layer."""
    if upcast or on_meta:
        for_each_layer(
            runtime, model, "placing adapter tensors",
            lambda layer: runtime.place_adapter_tensors(layer, adapter_name, upcast, on_meta),
        )


def enabled_states(runtime: BackendRuntime, model: Any) -> set[bool]:
    """Which of enabled (``True``) and disabled (``False``) the adapter layers are in."""
    return {not layer.disabled for layer in adapter_layers(runtime, model).values()}


def set_trainable(runtime: BackendRuntime, model: Any, adapter_name: str, trainable: bool) -> None:
    for_each_layer(runtime, model, "set_trainable", lambda layer: layer.set_trainable(adapter_name, trainable))


def delete_adapter(runtime: BackendRuntime, model: Any, adapter_name: str) -> None:
    for_each_layer(runtime, model, "delete_adapter", lambda layer: layer.delete(adapter_name))


def merge(runtime: BackendRuntime, model: Any, adapter_names: Sequence[str]) -> None:
    for_each_layer(runtime, model, "merge_adapter", lambda layer: layer.merge(list(adapter_names)))


def unmerge(runtime: BackendRuntime, model: Any) -> None:
    for_each_layer(runtime, model, "unmerge_adapter", lambda layer: layer.unmerge())


def unload(runtime: BackendRuntime, model: Any, merge: bool) -> Any:
    """Put every adapter layer's base layer back (with the active adapters folded in when
    ``merge``) and return the plain model."""
    with guarded(runtime, "merge_and_unload" if merge else "unload"):
        layers = dict(runtime.layers(model))
        for path, layer in adapter_layers(runtime, model).items():
            runtime.replace_layer(model, layers, path, layer.unwrap(merge))
        runtime.model_changed(model)
    return model


def layer_dtypes(runtime: BackendRuntime, model: Any) -> dict[str, str]:
    """Each adapter layer's base weight dtype as it is now (``"float16"``...), for layers
    that report it (:class:`~peftcore.capabilities.ReportsWeightDtype`); the graph's
    record may be stale."""
    out: dict[str, str] = {}
    with guarded(runtime, "reading layer dtypes"):
        for path, layer in adapter_layers(runtime, model).items():
            dtype = cast(ReportsWeightDtype, layer).weight_dtype() if supports(layer, ReportsWeightDtype) else None
            if dtype:
                out[path] = str(dtype)
    return out


def export_adapter(runtime: BackendRuntime, model: Any, adapter_name: str) -> dict[str, np.ndarray]:
    """The adapter's tensors as canonical-layout numpy arrays keyed by canonical name."""
    out: dict[str, np.ndarray] = {}
    with guarded(runtime, "exporting the adapter"):
        for path, layer in adapter_layers(runtime, model).items():
            if layer.has_adapter(adapter_name):
                for name, tensor in layer.export(adapter_name).items():
                    out[f"{path}.{name}"] = runtime.to_numpy(tensor)
    return out


def import_adapter(runtime: BackendRuntime, model: Any, adapter_name: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy canonical tensors (already matched to the plan) into the adapter's layers."""
    with guarded(runtime, "loading the adapter"):
        layers = adapter_layers(runtime, model)
    ordered = sorted(layers, key=len, reverse=True)
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        path = next((p for p in ordered if key.startswith(p + ".")), None)
        if path is None:
            raise PlanError(f"tensor {key!r} belongs to no adapter layer of the model")
        grouped.setdefault(path, {})[key[len(path) + 1 :]] = value
    with guarded(runtime, "loading the adapter"):
        for path, layer_tensors in grouped.items():
            layers[path].load(adapter_name, layer_tensors)
        runtime.model_changed(model)


def bake(runtime: BackendRuntime, model: Any, adapter_name: str) -> None:
    """Every layer that can bake a reparameterisation of the adapter does so."""

    def bake_layer(layer: Any) -> None:
        if supports(layer, Bakes):
            cast(Bakes, layer).bake(adapter_name)

    for_each_layer(runtime, model, "bake", bake_layer)


def gate_values(runtime: BackendRuntime, model: Any, adapter_name: str) -> dict[str, np.ndarray]:
    """Every gate value the adapter's layers recorded in the last forward, keyed
    ``<layer path>.<gate stem>``."""
    values: dict[str, np.ndarray] = {}
    with guarded(runtime, "reading gate values"):
        for path, layer in adapter_layers(runtime, model).items():
            if supports(layer, RecordsGates):
                for stem, value in cast(RecordsGates, layer).recorded_gates(adapter_name).items():
                    values[f"{path}.{stem}"] = np.asarray(value)
    return values


def adapter_gradients(runtime: BackendRuntime, model: Any, adapter_name: str, loss: Any) -> dict[str, np.ndarray]:
    """d loss / d tensor for every tensor of the adapter, in canonical layout (zeros where
    a tensor took no part); stored gradients are left alone."""
    entries = [
        (f"{path}.{layer.canonical_name(attr)}", layer, attr, layer.adapter_store(attr)[adapter_name])
        for path, layer in adapter_layers(runtime, model).items()
        for attr in layer.tensor_names(adapter_name)
    ]
    with guarded(runtime, "computing adapter gradients"):
        grads = runtime.gradients(loss, [entry[3] for entry in entries]) if entries else []
        out: dict[str, np.ndarray] = {}
        for (name, layer, attr, tensor), grad in zip(entries, grads):
            value = np.zeros(tuple(tensor.shape), np.float32) if grad is None else runtime.to_numpy(grad)
            out[name] = np.ascontiguousarray(runtime.to_numpy(layer.canonical_export(attr, value)))
    return out


def count_parameters(runtime: BackendRuntime, model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = total = 0
    with guarded(runtime, "counting parameters"):
        for tensor in runtime.parameters(model):
            size = runtime.numel(tensor)
            total += size
            if runtime.is_trainable(tensor):
                trainable += size
    return trainable, total


def set_batch_adapters(runtime: BackendRuntime, model: Any, adapter_names: Optional[Sequence[str]]) -> None:
    """Route each row of the following forward passes through the adapter it names
    (``None`` stops). Every adapter layer that would change a row's output must route
    rows; otherwise nothing is set and a BackendError names the layer."""
    with guarded(runtime, "routing rows"):
        layers = adapter_layers(runtime, model)
    if adapter_names is None:
        for layer in layers.values():
            if supports(layer, RoutesRows):
                cast(RoutesRows, layer).set_batch_adapters(None)
        return
    routing = runtime.row_routing(adapter_names)
    wanted = {name for name in adapter_names if name != BASE_ROW}
    routers: list[Any] = []
    for path, layer in layers.items():
        routes = supports(layer, RoutesRows) and cast(RoutesRows, layer).routes_rows()
        involved = bool(layer.adapters_to_run()) or bool(wanted & set(layer.adapter_names()))
        if involved and not routes:
            raise BackendError(
                f"layer {path!r} ({type(layer).__name__}) cannot run a batch whose rows use different adapters; "
                "only LoRA and modules_to_save layers can"
            )
        if routes:
            routers.append(layer)
    for layer in routers:
        layer.set_batch_adapters(routing)

