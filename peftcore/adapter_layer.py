"""The adapter layer's lifecycle, written once for every backend.

A backend's adapter layer wraps one base layer and keeps each adapter's tensors in
dict-like attributes named by ``adapter_tensor_names`` (its other per-adapter settings,
such as LoRA's ``scaling``, in ``other_param_names``), keyed by adapter name. Everything
that follows from that alone lives here, over the backend's
:class:`~peftcore.primitives.TensorPrimitives` (the class attribute ``primitives``):

- adding an adapter (the layer makes its initialised tensors, :meth:`AdapterLayerCore.new_adapter`;
  the checks and the storing are here) and deleting one, over the declared names;
- export and load of canonical tensors (numpy, canonical layout; shapes checked before
  anything is written);
- merge, unmerge and unwrap. The first merge keeps a copy of the base tensor it changes
  (:attr:`AdapterLayerCore.merge_role`: the weight, BitFit's bias) and a fingerprint of
  the merged value; unmerge writes the copy back when the tensor is still exactly what
  the merge wrote, so any number of cycles leaves the base bit-identical. A base tensor
  edited while merged is instead unmerged by subtracting the adapters' delta, with a
  warning, so the edit is kept. A layer without the base tensor (BitFit on a layer with
  no bias) is given one by the merge and has it removed again by the unmerge.

What stays with the backend: making and initialising an adapter's tensors on its
framework's RNG, the forward computation, ``delta_weight`` (the adapter's change to the
base tensor, in that tensor's native layout, as something ``primitives.add_into``
takes), reading and setting the base layer's tensors, and the layout conversions
``canonical_export``/``native_import``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, ClassVar, Hashable, Mapping, Optional, TypeVar

import numpy as np

from peftcore.adapter_state import AdapterBookkeeping
from peftcore.errors import AdapterError, PlanError, did_you_mean
from peftcore.primitives import TensorPrimitives

L = TypeVar("L", bound="AdapterLayerCore")
#: A runtime's ``replace_layer(model, layers, path, new)``.
ReplaceLayer = Callable[[Any, dict, str, Any], None]


def _same(array: Any) -> Any:
    return array


@dataclasses.dataclass(frozen=True)
class AdapterTensor:
    """One tensor of an adapter in a layer: its canonical name, how to read it and store
    a new one in its place, and how its native layout converts to and from canonical."""

    name: str
    get: Callable[[], Any]
    #: None where writes are always in place (nothing new is ever stored)
    put: Optional[Callable[[Any], None]] = None
    to_canonical: Callable[[Any], Any] = _same
    to_native: Callable[[Any], Any] = _same


@dataclasses.dataclass(frozen=True)
class MergeRecord:
    """What a layer remembers while adapters are merged into its base tensor.

    ``original`` is the base tensor's value before the first merge (None when the layer
    had none and the merge created it: ``created``); ``restorable`` is False once the
    tensor was found edited between two merges; ``fingerprint`` is of the value the last
    merge wrote.
    """

    original: Any
    created: bool = False
    restorable: bool = True
    fingerprint: Optional[Hashable] = None


class AdapterLayerCore(AdapterBookkeeping):
    """The lifecycle of an adapter layer, framework-free. A backend's adapter-layer base
    class mixes it into its framework's layer class and sets ``primitives``; see the
    module docstring for what it supplies."""

    #: The backend's tensor primitives.
    primitives: ClassVar[TensorPrimitives]
    #: HF PEFT's names of a layer's other per-adapter attributes (dicts by adapter name).
    other_param_names: ClassVar[tuple] = ()
    #: The base tensor a merge changes, by role (``"weight"``, ``"bias"``).
    merge_role: ClassVar[str] = "weight"
    #: Set while adapters are merged (see :class:`MergeRecord`).
    merge_record: Optional[MergeRecord] = None
    base_layer: Any

    # -- what a backend's layer provides --------------------------------------------------------
    def base_tensor(self, role: str) -> Any:
        """The base layer's tensor of ``role`` (``"weight"``, ``"bias"``), or None."""
        raise NotImplementedError

    def set_base_tensor(self, role: str, tensor: Any) -> None:
        """Make ``tensor`` the base layer's tensor of ``role`` (None: remove it)."""
        raise NotImplementedError(f"{type(self).__name__} cannot replace its base layer's {role}")

    def create_base_tensor(self, role: str) -> Any:
        """Give the base layer a zero, frozen tensor of ``role`` it lacks, and return it."""
        raise AdapterError(f"{type(self).__name__}: the base layer has no {role} to merge into")

    def base_weight(self) -> Any:
        """The tensor whose device and dtype new adapter tensors follow."""
        return self.base_tensor("weight")

    def new_adapter(self, adapter_name: str, op: Any) -> dict[str, Any]:
        """The new adapter's initialised tensors and settings, by attribute name (names of
        ``adapter_tensor_names`` and ``other_param_names``)."""
        raise NotImplementedError(f"{type(self).__name__} builds no adapter from a {type(op).__name__}")

    def delta_weight(self, adapter_name: str) -> Any:
        """The adapter's change to the base tensor of :attr:`merge_role`, in its layout."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def features(self) -> tuple[int, int]:
        """``(in_features, out_features)`` of the base layer, for the fit checks."""
        raise NotImplementedError(f"{type(self).__name__} has no feature sizes")

    def canonical_export(self, name: str, array: Any) -> Any:
        """Convert a stored tensor's numpy copy to canonical layout (identity by default)."""
        return array

    def native_import(self, name: str, array: Any) -> Any:
        """Convert a canonical tensor to the stored layout (identity by default)."""
        return array

    @classmethod
    def wrap(cls: type[L], base_layer: Any, path: str) -> L:
        """A new adapter layer of this class around ``base_layer``, which sits at ``path``."""
        return cls(base_layer, path)  # type: ignore[call-arg]

    # -- adding and deleting --------------------------------------------------------------------
    def add(self, adapter_name: str, op: Any) -> None:
        """Build adapter ``adapter_name`` from plan op ``op`` in this layer."""
        self.check_can_add(adapter_name, op)
        values = self.new_adapter(adapter_name, op)
        first = self.adapter_tensor_names[0]
        if first not in values:
            raise AdapterError(f"{type(self).__name__}.new_adapter made no {first!r} for {adapter_name!r}")
        for name in (*self.adapter_tensor_names, *self.other_param_names):
            if name in values:
                store = self.adapter_store(name) if name in self.adapter_tensor_names else getattr(self, name)
                store[adapter_name] = values[name]

    def check_can_add(self, adapter_name: str, op: Any) -> None:
        """An :class:`AdapterError` if the layer already has ``adapter_name``; a
        :class:`PlanError` if ``op`` does not fit the layer (:meth:`check_op_fits`). A
        layer with its own ``add`` calls this first."""
        if self.has_adapter(adapter_name):
            raise AdapterError(f"layer {op.path!r} already has an adapter named {adapter_name!r}")
        self.check_op_fits(op)

    def check_op_fits(self, op: Any, in_features: Optional[int] = None, out_features: Optional[int] = None) -> None:
        """A :class:`PlanError` unless ``op``'s feature sizes (when it has them) are the
        layer's (``features()`` unless given)."""
        if not hasattr(op, "in_features") or not hasattr(op, "out_features"):
            return
        if in_features is None or out_features is None:
            in_features, out_features = self.features()
        if (op.in_features, op.out_features) != (in_features, out_features):
            raise PlanError(
                f"plan op for {op.path!r} expects {op.in_features} -> {op.out_features} features, "
                f"the layer has {in_features} -> {out_features}"
            )

    def delete(self, adapter_name: str) -> None:
        """Drop the adapter's tensors and settings from this layer."""
        self.forget_adapter(adapter_name)
        for name in self.other_param_names:
            store = getattr(self, name, None)
            if store is not None and adapter_name in store:
                del store[adapter_name]

    def set_trainable(self, adapter_name: str, trainable: bool) -> None:
        for name in self.tensor_names(adapter_name):
            self.primitives.set_trainable(self.adapter_store(name)[adapter_name], trainable)

    # -- canonical tensors ----------------------------------------------------------------------
    def adapter_tensors_of(self, adapter_name: str) -> list[AdapterTensor]:
        """Where each tensor of the adapter lives, by canonical name. By default the
        ``adapter_tensor_names`` stores, converted with ``canonical_export``/``native_import``;
        a layer that keeps an adapter elsewhere (a copy of a whole module) says so here."""
        entries = []
        for name in self.tensor_names(adapter_name):
            store = self.adapter_store(name)
            entries.append(
                AdapterTensor(
                    self.canonical_name(name),
                    functools.partial(store.__getitem__, adapter_name),
                    functools.partial(self.put_adapter_tensor, name, adapter_name),
                    functools.partial(self.canonical_export, name),
                    functools.partial(self.native_import, name),
                )
            )
        return entries

    def put_adapter_tensor(self, attribute: str, adapter_name: str, tensor: Any) -> None:
        """Store ``tensor`` as the adapter's tensor in ``attribute`` (a write that made a new one)."""
        self.adapter_store(attribute)[adapter_name] = tensor

    def export(self, adapter_name: str) -> dict[str, Any]:
        """The adapter's tensors as canonical-layout numpy arrays, by canonical name."""
        to_numpy = self.primitives.to_numpy
        return {
            entry.name: np.ascontiguousarray(entry.to_canonical(to_numpy(entry.get())))
            for entry in self.adapter_tensors_of(adapter_name)
        }

    def load(self, adapter_name: str, tensors: Mapping[str, Any]) -> None:
        """Copy canonical tensors (numpy arrays, or tensors of the backend) into the
        adapter; every name and shape is checked before anything is written."""
        pending = []
        for entry in self.adapter_tensors_of(adapter_name):
            if entry.name not in tensors:
                raise AdapterError(f"tensor {entry.name!r} missing for adapter {adapter_name!r}")
            given = tensors[entry.name]
            given = given if hasattr(given, "shape") else np.asarray(given)
            native_shape = self.primitives.shape(entry.get())
            expected = tuple(entry.to_canonical(np.empty(native_shape, np.float32)).shape)
            if tuple(given.shape) != expected:
                raise AdapterError(f"tensor {entry.name!r} has shape {tuple(given.shape)}, expected {expected}")
            pending.append((entry, given))
        for entry, given in pending:
            self.write_adapter_tensor(entry, entry.to_native(given))

    def write_adapter_tensor(self, entry: AdapterTensor, value: Any) -> None:
        """Give the adapter tensor ``entry`` the value ``value`` (native layout)."""
        target = entry.get()
        written = self.primitives.write(target, value)
        if written is not target:
            if entry.put is None:
                raise AdapterError(f"{type(self).__name__}: tensor {entry.name!r} was not written in place")
            entry.put(written)

    def weight_dtype(self) -> str:
        """The base weight's dtype now, canonically named (``"float16"``), for ``safe_merge``
        (empty when the base layer has no weight)."""
        weight = self.base_weight()
        return self.primitives.dtype_name(weight) if weight is not None else ""

    # -- merging --------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str]) -> None:
        """Fold the named adapters (those present and not merged yet) into the base tensor."""
        todo = [a for a in adapter_names if self.has_adapter(a) and a not in self.merged_adapters]
        if not todo:
            return
        ops, role, first = self.primitives, self.merge_role, not self.merged_adapters
        target = self.base_tensor(role)
        record = self.merge_record
        if first or record is None:
            record = MergeRecord(ops.clone(target) if target is not None else None, created=target is None)
        elif record.restorable and not self._unchanged(target, record):
            record = dataclasses.replace(record, restorable=False)  # edited since: unmerge subtracts
        self.merge_record = record
        try:
            if target is None:
                target = self.create_base_tensor(role)
            merged = ops.add_into(target, [self.delta_weight(name) for name in todo], 1)
            if merged is not target:
                self.set_base_tensor(role, merged)
        except BaseException:
            if first:  # never leave a snapshot (or a created tensor) behind a failed first merge
                self.merge_record = None
                if record.created and self.base_tensor(role) is not None:
                    self.set_base_tensor(role, None)
            raise
        self.merged_adapters.extend(todo)
        self.merge_record = dataclasses.replace(record, fingerprint=ops.fingerprint(merged))

    def merge_original(self) -> Any:
        """The base tensor's value before the first merge while merged (None otherwise, or
        when the merge created it)."""
        record = self.merge_record
        return record.original if record is not None and self.merged_adapters else None

    def _unchanged(self, tensor: Any, record: MergeRecord) -> bool:
        return (
            tensor is not None
            and record.fingerprint is not None
            and self.primitives.unchanged_since(tensor, record.fingerprint)
        )

    def unmerge(self) -> None:
        """Undo every merge: exactly, unless the base tensor changed while merged."""
        record = self.merge_record
        if not self.merged_adapters:
            self.merge_record = None
            return
        role = self.merge_role
        target = self.base_tensor(role)
        if target is None:
            raise AdapterError(f"{type(self).__name__}: the base layer's {role} is gone; cannot unmerge")
        if record is not None and record.restorable and self._unchanged(target, record):
            if record.created:
                self.set_base_tensor(role, None)
            else:
                self._put_base(role, target, self.primitives.write(target, record.original))
        else:
            self.warn_changed_while_merged(role)
            deltas = [self.delta_weight(name) for name in self.merged_adapters]
            self._put_base(role, target, self.primitives.add_into(target, deltas, -1))
        self.merge_record = None
        self.merged_adapters = []

    def _put_base(self, role: str, old: Any, new: Any) -> None:
        if new is not old:
            self.set_base_tensor(role, new)

    def unwrap(self, merge: bool) -> Any:
        """The base layer to put back in the model, with the active adapters folded in for
        good if ``merge``; the layer then holds no merge state."""
        self.unmerge()
        if merge:
            self.merge([a for a in self.active_adapters if self.has_adapter(a)])
        self.merge_record = None
        self.merged_adapters = []
        return self.base_layer

    def warn_changed_while_merged(self, what: str) -> None:
        """Warn that unmerge subtracts the adapters' change from a base ``what`` edited
        while they were merged, instead of restoring the saved original."""
        path = getattr(self, "path", None)
        where = f" {path!r}" if isinstance(path, str) else ""
        warnings.warn(
            f"{type(self).__name__}{where}: the base {what} changed while adapters {self.merged_adapters} were "
            "merged; unmerging by subtracting their change, which keeps the edit but is not bit-exact",
            UserWarning,
            stacklevel=5,
        )


