"""Read an adapter out of a SINGA ``Model.save_states`` checkpoint, without SINGA.

The SINGA backend offers this to ``peftcore convert`` as a checkpoint format
(:class:`SingaCheckpointFormat`, through the ``peftcore_checkpoint_formats`` hook), so
the core knows no framework's checkpoint layout. This module imports neither singa nor
the backend's layer modules.

``save_states(path)`` writes a zip holding ``tensor_dict.npz`` (``np.savez`` of every
state tensor, keyed by tensor name) and ``states_attr.json`` (per name: ``state_type``
0 for model states, 1 for the auxiliary states the caller passed, with shape and dtype).
This module reads it with ``zipfile`` and ``np.load(allow_pickle=False)``: nothing is
unpickled and SINGA need not be installed.

How the SINGA backend names and lays out adapter tensors (see ``peftcore_singa``): an
adapter layer stores canonical tensor ``<name>`` of the op on layer ``<path>`` as
``<path>.<name>.<adapter>``, in canonical layout, except:

==============================  =======================================  ================
plan op / canonical tensor      name in the checkpoint                   stored as
==============================  =======================================  ================
``lora`` ``lora_A`` (r, in)     ``<path>.lora_A.<adapter>``              ``(in, r)``: A.T
``lora`` ``lora_B`` (out, r)    ``<path>.lora_B.<adapter>``              ``(r, out)``: B.T
``bitfit_bias`` ``bias``        ``<path>.bitfit_bias.<adapter>``         as is
``modules_to_save`` parameter   ``<path>.modules_to_save.<adapter>``     SINGA's layout
                                ``[.<sublayer>].<attr>``
==============================  =======================================  ================

LoRA tensors are transposed for every layer type (Linear, Gemm, Embedding). In a
``modules_to_save`` copy, canonical ``weight`` / ``bias`` are SINGA's ``W`` / ``b``;
a ``layer.Linear`` W is ``(in, out)`` (transposed), a ``layer.Gemm`` (``transB``, the
default) or ``layer.Embedding`` W is stored as is. A non-square W is told apart by its
shape; a square one needs the layer type, which a graph described by the SINGA backend
gives (otherwise it is refused rather than guessed).
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from typing import Mapping, Optional, Union

import numpy as np

from peftcore.errors import AdapterError
from peftcore.graph import ModelGraph
from peftcore.plan import PlanOp, RewritePlan, SaveModule

SINGA_TENSORS_MEMBER = "tensor_dict.npz"
SINGA_ATTRS_MEMBER = "states_attr.json"
_AUX_STATE = 1
_NATIVE_ATTRS = {"weight": "W", "bias": "b"}
#: Where the table above differs from the rule: {op: {canonical name: (stored name, transposed)}}.
_STORED = {
    "lora": {"lora_A": ("lora_A", True), "lora_B": ("lora_B", True)},
    "bitfit_bias": {"bias": ("bitfit_bias", False)},
}
_STORED_AS_IS = ("Gemm", "Embedding")
_SLOT = "\x00"  # stands for the adapter name in a tensor-name template


def read_singa_states(path: str) -> dict[str, np.ndarray]:
    """The model-state tensors of a ``save_states`` zip, by tensor name."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
            if SINGA_TENSORS_MEMBER not in members:
                raise AdapterError(f"{path}: not a SINGA save_states checkpoint (no {SINGA_TENSORS_MEMBER} inside)")
            payload = archive.read(SINGA_TENSORS_MEMBER)
            attrs = json.loads(archive.read(SINGA_ATTRS_MEMBER)) if SINGA_ATTRS_MEMBER in members else {}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise AdapterError(f"{path}: not a readable SINGA save_states checkpoint: {exc}") from None
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise AdapterError(f"{path}: {SINGA_TENSORS_MEMBER} is not a plain numpy archive: {exc}") from None
    if not isinstance(attrs, dict):
        raise AdapterError(f"{path}: {SINGA_ATTRS_MEMBER} is not a JSON object")
    return {
        name: array for name, array in arrays.items()
        if not (isinstance(attrs.get(name), dict) and attrs[name].get("state_type") == _AUX_STATE)
    }


def singa_adapter_tensors(
    path: str, plan: RewritePlan, adapter_name: Optional[str], graph: Optional[ModelGraph]
) -> tuple[str, dict[str, np.ndarray]]:
    """``(adapter name, canonical tensors)`` of one adapter of ``plan`` in the checkpoint.

    ``adapter_name`` None picks the checkpoint's only adapter; several are an error that
    lists them.
    """
    states = read_singa_states(path)
    found = _adapters_in(states, plan)
    if adapter_name is None:
        if len(found) != 1:
            listing = ", ".join(repr(n) for n in found) or "none"
            first = _first_expected(plan)
            raise AdapterError(
                f"{path}: {'several adapters' if found else 'no adapter'} of this plan in the checkpoint "
                f"(found: {listing}); " + ("pass --adapter-name" if found else f"expected tensors like {first!r}")
            )
        adapter_name = found[0]
    elif adapter_name not in found:
        raise AdapterError(
            f"{path}: no adapter {adapter_name!r} of this plan in the checkpoint "
            f"(found: {', '.join(repr(n) for n in found) or 'none'})"
        )
    tensors: dict[str, np.ndarray] = {}
    for op in plan.ops:
        for name, spec in op.tensor_specs().items():
            full = f"{op.path}.{name}" if op.path else name
            tensors[full] = _canonical(path, states, op, name, tuple(spec.shape), adapter_name, graph)
    return adapter_name, tensors


