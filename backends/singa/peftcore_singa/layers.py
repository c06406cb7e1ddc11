"""The base class of every adapter layer the SINGA backend builds, and tensor helpers.

An :class:`AdapterLayer` is a ``singa.layer.Layer`` that takes the place of one base
layer in its parent's ``_layers`` (same key, same layer name). The base layer is kept as
``base_layer`` but deliberately *not* registered as a sublayer, so its name and its
tensors' names (``fc1.W``...) stay exactly as they were: checkpoints of the plain model
still match, and SINGA's prefix-based ``set_params``/``set_states`` keep working.

Each adapter's tensors live in plain dicts named by ``adapter_tensor_names``
(``{adapter name: Tensor}``), with explicit, stable names ``<layer path>.<tensor>.<adapter>``
(e.g. ``fc1.lora_A.default``). :meth:`get_params`, :meth:`set_params`,
:meth:`get_states` and :meth:`set_states` are overridden to include them, so
``Model.get_params()``/``save_states()`` see the adapter, and SINGA optimizers (which key
their state by tensor name) never mix two adapters up.

Merging keeps a copy of the original weight while merged and restores it exactly on
unmerge; the weight tensor is always changed in place, so its identity and name, and any
reference a recorded graph holds, stay valid.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import layer, tensor  # noqa: E402

from peftcore.adapter_state import AdapterBookkeeping  # noqa: E402
from peftcore.errors import AdapterError, PlanError  # noqa: E402

#: SINGA dtype codes (``tensor.float32``...) and their numpy types and names.
NP_DTYPES = {tensor.float32: np.float32, tensor.float16: np.float16, tensor.int32: np.int32}
DTYPE_NAMES = {tensor.float32: "float32", tensor.float16: "float16", tensor.int32: "int32"}


def to_numpy(t: Any) -> np.ndarray:
    """A host numpy copy of a SINGA tensor (the tensor itself is not moved)."""
    return np.array(tensor.to_numpy(t), copy=True)


def copy_into(t: Any, array: Any) -> None:
    """Copy ``array`` into tensor ``t`` in place (cast to its dtype; same number of elements)."""
    value = np.asarray(array)
    if value.size != int(np.prod(t.shape)):
        raise AdapterError(f"cannot copy an array of shape {value.shape} into tensor {t.name!r} of shape {t.shape}")
    t.copy_from_numpy(np.ascontiguousarray(value.reshape(t.shape), dtype=NP_DTYPES.get(t.dtype, np.float32)))


def set_trainable_flags(t: Any, trainable: bool) -> None:
    """Freeze or unfreeze one tensor: SINGA optimizers update exactly the tensors with
    ``stores_grad``; ``requires_grad`` lets backward skip frozen subgraphs."""
    t.stores_grad = bool(trainable)
    t.requires_grad = bool(trainable)


def digest(t: Any) -> tuple[str, tuple[int, ...], bytes]:
    """dtype, shape and a hash of a tensor's bits: equal exactly when its value is."""
    array = np.ascontiguousarray(to_numpy(t))
    return array.dtype.str, tuple(array.shape), hashlib.blake2b(array.tobytes(), digest_size=16).digest()


def warn_changed_while_merged(layer: Any, what: str) -> None:
    warnings.warn(
        f"{type(layer).__name__} {layer.path!r}: the base {what} changed while adapters {layer.merged_adapters} "
        "were merged; unmerging by subtracting their change, which keeps the edit but is not bit-exact",
        UserWarning,
        stacklevel=4,
    )


def constant(value: float, like: Any) -> Any:
    """A frozen ``(1,)`` tensor holding ``value`` on ``like``'s device and dtype: autograd
    ops take only tensors, and this one broadcasts against any shape."""
    out = tensor.Tensor((1,), like.device, like.dtype, requires_grad=False, stores_grad=False)
    out.set_value(float(value))
    return out


