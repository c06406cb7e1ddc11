"""The base class of every adapter layer the torch backend builds.

An :class:`AdapterLayer` wraps one base layer (kept as ``base_layer``) and holds each
adapter's tensors in ``nn.ParameterDict`` attributes named by ``adapter_tensor_names``,
keyed by adapter name. Export, import, delete and (un)freezing are generic over those
dicts, so a new layer type (ours or a third-party plugin's) only writes its forward,
``add`` and ``delta_weight``.

Merging keeps a copy of the original weight while merged and restores it on unmerge,
so any number of merge/unmerge cycles leaves the base weights bit-identical. A weight
changed while merged (an in-place edit, ``load_state_dict``, a dtype change) is detected
(tensor version, identity and a fingerprint of its bits) and then unmerged by
subtracting the adapters' delta, with a warning, so the change is kept.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Mapping, Optional, cast

import torch
from torch import nn

from peftcore.adapter_state import AdapterBookkeeping
from peftcore.errors import AdapterError, PlanError


class AdapterLayer(AdapterBookkeeping, nn.Module):
    """A base layer plus named adapters. Subclasses set ``adapter_tensor_names`` (and
    ``canonical_names`` where an attribute's saved name differs); the bookkeeping rules
    come from :class:`~peftcore.adapter_state.AdapterBookkeeping`."""

    #: the child name the wrapped layer is kept under (HF PEFT's state-dict layout:
    #: ``base_layer``, and ``original_module`` for ``modules_to_save``)
    base_layer_attribute: ClassVar[str] = "base_layer"
    base_layer: nn.Module
    #: HF PEFT's names of a layer's other per-adapter attributes (dicts by adapter name)
    other_param_names: ClassVar[tuple] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        setattr(self, self.base_layer_attribute, base_layer)
        self.init_adapter_state()
        self._unmerged_weight: Optional[torch.Tensor] = None
        self._merge_stamp: Optional[tuple[int, int, int, tuple[str, tuple[int, ...], int, int]]] = None

    def base_weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.base_layer.weight)

    def weight_dtype(self) -> str:
        """The base weight's dtype now, canonically named (``"float16"``)."""
        return str(self.base_weight().dtype).replace("torch.", "")

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

    # -- what subclasses provide ----------------------------------------------------------
    def add(self, adapter_name: str, op: Any) -> None:
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's change to ``base_layer.weight``, in the weight's own layout."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def canonical_export(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Convert a stored tensor to canonical layout (identity unless overridden)."""
        return tensor

    def native_import(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Convert a canonical tensor to the stored layout (identity unless overridden)."""
        return tensor

    # -- generic adapter state ------------------------------------------------------------
    def export(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {
            self.canonical_name(name): self.canonical_export(name, self.adapter_store(name)[adapter_name].detach())
            for name in self.tensor_names(adapter_name)
        }

    def load(self, adapter_name: str, tensors: Mapping[str, Any]) -> None:
        """Copy canonical tensors (numpy arrays or torch tensors) into the adapter."""
        for name in self.tensor_names(adapter_name):
            key, given = self.canonical_tensor(adapter_name, tensors, name)
            store = self.adapter_store(name)
            target = store[adapter_name]
            value = self.native_import(name, torch.as_tensor(given))
            if tuple(value.shape) != tuple(target.shape):
                raise AdapterError(f"tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            if target.is_meta:  # built with low_cpu_mem_usage: the loaded tensor becomes the parameter
                device = self.base_weight().device
                store[adapter_name] = nn.Parameter(
                    value.to(device=device, dtype=target.dtype, copy=True), requires_grad=target.requires_grad
                )
                continue
            with torch.no_grad():
                target.copy_(value.to(device=target.device, dtype=target.dtype))

    def delete(self, adapter_name: str) -> None:
        self.forget_adapter(adapter_name)

    def set_trainable(self, adapter_name: str, trainable: bool) -> None:
        for name in self.adapter_tensor_names:
            store = self.adapter_store(name)
            if adapter_name in store:
                store[adapter_name].requires_grad_(trainable)

    # -- merging --------------------------------------------------------------------------
    def merge(self, adapter_names: list[str]) -> None:
        todo = [a for a in adapter_names if self.has_adapter(a) and a not in self.merged_adapters]
        if not todo:
            return
        weight = self.base_weight()
        if not self.merged_adapters:
            self._unmerged_weight = weight.detach().clone()
        elif not self._weight_unchanged():
            self._unmerged_weight = None  # edited since the last merge: unmerge subtracts instead
        try:
            with torch.no_grad():
                total = weight.detach().to(torch.float32)
                for name in todo:
                    total = total + self.delta_weight(name).to(torch.float32)
                weight.copy_(total.to(weight.dtype))
        except BaseException:
            if not self.merged_adapters:  # never leave a snapshot behind a failed first merge
                self._unmerged_weight = None
            raise
        self.merged_adapters.extend(todo)
        self._merge_stamp = _weight_stamp(weight)

    def _weight_unchanged(self) -> bool:
        """Whether ``base_layer.weight`` is exactly what the last merge wrote: the same
        tensor at the same in-place version, or (after a copy, a move or a write that
        bypassed the version counter) the same fingerprint of its bits."""
        stamp = getattr(self, "_merge_stamp", None)
        return stamp is not None and _same_tensor_state(self.base_weight(), stamp)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            self._unmerged_weight = None
            return
        weight = self.base_weight()
        # a subclass with its own merge() that takes the snapshot but no stamp (a plugin
        # written before stamps) keeps the plain restore
        unstamped = getattr(self, "_merge_stamp", None) is None
        with torch.no_grad():
            if self._unmerged_weight is not None and (unstamped or self._weight_unchanged()):
                weight.copy_(self._unmerged_weight)
            else:
                warn_changed_while_merged(self, "weight")
                total = weight.detach().to(torch.float32)
                for name in self.merged_adapters:
                    total = total - self.delta_weight(name).to(device=total.device, dtype=torch.float32)
                weight.copy_(total.to(weight.dtype))
        self._unmerged_weight = None
        self._merge_stamp = None
        self.merged_adapters = []

    def unwrap(self, merge: bool) -> nn.Module:
        """The base layer to put back in the model, with active adapters folded in if ``merge``."""
        self.unmerge()
        if merge:
            self.merge([a for a in self.active_adapters if self.has_adapter(a)])
            self._unmerged_weight = None
        return self.base_layer

    def check_op_fits(self, op: Any, in_features: int, out_features: int) -> None:
        if (op.in_features, op.out_features) != (in_features, out_features):
            raise PlanError(
                f"plan op for {op.path!r} expects {op.in_features} -> {op.out_features} features, "
                f"the layer has {in_features} -> {out_features}"
            )


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


def warn_changed_while_merged(layer: AdapterLayer, what: str) -> None:
    """Warn that unmerge subtracts the adapters' change from a base ``what`` (weight,
    bias) edited while they were merged, instead of restoring the saved original."""
    warnings.warn(
        f"{type(layer).__name__}: the base {what} changed while adapters {layer.merged_adapters} were merged; "
        "unmerging by subtracting their change, which keeps the edit but is not bit-exact",
        UserWarning,
        stacklevel=4,
    )


_FINGERPRINT_CHUNK = 1 << 20
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fingerprint(weight: torch.Tensor) -> tuple[str, tuple[int, ...], int, int]:
    """dtype, shape and two int64 sums of the weight's bits (plain and position-weighted),
    computed in bounded chunks: equal for an unchanged weight, different after an edit."""
    flat = weight.detach().reshape(-1)
    ints = flat.view(_INT_VIEW[flat.element_size()]) if flat.element_size() in _INT_VIEW else flat
    plain = weighted = 0
    for start in range(0, ints.numel(), _FINGERPRINT_CHUNK):
        chunk = ints[start : start + _FINGERPRINT_CHUNK].to(torch.int64)
        position = torch.arange(start, start + chunk.numel(), device=chunk.device, dtype=torch.int64) % 65521 + 1
        plain += int(chunk.sum())
        weighted += int((chunk * position).sum())
    return (str(weight.dtype), tuple(weight.shape), plain, weighted)


def _weight_stamp(weight: torch.Tensor) -> tuple[int, int, int, tuple[str, tuple[int, ...], int, int]]:
    """What :func:`_same_tensor_state` compares: identity, in-place version, fingerprint."""
    return (id(weight), weight.data_ptr(), weight._version, _fingerprint(weight))


def _same_tensor_state(tensor: torch.Tensor, stamp: tuple) -> bool:
    """Whether ``tensor`` is exactly what it was when ``stamp`` was taken: the same tensor
    at the same in-place version, or (after a copy, a move or a write that bypassed the
    version counter) the same fingerprint of its bits."""
    if stamp[0] == id(tensor) and stamp[1] == tensor.data_ptr() and stamp[2] != tensor._version:
        return False
    return bool(stamp[3] == _fingerprint(tensor))
