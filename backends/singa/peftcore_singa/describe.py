"""Describe a SINGA model as a :class:`~peftcore.graph.ModelGraph`.

Paths are ``_layers`` paths: the chain of registered sublayer keys from the model
(``block.fc2``; ``seq.Linear_0`` for layers added with ``register_layers``). SINGA has no
``named_modules``, so :func:`walk` recurses over ``_layers`` itself, skipping an entry
shadowed by a plain attribute of the same name (``model.fc = None`` leaves the old layer
in ``_layers``).

SINGA layers create their parameters lazily, on the first forward. :func:`describe_model`
therefore runs one eval-mode forward with ``example_inputs`` when some layer is not
initialised yet; when none were given and no layer has run, it returns None (the shapes
are not known yet), and the PeftModel keeps its adapters pending until SINGA initialises
the layers (see :mod:`peftcore_singa.peft_model`). Shapes are canonical: ``layer.Linear`` stores W as ``(in, out)`` and is
reported ``(out, in)``; ``layer.Gemm`` stores ``(out, in)`` (``transB=True``, the default)
or ``(in, out)``; an Embedding table is ``(num_embeddings, dim)`` in both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import autograd, device, layer, tensor  # noqa: E402

from peftcore.errors import BackendError  # noqa: E402
from peftcore.graph import LayerNode, ModelGraph, kind_of  # noqa: E402
from peftcore_singa.layers import AdapterLayer  # noqa: E402
from peftcore_singa.tensors import DTYPE_NAMES  # noqa: E402
from peftcore_singa.unregistered import held_children, unreached_layers  # noqa: E402

#: SINGA's own layer classes by IR kind, in the order they are tried.
_NATIVE_KINDS = (
    ("linear", lambda node: is_linear(node)),
    ("embedding", lambda node: isinstance(node, layer.Embedding)),
    ("conv", lambda node: isinstance(node, (layer.Conv2d, layer.SeparableConv2d))),
    ("norm", lambda node: isinstance(node, layer.BatchNorm2d)),
)


@dataclass(frozen=True)
class ParamView:
    """A native tensor seen in canonical layout: ``shape`` is canonical; the native
    array is the canonical one transposed when ``transpose``, then reshaped."""

    tensor: Any
    shape: tuple
    transpose: bool = False

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        value = array.T if self.transpose else array
        return np.ascontiguousarray(value.reshape(self.shape))

    def to_native(self, array: np.ndarray) -> np.ndarray:
        value = np.asarray(array).reshape(self.shape)
        return np.ascontiguousarray((value.T if self.transpose else value).reshape(self.tensor.shape))


def children(node: Any) -> list[tuple[str, Any]]:
    """Sublayers of ``node`` that are really reachable as attributes: registered ones, then
    layers it holds outside ``_layers`` (a plain list, its ``__dict__``: see
    :mod:`peftcore_singa.unregistered`)."""
    shadowed = node.__dict__
    registered = [(key, child) for key, child in node._layers.items() if key not in shadowed]
    return registered + held_children(node)


def walk(model: Any, prefix: str = "", _seen: Optional[set] = None) -> Iterator[tuple[str, Any]]:
    """Every layer under ``model`` as ``(path, layer)``, depth first in registration order
    (each layer once, at the first path that reaches it); an adapter wrapper is yielded in
    place of its base layer and not descended into."""
    seen = _seen if _seen is not None else {id(model)}
    for key, child in children(model):
        if id(child) in seen:
            continue
        seen.add(id(child))
        path = f"{prefix}.{key}" if prefix else key
        yield path, child
        if not isinstance(child, AdapterLayer):
            yield from walk(child, path, seen)


def layer_index(model: Any) -> dict[str, Any]:
    """``{path: layer}`` for every layer, with ``""`` for the model itself."""
    return {"": model, **dict(walk(model))}


def is_linear_3d(node: Any) -> bool:
    """SINGA's transformer example's ``Linear3D`` (``examples/trans``; not part of the
    ``singa`` package, so known by its class name): ``y = x @ W (+ b)`` over the last axis
    of a 3-D input, W ``(in, out)`` as ``layer.Linear``'s."""
    return type(node).__name__ == "Linear3D" and isinstance(node, layer.Layer)


def is_linear(node: Any) -> bool:
    """A layer LoRA treats as linear: ``Linear``, ``Gemm`` or ``Linear3D``."""
    return isinstance(node, (layer.Linear, layer.Gemm)) or is_linear_3d(node)