def wrap_layer(
    replace_layer: ReplaceLayer,
    model: Any,
    layers: dict,
    path: str,
    wrapper_type: type[L],
) -> L:
    """The ``wrapper_type`` adapter layer at ``path``, wrapping the layer there if needed:
    ``wrapper_type.wrap(base_layer, path)`` is put in its place with the runtime's
    ``replace_layer(model, layers, path, new)``. A layer that already carries another
    kind of adapter layer is refused."""
    if path not in layers or not path:
        raise PlanError(f"the model has no layer {path!r}{did_you_mean(path, [p for p in layers if p])}")
    current = layers[path]
    if isinstance(current, wrapper_type):
        return current
    if isinstance(current, AdapterLayerCore):
        raise PlanError(
            f"layer {path!r} already carries a {type(current).__name__}; it cannot also take a {wrapper_type.__name__}"
        )
    wrapper = wrapper_type.wrap(current, path)
    replace_layer(model, layers, path, wrapper)
    return wrapper


def layer_builder(replace_layer: ReplaceLayer, wrapper_type: type[AdapterLayerCore]) -> Callable[[Any, dict, Any, str], None]:
    """The builder of an op that needs nothing but its adapter layer: wrap the layer at
    ``op.path`` in ``wrapper_type`` (once) and add the adapter to it."""

    def build(model: Any, layers: dict, op: Any, adapter_name: str) -> None:
        wrap_layer(replace_layer, model, layers, op.path, wrapper_type).add(adapter_name, op)

    build.__name__ = build.__qualname__ = f"build_{wrapper_type.__name__}"
    return build