def _native_names(op: PlanOp, name: str, adapter: str) -> list[str]:
    """Where the SINGA backend stores canonical tensor ``name`` of ``op``, most likely first."""
    if not isinstance(op, SaveModule):
        stored = _STORED.get(op.op, {}).get(name, (name, False))[0]
        return [f"{op.path}.{stored}.{adapter}" if op.path else f"{stored}.{adapter}"]
    rel, _, attr = name.rpartition(".")
    prefix = f"{op.path}.modules_to_save.{adapter}" + (f".{rel}" if rel else "")
    native = _NATIVE_ATTRS.get(attr)
    return [f"{prefix}.{native}", f"{prefix}.{attr}"] if native else [f"{prefix}.{attr}"]


def _adapters_in(states: Mapping[str, np.ndarray], plan: RewritePlan) -> list[str]:
    """Adapter names for which the checkpoint holds every tensor of ``plan``."""
    ops = [op for op in plan.ops if op.tensor_specs()]
    if not ops:
        return []
    op = ops[0]
    name = next(iter(op.tensor_specs()))
    patterns = []
    for template in _native_names(op, name, _SLOT):
        prefix, suffix = template.split(_SLOT)
        patterns.append(re.compile(re.escape(prefix) + "(?P<adapter>.+)" + re.escape(suffix)))
    candidates = sorted({m["adapter"] for key in states for p in patterns for m in [p.fullmatch(key)] if m})
    return [
        candidate for candidate in candidates
        if all(any(n in states for n in _native_names(o, t, candidate)) for o in ops for t in o.tensor_specs())
    ]


def _first_expected(plan: RewritePlan) -> str:
    for op in plan.ops:
        for name in op.tensor_specs():
            return _native_names(op, name, "<adapter>")[0]
    return ""


def _canonical(
    path: str, states: Mapping[str, np.ndarray], op: PlanOp, name: str, shape: tuple,
    adapter: str, graph: Optional[ModelGraph],
) -> np.ndarray:
    key = next(n for n in _native_names(op, name, adapter) if n in states)
    array = np.asarray(states[key])
    if array.dtype.kind != "f":
        raise AdapterError(f"{path}: tensor {key!r} has dtype {array.dtype}, expected a float type")
    if not isinstance(op, SaveModule):
        value = array.T if _STORED.get(op.op, {}).get(name, (name, False))[1] else array
    elif key.endswith(".W") and array.ndim == 2 and len(shape) == 2:
        value = array.T if _stored_transposed(op, name, shape, array, graph, path, key) else array
    elif array.ndim != len(shape) and array.size == int(np.prod(shape)):
        value = array.reshape(shape)  # e.g. a Gemm bias kept as (1, out)
    else:
        value = array
    if tuple(value.shape) != shape:
        raise AdapterError(f"{path}: tensor {key!r} has shape {tuple(array.shape)}; the plan needs canonical {shape}")
    return np.ascontiguousarray(value)


def _stored_transposed(
    op: PlanOp, name: str, shape: tuple, array: np.ndarray, graph: Optional[ModelGraph], path: str, key: str
) -> bool:
    """Whether a ``modules_to_save`` copy's 2-D ``W`` is stored ``(in, out)``."""
    if shape[0] != shape[1]:
        return tuple(array.shape) == shape[::-1]
    rel = name.rpartition(".")[0]
    layer_path = f"{op.path}.{rel}" if rel else op.path
    if graph is not None and graph.backend == "singa" and layer_path in graph:
        return graph.get(layer_path).type_name not in _STORED_AS_IS
    raise AdapterError(
        f"{path}: {key!r} is a square weight; whether SINGA stored it transposed depends on the "
        f"layer type (layer.Linear: yes, Gemm/Embedding: no). Pass the SINGA model (--model) so "
        f"its layer types are known"
    )


class SingaCheckpointFormat:
    """A SINGA ``save_states`` zip as a source of adapters for ``peftcore convert``."""

    name = "singa"
    description = f"SINGA save_states checkpoint (a zip holding {SINGA_TENSORS_MEMBER})"

    def recognises(self, path: Union[str, os.PathLike]) -> bool:
        path = os.fspath(path)
        if not (os.path.isfile(path) and zipfile.is_zipfile(path)):
            return False
        with zipfile.ZipFile(path) as archive:
            return SINGA_TENSORS_MEMBER in archive.namelist()

    def adapter_tensors(
        self, path: str, plan: RewritePlan, adapter_name: Optional[str], graph: Optional[ModelGraph]
    ) -> tuple[str, dict[str, np.ndarray]]:
        return singa_adapter_tensors(path, plan, adapter_name, graph)