def linear_features(base: Any) -> tuple[int, int]:
    """``(in_features, out_features)`` of an initialised ``Linear`` or ``Gemm``."""
    shape = tuple(int(d) for d in base.W.shape)
    if isinstance(base, layer.Gemm) and base.transB:
        return shape[1], shape[0]
    return shape[0], shape[1]


def native_params(node: Any) -> dict[str, ParamView]:
    """The parameters ``node`` owns directly (not its sublayers'), canonically named:
    ``weight``/``bias`` for Linear, Gemm and Embedding, the attribute name otherwise."""
    if not node._initialized:
        return {}
    if is_linear(node):
        in_f, out_f = linear_features(node)
        transpose = not (isinstance(node, layer.Gemm) and node.transB)
        views = {"weight": ParamView(node.W, (out_f, in_f), transpose)}
        if getattr(node, "b", None) is not None:
            b_shape = (out_f,) if int(np.prod(node.b.shape)) == out_f else tuple(node.b.shape)
            views["bias"] = ParamView(node.b, b_shape)
        return views
    if isinstance(node, layer.Embedding):
        return {"weight": ParamView(node.W, tuple(node.W.shape))}
    params = {id(t) for t in node.get_params().values()}
    return {
        attr: ParamView(value, tuple(value.shape))
        for attr, value in vars(node).items()
        if isinstance(value, tensor.Tensor) and id(value) in params
    }


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run a block in eval mode (``autograd.training`` is a global), restoring both flags."""
    previous_global = autograd.training
    previous_model = model.__dict__.get("training")
    autograd.training = False
    if previous_model is not None:
        model.training = False
    try:
        yield
    finally:
        autograd.training = previous_global
        if previous_model is not None:
            model.training = previous_model


def model_device(model: Any) -> Any:
    """The device of the model's first parameter, or SINGA's default (host) device."""
    for _, node in walk(model):
        if node._initialized and not isinstance(node, AdapterLayer):
            for t in node.get_params().values():
                return t.device
    return device.get_default_device()


def to_tensor(value: Any, dev: Any) -> Any:
    """A SINGA tensor for a numpy-like value (floats -> float32, ints -> int32), on ``dev``;
    SINGA tensors are returned as they are. Inputs never require gradients."""
    if isinstance(value, tensor.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype.kind in "biu":
        array, dtype = array.astype(np.int32), tensor.int32
    elif array.dtype.kind == "f":
        array, dtype = array.astype(np.float32), tensor.float32
    else:
        raise BackendError(f"cannot turn an array of dtype {array.dtype} into a SINGA tensor")
    out = tensor.Tensor(array.shape, dev, dtype, requires_grad=False, stores_grad=False)
    out.copy_from_numpy(np.ascontiguousarray(array))
    return out


def to_tensors(example_inputs: Any, dev: Any) -> tuple:
    """The model's positional inputs: one array/tensor, or a list/tuple of them."""
    if isinstance(example_inputs, (list, tuple)) and all(
        isinstance(v, (tensor.Tensor, np.ndarray)) for v in example_inputs
    ):
        return tuple(to_tensor(v, dev) for v in example_inputs)
    return (to_tensor(example_inputs, dev),)


def ensure_initialised(model: Any, example_inputs: Any) -> bool:
    """Initialise lazily built layers with one eval-mode forward on ``example_inputs``;
    return whether the layers know their shapes.

    Does nothing when every layer is initialised already. Without ``example_inputs``, a
    model none of whose layers has run yet does not know its shapes (False); in a model
    that has run (``compile`` or a batch), layers still uninitialised are ones its forward
    does not reach. Those stay uninitialised, are described as ``other`` and cannot be
    adapted.
    """
    lazy = [(path, node) for path, node in walk(model) if type(node).initialize is not layer.Layer.initialize]
    if all(node._initialized for _, node in lazy):
        return True
    if example_inputs is None:
        return any(node._initialized for _, node in lazy)
    inputs = to_tensors(example_inputs, model_device(model))
    with eval_mode(model):
        model.forward(*inputs)
    return True