class AdapterLayer(AdapterBookkeeping, layer.Layer):
    """A base layer plus named adapters. Subclasses set ``adapter_tensor_names`` (and
    ``canonical_names`` where an attribute's saved name differs); the bookkeeping rules
    come from :class:`~peftcore.adapter_state.AdapterBookkeeping`."""

    def __init__(self, base_layer: Any, path: str) -> None:
        super().__init__()
        self.__dict__["base_layer"] = base_layer  # not a registered sublayer (see module doc)
        self.__dict__["_unmerged_weight"] = None
        self.path = path
        self.init_adapter_state()
        for name in self.adapter_tensor_names:
            setattr(self, name, {})
        self._initialized = True  # the base layer is; adapter tensors are made in add()

    def adapter_tensors(self, adapter_name: Optional[str] = None) -> list[Any]:
        """The adapter tensors of one adapter, or of every adapter."""
        found = []
        for name in self.adapter_tensor_names:
            for adapter, t in getattr(self, name).items():
                if adapter_name is None or adapter == adapter_name:
                    found.append(t)
        return found

    def base_weight(self) -> Any:
        return self.base_layer.W

    def new_tensor(self, shape: Sequence[int], name: str) -> Any:
        """A trainable tensor on the base weight's device and dtype, named ``<path>.<name>``."""
        weight = self.base_weight()
        return tensor.Tensor(
            tuple(int(d) for d in shape),
            weight.device,
            weight.dtype,
            requires_grad=True,
            stores_grad=True,
            name=f"{self.path}.{name}",
        )

    # -- what subclasses provide ----------------------------------------------------------
    def add(self, adapter_name: str, op: Any) -> None:
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> np.ndarray:
        """The adapter's change to ``base_layer.W``, in W's own (native) layout."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def canonical_export(self, name: str, array: np.ndarray) -> np.ndarray:
        """Convert a stored tensor to canonical layout (identity unless overridden)."""
        return array

    def native_import(self, name: str, array: np.ndarray) -> np.ndarray:
        """Convert a canonical tensor to the stored layout (identity unless overridden)."""
        return array

    # -- generic adapter state ------------------------------------------------------------
    def export(self, adapter_name: str) -> dict[str, np.ndarray]:
        return {
            self.canonical_name(name): np.ascontiguousarray(
                self.canonical_export(name, to_numpy(getattr(self, name)[adapter_name]))
            )
            for name in self.tensor_names(adapter_name)
        }

    def load(self, adapter_name: str, tensors: Mapping[str, Any]) -> None:
        """Copy canonical numpy tensors into the adapter (shapes checked first)."""
        pending = []
        for name in self.tensor_names(adapter_name):
            key, given = self.canonical_tensor(adapter_name, tensors, name)
            target = getattr(self, name)[adapter_name]
            value = self.native_import(name, np.asarray(given))
            if tuple(value.shape) != tuple(target.shape):
                expected = self.canonical_export(name, np.empty(target.shape)).shape
                raise AdapterError(f"tensor {key!r} has shape {np.asarray(given).shape}, expected {expected}")
            pending.append((target, value))
        for target, value in pending:
            copy_into(target, value)

    def delete(self, adapter_name: str) -> None:
        self.forget_adapter(adapter_name)

    def set_trainable(self, adapter_name: str, trainable: bool) -> None:
        for t in self.adapter_tensors(adapter_name):
            set_trainable_flags(t, trainable)

    # -- SINGA's parameter API ------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        params = dict(self.base_layer.get_params()) if self.base_layer._initialized else {}
        params.update({t.name: t for t in self.adapter_tensors()})
        return params

    def set_params(self, parameters: Mapping[str, Any]) -> None:
        self._set(parameters, states=False)

    def get_states(self) -> dict[str, Any]:
        states = dict(self.base_layer.get_states()) if self.base_layer._initialized else {}
        states.update({t.name: t for t in self.adapter_tensors()})
        return states

    def set_states(self, states: Mapping[str, Any]) -> None:
        self._set(states, states=True)

    def _set(self, values: Mapping[str, Any], states: bool) -> None:
        base = self.base_layer
        if base._initialized:
            own = base.get_states() if states else base.get_params()
            if any(key in values for key in own):
                (base.set_states if states else base.set_params)(values)
        for t in self.adapter_tensors():
            if t.name in values:
                value = values[t.name]
                if isinstance(value, tensor.Tensor):
                    t.copy_data(value)
                else:
                    copy_into(t, value)

    # -- merging --------------------------------------------------------------------------
    def merge(self, adapter_names: Sequence[str]) -> None:
        """Fold adapters into the base weight, keeping the weight as it was for unmerge.
        A weight changed since the last merge (found by its digest) is not restored from
        that copy later: unmerge then subtracts the adapters' delta instead."""
        todo = [a for a in adapter_names if self.has_adapter(a) and a not in self.merged_adapters]
        if not todo:
            return
        weight = self.base_weight()
        if not self.merged_adapters:
            self.__dict__["_unmerged_weight"] = weight.clone()
        elif not self._weight_unchanged():
            self.__dict__["_unmerged_weight"] = None
        try:
            total = to_numpy(weight).astype(np.float32)
            for name in todo:
                total = total + self.delta_weight(name).astype(np.float32)
            copy_into(weight, total)
        except BaseException:
            if not self.merged_adapters:  # no snapshot is left behind a failed first merge
                self.__dict__["_unmerged_weight"] = None
            raise
        self.merged_adapters.extend(todo)
        self.__dict__["_merge_digest"] = digest(weight)

    def _weight_unchanged(self) -> bool:
        stamp = self.__dict__.get("_merge_digest")
        return stamp is not None and stamp == digest(self.base_weight())

    def unmerge(self) -> None:
        """Restore the weight exactly when it is what the last merge wrote; otherwise
        subtract the merged adapters' delta (with a warning), keeping the edit."""
        if not self.merged_adapters:
            self.__dict__["_unmerged_weight"] = None
            return
        weight = self.base_weight()
        if self._unmerged_weight is not None and self._weight_unchanged():
            weight.copy_data(self._unmerged_weight)
        else:
            warn_changed_while_merged(self, "weight")
            total = to_numpy(weight).astype(np.float32)
            for name in self.merged_adapters:
                total = total - self.delta_weight(name).astype(np.float32)
            copy_into(weight, total)
        self.__dict__["_unmerged_weight"] = None
        self.__dict__["_merge_digest"] = None
        self.merged_adapters = []

    def weight_dtype(self) -> str:
        """The base weight's dtype now (``"float32"``...), for ``safe_merge``."""
        return DTYPE_NAMES.get(self.base_weight().dtype, "float32")

    def unwrap(self, merge: bool) -> Any:
        """The base layer to put back in the model, with active adapters folded in if ``merge``."""
        self.unmerge()
        if merge:
            self.merge([a for a in self.active_adapters if self.has_adapter(a)])
            self.__dict__["_unmerged_weight"] = None
            self.merged_adapters = []
        return self.base_layer

    def check_op_fits(self, op: Any, in_features: int, out_features: int) -> None:
        if (op.in_features, op.out_features) != (in_features, out_features):
            raise PlanError(
                f"plan op for {op.path!r} expects {op.in_features} -> {op.out_features} features, "
                f"the layer has {in_features} -> {out_features}"
            )
