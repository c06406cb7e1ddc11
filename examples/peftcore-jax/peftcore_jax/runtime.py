"""The JAX runtime: tensor primitives over ``nnx.Variable`` and the model primitives.

A tensor at the seam is an ``nnx.Variable`` (an ``nnx.Param`` for parameters). JAX
arrays are immutable, but a Variable is a mutable holder: a write gives it a new array
(``set_value``), so it keeps its identity and the seam's writes happen "in place" on the
Variable. A frozen copy (``clone``) is just the Variable's current array, which nothing
can change. Whether a parameter trains is the Variable's ``trainable`` metadata (True
when absent); :data:`TRAINABLE` is the nnx filter an optimizer takes
(``nnx.Optimizer(model, tx, wrt=TRAINABLE)``).
"""

from __future__ import annotations

import hashlib
from typing import Any, Hashable, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftcore.adapter_layer import AdapterLayerCore
from peftcore.errors import AdapterError, BackendError
from peftcore.graph import LayerNode, ModelGraph
from peftcore.peft_model import HandlePeftModel
from peftcore.primitives import TensorPrimitives
from peftcore.runtime import BackendInfo, BackendRuntime, OpBuilders

NAME = "jax"
FRAMEWORK = "JAX (Flax NNX)"
#: Methods this backend does not build, and why (the core refuses them up front). LoRA's
#: target_parameters and trainable_token_indices are not listed under "lora" (that would
#: refuse all of LoRA, whose modules_to_save op this backend lacks too): their ops (param_lora,
#: trainable_tokens) have no builder here, which refuses them before anything is built.
LIMITATIONS = {
    "prefix_tuning": "the jax backend has no attention layers to give past key/values to",
    "p_tuning": "the jax backend builds no prompt encoder (MLP/LSTM)",
    "unipelt": "the jax backend has no attention layers",
    "trainable_tokens": "no trainable_tokens builder: this example backend's nnx.Embed takes LoRA and prompts only",
    "dora": "the jax backend's LoRA layers have no magnitude vector (LoraConfig(use_dora=True)); use the torch backend",
}
#: Why LoRA on an ``nnx.Conv`` is refused (at build time: ``LIMITATIONS`` is by method, and
#: LoRA on ``nnx.Linear``/``nnx.Embed`` is built).
CONV_LORA_LIMITATION = (
    "LoRA on convolutions (nnx.Conv) is not built by this example backend: nnx.Conv's kernel is "
    "(*kernel_size, in / groups, out) with padding forms and input dilation torch lacks, which need a LoRA "
    "layer of their own; LoRA on nnx.Linear and nnx.Embed is built"
)


def TRAINABLE(path: Any, value: Any) -> bool:  # noqa: N802 - an nnx filter, named like nnx.Param
    """The nnx filter of the parameters peftcore leaves trainable."""
    return isinstance(value, nnx.Param) and bool(value.get_metadata().get("trainable", True))


class JaxTensors(TensorPrimitives):
    """Tensor primitives on ``nnx.Variable`` (numpy and jax arrays are read as values)."""

    name = NAME

    def to_numpy(self, t: Any) -> np.ndarray:
        value = t.get_value() if isinstance(t, nnx.Variable) else t
        array = np.array(jax.device_get(value), copy=True)
        return array.astype(np.float32) if array.dtype == jnp.bfloat16 else array

    def numel(self, t: Any) -> int:
        return int(np.prod(self.shape(t)))

    def dtype_name(self, t: Any) -> str:
        return str(jnp.dtype(t.dtype))

    def is_trainable(self, t: Any) -> bool:
        return TRAINABLE((), t)

    def set_trainable(self, t: Any, trainable: bool) -> None:
        t.set_metadata("trainable", bool(trainable))

    def write(self, t: Any, value: Any) -> Any:
        new = jnp.asarray(value.get_value() if isinstance(value, nnx.Variable) else value)
        if new.size != self.numel(t):
            raise AdapterError(f"cannot write {new.size} values into a tensor of shape {self.shape(t)}")
        t.set_value(new.reshape(self.shape(t)).astype(t.dtype))
        return t

    def clone(self, t: Any) -> Any:
        return t.get_value()  # a jax array: immutable, so an exact snapshot

    def add_into(self, t: Any, deltas: Sequence[Any], sign: int) -> Any:
        current = t.get_value()
        wide = jnp.promote_types(current.dtype, jnp.float32)
        total = sum(jnp.asarray(d, dtype=wide).reshape(current.shape) for d in deltas)
        t.set_value((current.astype(wide) + sign * total).astype(current.dtype))
        return t

    def fingerprint(self, t: Any) -> Hashable:
        array = np.ascontiguousarray(self.to_numpy(t))
        return array.dtype.str, array.shape, hashlib.blake2b(array.tobytes(), digest_size=16).digest()


JAX_TENSORS = JaxTensors()


# -- walking NNX models ----------------------------------------------------------------------
def children(node: Any) -> Iterator[tuple[str, Any]]:
    """``(name, child module)`` of ``node`` in attribute order (list items by index); an
    adapter layer's wrapped base layer is not a child."""
    items = vars(node).items() if isinstance(node, nnx.Module) else enumerate(node)
    for key, value in items:
        if isinstance(node, AdapterLayerCore) and key == "base_layer":
            continue
        if isinstance(value, nnx.Module):
            yield str(key), value
        elif isinstance(value, (list, tuple, nnx.List)) and any(isinstance(v, nnx.Module) for v in value):
            for index, item in children(value):
                yield f"{key}.{index}", item