def describe_model(model: Any, example_inputs: Any = None, extra_kinds: Optional[dict] = None) -> Optional[ModelGraph]:
    """Build the ModelGraph of ``model``; ``extra_kinds`` maps extra layer classes to IR kinds.

    None when no layer has run yet and no ``example_inputs`` were given: the shapes are
    not known until SINGA initialises the layers (compile or the first forward)."""
    if not ensure_initialised(model, example_inputs):
        return None
    extra_kinds = extra_kinds or {}
    walked = list(walk(model))
    layers = [describe_layer(path, node, extra_kinds) for path, node in walked]
    linears = [n.path for n in layers if n.kind == "linear"]
    embeddings = [n.path for n in layers if n.kind == "embedding"]
    return ModelGraph(
        layers=tuple(layers),
        backend="singa",
        model_type=str(getattr(model, "model_type", "") or ""),
        output_head=linears[-1] if linears else None,
        input_embedding=input_embedding(model, embeddings, example_inputs),
        unreached=tuple(unreached_layers(walked, model)),
    )


def input_embedding(model: Any, embeddings: list[str], example_inputs: Any) -> Optional[str]:
    """The path of the embedding layer the model's forward calls first: the only one, or,
    among several, the first to run in an eval-mode forward on ``example_inputs`` (None
    without them, or when forward reaches none of them through its layers' calls)."""
    if len(embeddings) <= 1 or example_inputs is None:
        return embeddings[0] if len(embeddings) == 1 else None
    index = layer_index(model)
    called: list[str] = []
    for path in embeddings:
        node = index[path]

        def recording_forward(*args: Any, _path: str = path, _forward: Any = node.forward, **kwargs: Any) -> Any:
            called.append(_path)
            return _forward(*args, **kwargs)

        node.__dict__["forward"] = recording_forward  # shadows the class's forward for one call
    try:
        with eval_mode(model):
            model.forward(*to_tensors(example_inputs, model_device(model)))
    finally:
        for path in embeddings:
            index[path].__dict__.pop("forward", None)
    return called[0] if called else None


def describe_layer(path: str, node: Any, extra_kinds: dict) -> LayerNode:
    base = node.base_layer if isinstance(node, AdapterLayer) else node
    kind = layer_kind(base, extra_kinds)
    type_name = type(base).__name__
    if kind in ("linear", "embedding", "conv") and not base._initialized:
        kind, type_name = "other", f"{type_name} (uninitialised: no forward has reached it)"
    views = native_params(base)
    fields: dict[str, Any] = {}
    if kind == "linear":
        in_f, out_f = linear_features(base)
        fields = {"in_features": in_f, "out_features": out_f}
    elif kind == "embedding":
        fields = {"num_embeddings": int(base.W.shape[0]), "embedding_dim": int(base.W.shape[1])}
    elif kind == "conv" and isinstance(base, layer.Conv2d):
        fields = conv_geometry(base)
    if kind == "other" and children(base):
        kind = "container"
    weight = views.get("weight") or next(iter(views.values()), None)
    return LayerNode(
        path=path,
        kind=kind,
        type_name=type_name,
        has_bias="bias" in views,
        dtype=DTYPE_NAMES.get(weight.tensor.dtype, "") if weight is not None else "",
        params={name: view.shape for name, view in views.items()},
        **fields,
    )


def conv_geometry(conv: Any) -> dict[str, Any]:
    """An initialised ``layer.Conv2d``'s channels and geometry, as
    :class:`~peftcore.graph.LayerNode` fields (torch's names). Uneven padding (SINGA's
    ``odd_padding``, from a 4-value padding or a ``SAME_*`` pad mode) is given as a
    start and an end per axis."""
    pad_h, pad_w = (int(p) for p in conv.padding)
    odd = tuple(int(p) for p in conv.odd_padding)
    padding: tuple = (pad_h, pad_w)
    if any(odd):
        padding = (pad_h + odd[0], pad_h + odd[1], pad_w + odd[2], pad_w + odd[3])
    return {
        "in_features": int(conv.in_channels),
        "out_features": int(conv.nb_kernels),
        "kernel_size": tuple(int(k) for k in conv.kernel_size),
        "stride": tuple(int(s) for s in conv.stride),
        "padding": padding,
        "dilation": (1, 1),  # SINGA's Conv2d takes no other
        "groups": int(conv.group),
        "padding_mode": "zeros",
    }


def layer_kind(node: Any, extra_kinds: dict) -> str:
    return kind_of(node, extra_kinds, _NATIVE_KINDS)
