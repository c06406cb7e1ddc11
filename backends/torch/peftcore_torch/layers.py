"""The base class of every adapter layer the torch backend builds.

An :class:`AdapterLayer` is an ``nn.Module`` that wraps one base layer (kept as
``base_layer``) and holds each adapter's tensors in ``nn.ParameterDict`` attributes named
by ``adapter_tensor_names``, keyed by adapter name. Adding, deleting, export, import,
(un)freezing, merging with an exact unmerge and unwrapping are the core's
(:class:`~peftcore.adapter_layer.AdapterLayerCore`) over the backend's tensor primitives
(:mod:`peftcore_torch.tensors`), so a new layer type (ours or a third-party plugin's)
writes only ``new_adapter``, ``forward`` and ``delta_weight``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, TypeVar, cast

import torch
from torch import nn

from peftcore.adapter_layer import AdapterLayerCore, AdapterTensor
from peftcore_torch.tensors import TORCH_TENSORS

T = TypeVar("T", bound="AdapterLayer")


class AdapterLayer(AdapterLayerCore, nn.Module):
    """A base layer plus named adapters, as an ``nn.Module``. Subclasses set
    ``adapter_tensor_names`` (and ``canonical_names`` where an attribute's saved name
    differs), make an adapter's tensors in ``new_adapter`` and compute ``forward`` and
    ``delta_weight``; the lifecycle is :class:`~peftcore.adapter_layer.AdapterLayerCore`'s."""

    primitives = TORCH_TENSORS
    #: the child name the wrapped layer is kept under (HF PEFT's state-dict layout:
    #: ``base_layer``, and ``original_module`` for ``modules_to_save``)
    base_layer_attribute: ClassVar[str] = "base_layer"
    base_layer: nn.Module

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        setattr(self, self.base_layer_attribute, base_layer)
        self.init_adapter_state()

    @classmethod
    def wrap(cls: type[T], base_layer: Any, path: str) -> T:
        return cls(base_layer)

    def base_tensor(self, role: str) -> Optional[torch.Tensor]:
        tensor = getattr(self.base_layer, role, None)
        return tensor if isinstance(tensor, torch.Tensor) else None

    def set_base_tensor(self, role: str, tensor: Any) -> None:
        if tensor is None:
            self.base_layer.register_parameter(role, None)
        else:
            setattr(self.base_layer, role, tensor)

    def base_weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.base_layer.weight)

    def weight_dtype(self) -> str:
        """The base weight's dtype now (``"float16"``); for a base module without a
        ``weight`` of its own (a classification head of several layers, prefix tuning's
        parameter-free holder) its first parameter's, or ``""`` when it has none."""
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            weight = next(self.base_layer.parameters(), None)
        return str(weight.dtype).replace("torch.", "") if weight is not None else ""

    def new_tensor(self, *shape: int) -> nn.Parameter:
        """An uninitialised parameter on the base weight's device and dtype."""
        weight = self.base_weight()
        return nn.Parameter(torch.empty(shape, device=weight.device, dtype=weight.dtype))

    @property
    def weight(self) -> Any:
        """The base layer's weight, as HF PEFT's layers expose it: models read it through
        the wrapper (T5's feed-forward checks ``wo.weight.dtype``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Any:
        """The base layer's bias (None where it has none), as HF PEFT's layers expose it."""
        return getattr(self.base_layer, "bias", None)

    @property
    def adapter_layer_names(self) -> tuple:
        """HF PEFT's name for the attributes holding adapter tensors, by adapter name."""
        return tuple(self.adapter_tensor_names)

    @property
    def in_features(self) -> int:
        """The base layer's input size (HF PEFT's layer attribute; an embedding's is its
        number of rows)."""
        return base_features(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        """The base layer's output size (an embedding's is its dimension)."""
        return base_features(self.base_layer)[1]

    def write_adapter_tensor(self, entry: AdapterTensor, value: Any) -> None:
        target = entry.get()
        if target.is_meta and entry.put is not None:  # built with low_cpu_mem_usage: the loaded tensor becomes the parameter
            loaded = torch.as_tensor(value).to(device=self.base_weight().device, dtype=target.dtype, copy=True)
            entry.put(nn.Parameter(loaded, requires_grad=target.requires_grad))
            return
        super().write_adapter_tensor(entry, value)


_HALF_PRECISION = (torch.float16, torch.bfloat16)


def place_tensors(store: Any, adapter_name: str, upcast: bool, on_meta: bool) -> None:
    """Put ``store[adapter_name]`` (a parameter, or a module of them) in float32 if it is
    half precision and ``upcast``, and a parameter on the meta device if ``on_meta``
    (:meth:`AdapterLayer.load` then installs the loaded tensor in its place)."""
    item = store[adapter_name]
    if isinstance(item, nn.Module):
        if upcast:
            for module in item.modules():
                for name, param in list(module.named_parameters(recurse=False)):
                    if param.dtype in _HALF_PRECISION:
                        setattr(module, name, nn.Parameter(param.detach().float(), requires_grad=param.requires_grad))
        return
    if not isinstance(item, torch.Tensor):
        return
    dtype = torch.float32 if upcast and item.dtype in _HALF_PRECISION else item.dtype
    if on_meta:
        store[adapter_name] = nn.Parameter(torch.empty_like(item, device="meta", dtype=dtype), requires_grad=item.requires_grad)
    elif dtype != item.dtype:
        store[adapter_name] = nn.Parameter(item.detach().to(dtype), requires_grad=item.requires_grad)


def base_features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like or embedding layer; an
    ``AttributeError`` for a layer that has neither."""
    if isinstance(layer, nn.Embedding):
        return int(layer.num_embeddings), int(layer.embedding_dim)
    sizes: Any = layer
    if hasattr(sizes, "nx") and hasattr(sizes, "nf"):  # transformers' Conv1D
        return int(sizes.nx), int(sizes.nf)
    if hasattr(sizes, "in_features") and hasattr(sizes, "out_features"):
        return int(sizes.in_features), int(sizes.out_features)
    raise AttributeError(f"{type(layer).__name__} has no in_features/out_features")