def walk(model: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every module under ``model`` by dotted path, parents first (not ``model`` itself)."""
    for name, child in children(model):
        path = f"{prefix}{name}"
        yield path, child
        if not isinstance(child, AdapterLayerCore):
            yield from walk(child, path + ".")


def replace_layer(model: Any, layers: dict, path: str, new: Any) -> None:
    """Put ``new`` where the module at ``path`` is (an attribute or a list slot)."""
    holder: Any = model
    *parents, last = path.split(".")
    for part in parents:
        holder = holder[int(part)] if isinstance(holder, (list, nnx.List)) else getattr(holder, part)
    if isinstance(holder, (list, nnx.List)):
        holder[int(last)] = new
    else:
        setattr(holder, last, new)
    layers[path] = new


def describe_layer(path: str, layer: Any) -> LayerNode:
    """The IR node of one module, in canonical (torch) shapes."""
    base = layer.base_layer if isinstance(layer, AdapterLayerCore) else layer
    if isinstance(base, nnx.Linear):
        in_f, out_f = (int(d) for d in base.kernel.shape)
        params = {"weight": (out_f, in_f), **({"bias": (out_f,)} if base.bias is not None else {})}
        return LayerNode(path, "linear", "Linear", in_features=in_f, out_features=out_f, has_bias="bias" in params,
                         dtype=JAX_TENSORS.dtype_name(base.kernel), params=params)
    if isinstance(base, nnx.Embed):
        vocab, dim = (int(d) for d in base.embedding.shape)
        return LayerNode(path, "embedding", "Embed", num_embeddings=vocab, embedding_dim=dim,
                         dtype=JAX_TENSORS.dtype_name(base.embedding), params={"weight": (vocab, dim)})
    if isinstance(base, nnx.Conv):
        return LayerNode(path, "conv", "Conv", **_conv_geometry(base))
    kind = "container" if next(children(base), None) is not None else "other"
    return LayerNode(path, kind, type(base).__name__)


def _conv_geometry(conv: Any) -> dict[str, Any]:
    """An ``nnx.Conv``'s channels and geometry in the IR's (torch's) terms."""
    axes = len(conv.kernel_size)

    def sizes(value: Any) -> tuple:
        return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value or 1),) * axes

    padding = conv.padding
    if isinstance(padding, str):
        padding = padding.lower()
    elif isinstance(padding, (list, tuple)):  # per axis: a size or a (start, end) pair
        padding = tuple(int(v) for item in padding for v in (item if isinstance(item, (list, tuple)) else (item,)))
    else:
        padding = sizes(padding)
    return {"in_features": int(conv.in_features), "out_features": int(conv.out_features),
            "kernel_size": sizes(conv.kernel_size), "stride": sizes(conv.strides), "padding": padding,
            "dilation": sizes(conv.kernel_dilation), "groups": int(conv.feature_group_count)}


class JaxRuntime(JaxTensors, BackendRuntime):
    """JAX with Flax NNX: models are ``nnx.Module`` objects, tensors ``nnx.Variable``."""

    framework = FRAMEWORK

    def __init__(self, version: str) -> None:
        self.version = version

    def info(self) -> BackendInfo:
        return BackendInfo(NAME, FRAMEWORK, available=True, version=self.version, limitations=dict(LIMITATIONS))

    def detect(self, model: Any) -> bool:
        return isinstance(model, nnx.Module)

    def describe(self, model: Any, example_inputs: Any, extra_kinds: Mapping[Any, str]) -> Optional[ModelGraph]:
        nodes = [describe_layer(path, layer) for path, layer in walk(model)]
        embeddings = [n.path for n in nodes if n.kind == "embedding"]
        linears = [n.path for n in nodes if n.kind == "linear"]
        return ModelGraph(tuple(nodes), backend=NAME, model_type=type(model).__name__,
                          input_embedding=embeddings[0] if embeddings else None,
                          output_head=linears[-1] if linears else None)

    def peft_model_class(self) -> type:
        return HandlePeftModel

    def layers(self, model: Any) -> Iterable[tuple[str, Any]]:
        return list(walk(model))

    def replace_layer(self, model: Any, layers: dict, path: str, new: Any) -> None:
        replace_layer(model, layers, path, new)

    def parameters(self, model: Any) -> list[Any]:
        found: dict[int, Any] = {}
        for _, value in nnx.iter_graph(model):
            if isinstance(value, nnx.Param):
                found.setdefault(id(value), value)
        return list(found.values())

    def adapter_parameters(self, layer: Any) -> list[Any]:
        return [store[a] for name in layer.adapter_tensor_names for store in [getattr(layer, name)] for a in store]

    def base_tensor(self, model: Any, path: str, name: str) -> Any:
        layer = dict(walk(model)).get(path) if path else model
        if layer is None:
            raise BackendError(f"the model has no layer {path!r}")
        base = layer.base_layer if isinstance(layer, AdapterLayerCore) else layer
        if name == "weight" and not isinstance(base, nnx.Embed):  # a kernel is (in, out), not canonical
            raise BackendError(f"the jax backend trains no linear kernel in place ({path!r})")
        return getattr(base, "embedding" if name == "weight" else name, None)

    def builders(self) -> OpBuilders:
        from peftcore_jax.layers import BUILDERS

        return BUILDERS
