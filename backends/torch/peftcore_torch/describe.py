"""Describe a torch ``nn.Module`` as a :class:`~peftcore.graph.ModelGraph`.

Paths are torch module paths. A layer already wrapped by an adapter is described as
its base layer at the wrapper's path, so planning a second adapter sees the same graph
as the first. Shapes are canonical: a ``Conv1D`` weight, stored ``(in, out)``, is
reported ``(out, in)``; a bitsandbytes-quantised linear layer is reported with the
dense weight it stands for (its ``(out, in)`` shape and the dtype it was quantised from).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from torch import nn

from peftcore.graph import LayerNode, ModelGraph, kind_of
from peftcore_torch.layers import AdapterLayer
from peftcore_torch.quantised import dense_dtype, dense_shape, quantised_kind
from peftcore_torch.walk import innermost_base, is_conv1d, walk

#: torch's own module classes by IR kind, in the order they are tried.
_NATIVE_KINDS = (
    ("linear", lambda module: isinstance(module, nn.Linear) or is_conv1d(module)),
    ("embedding", lambda module: isinstance(module, nn.Embedding)),
    ("conv", lambda module: isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))),
    ("norm", lambda module: isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))),
)


def describe_model(model: nn.Module, extra_kinds: Optional[dict] = None) -> ModelGraph:
    """Build the ModelGraph of ``model``; ``extra_kinds`` maps extra classes to IR kinds."""
    extra_kinds = extra_kinds or {}
    layers = [describe_module(path, module, extra_kinds) for path, module in walk(model)]
    layers = _mark_shared_weights(model, layers)
    return ModelGraph(
        layers=tuple(layers),
        backend="torch",
        model_type=str(getattr(getattr(model, "config", None), "model_type", "") or ""),
        output_head=_output_head(model, layers),
        input_embedding=_input_embedding(model),
        model_config=_size_settings(getattr(model, "config", None)),
    )


#: The transformers config entries Hugging Face PEFT reads a model's sizes from.
_SIZE_KEYS = (
    "num_hidden_layers", "num_layers", "n_layer", "hidden_size", "n_embd", "d_model", "num_attention_heads",
    "n_head", "num_heads", "encoder_attention_heads", "num_key_value_heads", "head_dim",
)


def _size_settings(config: Any) -> dict[str, int]:
    """The integer size settings of a transformers config (its text config for a
    multimodal model), as ``config.to_dict()`` names them."""
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return {}
    data = to_dict()
    text = data.get("text_config")
    if isinstance(text, dict):
        data = text
    sizes = {k: v for k, v in data.items() if k in _SIZE_KEYS and isinstance(v, int) and not isinstance(v, bool)}
    layers = getattr(config, "num_hidden_layers", None)  # an alias on some configs (GPT-2's n_layer)
    if "num_hidden_layers" not in sizes and isinstance(layers, int) and not isinstance(layers, bool):
        sizes["num_hidden_layers"] = layers
    return sizes


def describe_module(path: str, module: nn.Module, extra_kinds: dict) -> LayerNode:
    # any module kind (a plugin's too): its attributes are read by name
    wrapped: Any = innermost_base(module)
    kind = _kind(wrapped, extra_kinds)
    params = {name: tuple(p.shape) for name, p in wrapped.named_parameters(recurse=False)}
    weight = getattr(wrapped, "weight", None)
    fields: dict[str, Any] = {}
    if kind == "linear":
        if is_conv1d(wrapped):
            in_features, out_features = wrapped.weight.shape
            params["weight"] = (int(out_features), int(in_features))
        else:
            in_features, out_features = wrapped.in_features, wrapped.out_features
        fields = {"in_features": int(in_features), "out_features": int(out_features)}
    elif kind == "embedding":
        fields = {"num_embeddings": int(wrapped.num_embeddings), "embedding_dim": int(wrapped.embedding_dim)}
    elif kind == "conv" and isinstance(wrapped, nn.modules.conv._ConvNd):
        fields = conv_geometry(wrapped)
    if kind == "other" and any(True for _ in wrapped.children()):
        kind = "container"
    dtype = str(weight.dtype).replace("torch.", "") if weight is not None and hasattr(weight, "dtype") else ""
    if quantised_kind(weight):
        params["weight"], dtype = dense_shape(weight), str(dense_dtype(weight)).replace("torch.", "")
    return LayerNode(
        path=path,
        kind=kind,
        type_name=type(wrapped).__name__,
        has_bias=getattr(wrapped, "bias", None) is not None,
        dtype=dtype,
        params=params,
        transposed=any(len(shape) == 3 for shape in params.values()) and bool(getattr(wrapped, "is_transposed", False)),
        **fields,
    )


def conv_geometry(conv: nn.modules.conv._ConvNd) -> dict[str, Any]:
    """A torch convolution's channels and geometry, as :class:`~peftcore.graph.LayerNode` fields."""
    return {
        "in_features": int(conv.in_channels),
        "out_features": int(conv.out_channels),
        "kernel_size": tuple(int(k) for k in conv.kernel_size),
        "stride": tuple(int(v) for v in conv.stride),
        "padding": _explicit_padding(conv),
        "dilation": tuple(int(v) for v in conv.dilation),
        "groups": int(conv.groups),
        "padding_mode": str(conv.padding_mode),
    }


def _explicit_padding(conv: nn.modules.conv._ConvNd) -> tuple:
    """The padding in sizes: one per axis, or a start and an end per axis where torch's
    ``"same"`` pads unevenly (as torch computes it), so an adapter for a ``"same"`` conv
    fits the same conv written with sizes (SINGA's, or torch's own)."""
    if not isinstance(conv.padding, str):
        return tuple(int(p) for p in conv.padding)
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    totals = [int(d) * (int(k) - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if all(total % 2 == 0 for total in totals):
        return tuple(total // 2 for total in totals)
    return tuple(v for total in totals for v in (total // 2, total - total // 2))


def _mark_shared_weights(model: nn.Module, layers: list[LayerNode]) -> list[LayerNode]:
    """Each layer whose ``weight`` is an earlier layer's (tied embeddings) names it."""
    first: dict[int, str] = {}
    marked = []
    for node, (_, module) in zip(layers, walk(model)):
        weight = getattr(innermost_base(module), "weight", None)
        if isinstance(weight, nn.Parameter):
            owner = first.setdefault(id(weight), node.path)
            if owner != node.path:
                node = dataclasses.replace(node, shares_weight_with=owner)
        marked.append(node)
    return marked


def _kind(module: nn.Module, extra_kinds: dict) -> str:
    return kind_of(module, extra_kinds, _NATIVE_KINDS)


def _input_embedding(model: nn.Module) -> Optional[str]:
    """Path of the layer transformers reports as the input embedding, if any."""
    getter = getattr(model, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        embedding = getter()
    except (NotImplementedError, AttributeError):
        return None
    for path, module in walk(model):
        if module is embedding or (isinstance(module, AdapterLayer) and module.base_layer is embedding):
            return path
    return None


def _output_head(model: nn.Module, layers: list[LayerNode]) -> Optional[str]:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            for path, module in walk(model):
                if module is head or (isinstance(module, AdapterLayer) and module.base_layer is head):
                    return path
    linears = [n.path for n in layers if n.kind == "linear"]
    return linears[-1] if linears else None
