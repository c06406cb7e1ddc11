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
``lora_conv`` (a Conv2d's)      ``<path>.lora_A.<adapter>`` (B           as is: SINGA's
                                likewise)                                conv layout is
                                                                         canonical
``bitfit_bias`` ``bias``        ``<path>.bitfit_bias.<adapter>``         as is
``modules_to_save`` parameter   ``<path>.modules_to_save.<adapter>``     SINGA's layout
                                ``[.<sublayer>].<attr>``
P-tuning ``prompt_embeddings``  not stored: computed from the encoder    (n, d)
                                (``<path>.encoder.<module>.<adapter>``)
==============================  =======================================  ================

P-tuning's prompt is the output of its encoder, computed with numpy
(:mod:`peftcore_singa.checkpoint_encoder`); a loading plan (a plain prompt, as planned
from a ``PromptEncoderConfig`` and the model) takes it the same way. LoRA tensors are transposed for every layer type (Linear, Gemm, Embedding). In a
``modules_to_save`` copy, canonical ``weight`` / ``bias`` are SINGA's ``W`` / ``b``;
a ``layer.Linear`` W is ``(in, out)`` (transposed), a ``layer.Gemm`` (``transB``, the
default) or ``layer.Embedding`` W is stored as is. A non-square W is told apart by its
shape; a square one needs the layer type, which a graph described by the SINGA backend
gives (otherwise it is refused rather than guessed).
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Iterator, Mapping, Optional, Union

import numpy as np

from peftcore import strict_json
from peftcore.errors import AdapterError
from peftcore.graph import ModelGraph
from peftcore.methods.prompt_tuning import AddPrompt
from peftcore.plan import PlanOp, RewritePlan, SaveModule
from peftcore.safe_files import open_regular
from peftcore_singa.checkpoint_encoder import encoder_prompt

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
_PROMPT = "prompt_embeddings"
_ENCODER = "encoder."


#: Bounds on what a checkpoint may make us read: the attributes JSON, the number of
#: tensors, and a member's inflated size relative to its compressed size (a zip bomb).
MAX_ATTRS_BYTES = 16 * 1024 * 1024
MAX_MEMBERS = 200_000
MAX_INFLATION = 100
_INFLATION_FREE_BYTES = 64 * 1024 * 1024  # members this small may compress any amount


class SingaStates(Mapping[str, np.ndarray]):
    """The model-state tensors of a ``save_states`` zip, by tensor name, each read only
    when asked for; :meth:`spec` gives a tensor's dtype and shape from its ``.npy``
    header alone, so callers check them before any data is read."""

    def __init__(self, path: str, names: list[str]) -> None:
        self.path = path
        self._names = names
        self._known = set(names)
        self._specs: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self._loaded: dict[str, np.ndarray] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key: object) -> bool:
        return key in self._known

    def spec(self, key: str) -> tuple[np.dtype, tuple[int, ...]]:
        if key not in self._specs:
            self._read_many([key], {}, header_only=True)
        return self._specs[key]

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self:
            raise KeyError(key)
        if key not in self._loaded:
            self._read_many([key], {}, header_only=False)
        return self._loaded[key]

    def preload(self, sizes: Mapping[str, int]) -> None:
        """Read the tensors named in ``sizes`` in one pass over the archive, each checked
        from its header first: a float dtype and exactly ``sizes[key]`` elements."""
        self._read_many([k for k in sizes if k not in self._loaded], sizes, header_only=False)

    def _read_many(self, keys: list[str], sizes: Mapping[str, int], header_only: bool) -> None:
        if not keys:
            return
        where = f"{self.path}: {SINGA_TENSORS_MEMBER}"
        key = keys[0]
        try:
            with open_regular(self.path, "SINGA checkpoint") as handle, zipfile.ZipFile(handle) as outer:
                with outer.open(_bounded_member(outer, SINGA_TENSORS_MEMBER, self.path)) as payload:
                    with zipfile.ZipFile(payload) as npz:
                        for key in keys:
                            self._read_member(npz, key, sizes.get(key), header_only, f"{where}: tensor {key!r}")
        except AdapterError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise AdapterError(f"{where}: tensor {key!r}: not a readable numpy array: {exc}") from None

    def _read_member(
        self, npz: zipfile.ZipFile, key: str, size: Optional[int], header_only: bool, where: str
    ) -> None:
        info = _bounded_member(npz, key + ".npy", where)
        with npz.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version not in ((1, 0), (2, 0)):
                raise AdapterError(f"{where}: .npy format version {version} is not supported")
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(member)
            if dtype.hasobject:
                raise AdapterError(f"{where}: holds Python objects; refusing to unpickle")
            shape = tuple(int(d) for d in shape)
            count = int(np.prod(shape, dtype=object))
            needed = count * dtype.itemsize
            if needed > info.file_size:
                raise AdapterError(
                    f"{where}: shape {shape} of {dtype} needs {needed} bytes, the member holds {info.file_size}"
                )
            self._specs[key] = (dtype, shape)
            if size is not None and dtype.kind != "f":
                raise AdapterError(f"{where} has dtype {dtype}, expected a float type")
            if size is not None and count != size:
                raise AdapterError(f"{where} has shape {shape}; the plan needs {size} elements")
            if header_only:
                return
            data = member.read(needed)
            if len(data) != needed:
                raise AdapterError(f"{where}: the member ended early")
        array = np.frombuffer(data, dtype=dtype)
        self._loaded[key] = array.reshape(shape, order="F" if fortran else "C").copy()


def _bounded_member(archive: zipfile.ZipFile, name: str, where: str) -> zipfile.ZipInfo:
    """``name``'s entry in ``archive``, refused when it inflates like a zip bomb."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise AdapterError(f"{where}: no member {name!r}") from None
    if info.file_size > _INFLATION_FREE_BYTES and info.file_size > MAX_INFLATION * max(info.compress_size, 1):
        raise AdapterError(
            f"{where}: member {name!r} inflates {info.compress_size} bytes to {info.file_size}; refusing a zip bomb"
        )
    return info


def read_singa_states(path: str) -> SingaStates:
    """The model-state tensors of a ``save_states`` zip, by tensor name (read lazily,
    see :class:`SingaStates`); only names and attributes are read here, within bounds."""
    try:
        with open_regular(path, "SINGA checkpoint") as handle, zipfile.ZipFile(handle) as archive:
            members = set(archive.namelist())
            if SINGA_TENSORS_MEMBER not in members:
                raise AdapterError(f"{path}: not a SINGA save_states checkpoint (no {SINGA_TENSORS_MEMBER} inside)")
            attrs: object = {}
            if SINGA_ATTRS_MEMBER in members:
                with archive.open(_bounded_member(archive, SINGA_ATTRS_MEMBER, path)) as raw:
                    text = raw.read(MAX_ATTRS_BYTES + 1)
                if len(text) > MAX_ATTRS_BYTES:
                    raise AdapterError(f"{path}: {SINGA_ATTRS_MEMBER} is larger than {MAX_ATTRS_BYTES} bytes")
                attrs = strict_json.loads(text.decode("utf-8"), max_objects=MAX_MEMBERS + 1)
            with archive.open(_bounded_member(archive, SINGA_TENSORS_MEMBER, path)) as payload:
                with zipfile.ZipFile(payload) as npz:
                    listed = npz.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: not a readable SINGA save_states checkpoint: {exc}") from None
    if len(listed) > MAX_MEMBERS:
        raise AdapterError(f"{path}: {SINGA_TENSORS_MEMBER} holds more than {MAX_MEMBERS} members")
    if not isinstance(attrs, dict):
        raise AdapterError(f"{path}: {SINGA_ATTRS_MEMBER} is not a JSON object")
    names = [member[: -len(".npy")] for member in listed if member.endswith(".npy")]
    return SingaStates(path, [
        name for name in names
        if not (isinstance(attrs.get(name), dict) and attrs[name].get("state_type") == _AUX_STATE)
    ])


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
    stored = [(op, _stored_specs(op, adapter_name, states)) for op in plan.ops]
    preload = getattr(states, "preload", None)
    if callable(preload):  # one pass over the archive, each tensor checked from its header first
        preload({
            next(n for n in _native_names(op, name, adapter_name) if n in states): int(np.prod(shape, dtype=object))
            for op, specs in stored for name, shape in specs.items() if shape is not None
        })
    tensors: dict[str, np.ndarray] = {}
    for op, specs in stored:
        read = {name: _canonical(path, states, op, name, shape, adapter_name, graph) for name, shape in specs.items()}
        if isinstance(op, AddPrompt) and _PROMPT in op.tensor_specs() and _PROMPT not in read:
            read = _with_encoder_prompt(path, op, read)
        tensors.update({f"{op.path}.{name}" if op.path else name: value for name, value in read.items()})
    return adapter_name, tensors


def _encoder_names(op: PlanOp, adapter: str, states: Mapping[str, np.ndarray]) -> list[str]:
    """Canonical names (``encoder.<module>``) of the P-tuning encoder tensors the
    checkpoint holds for prompt op ``op`` and ``adapter``."""
    start, end = f"{op.path}.{_ENCODER}", f".{adapter}"
    return sorted(
        _ENCODER + key[len(start) : -len(end)] for key in states
        if key.startswith(start) and key.endswith(end) and len(key) > len(start) + len(end)
    )


def _stored_specs(op: PlanOp, adapter: str, states: Mapping[str, np.ndarray]) -> dict[str, Optional[tuple]]:
    """The canonical tensors of ``op`` read from the checkpoint, with their shapes (None:
    as stored). A P-tuning prompt is not stored; its encoder's tensors are read instead
    (those of the op's encoder, or, for a loading plan, those the checkpoint holds)."""
    specs: dict[str, Optional[tuple]] = {name: tuple(spec.shape) for name, spec in op.tensor_specs().items()}
    if not isinstance(op, AddPrompt) or _PROMPT not in specs:
        return specs
    if not op.encoder:
        encoder = _encoder_names(op, adapter, states)
        if any(n in states for n in _native_names(op, _PROMPT, adapter)) or f"{_ENCODER}embedding.weight" not in encoder:
            return specs
        specs.update({name: None for name in encoder})
    specs.pop(_PROMPT)
    return specs


def _with_encoder_prompt(path: str, op: AddPrompt, found: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``found`` plus the prompt its encoder computes (and, for a loading plan, which has
    no encoder, without the encoder's tensors)."""
    where = f"{path}: the P-tuning encoder of {op.path!r}"
    prompt = encoder_prompt({k[len(_ENCODER) :]: v for k, v in found.items() if k.startswith(_ENCODER)}, where)
    expected = tuple(op.tensor_specs()[_PROMPT].shape)
    if tuple(prompt.shape) != expected:
        raise AdapterError(f"{where} computes a prompt of shape {tuple(prompt.shape)}; the plan needs {expected}")
    kept = found if op.encoder else {k: v for k, v in found.items() if not k.startswith(_ENCODER)}
    return {**kept, _PROMPT: prompt}


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
    names = [next(iter(op.tensor_specs()))]
    if isinstance(op, AddPrompt):  # P-tuning stores its encoder instead of the prompt
        names.append(f"{_ENCODER}embedding.weight")
    patterns = []
    for template in (t for name in names for t in _native_names(op, name, _SLOT)):
        prefix, suffix = template.split(_SLOT)
        patterns.append(re.compile(re.escape(prefix) + "(?P<adapter>.+)" + re.escape(suffix)))
    candidates = sorted({m["adapter"] for key in states for p in patterns for m in [p.fullmatch(key)] if m})
    return [
        candidate for candidate in candidates
        if all(
            any(n in states for n in _native_names(o, t, candidate)) for o in ops for t in _stored_specs(o, candidate, states)
        )
    ]


def _first_expected(plan: RewritePlan) -> str:
    for op in plan.ops:
        for name in op.tensor_specs():
            return _native_names(op, name, "<adapter>")[0]
    return ""


def _canonical(
    path: str, states: Mapping[str, np.ndarray], op: PlanOp, name: str, shape: Optional[tuple],
    adapter: str, graph: Optional[ModelGraph],
) -> np.ndarray:
    key = next(n for n in _native_names(op, name, adapter) if n in states)
    spec = getattr(states, "spec", None)
    if shape is None:  # a tensor taken as stored (a loading plan's P-tuning encoder)
        shape = tuple(spec(key)[1]) if callable(spec) else tuple(np.asarray(states[key]).shape)
    if callable(spec):  # dtype and size from the header, before any data is read
        dtype, stored = spec(key)
        if dtype.kind != "f":
            raise AdapterError(f"{path}: tensor {key!r} has dtype {dtype}, expected a float type")
        if int(np.prod(stored, dtype=object)) != int(np.prod(shape, dtype=object)):
            raise AdapterError(f"{path}: tensor {key!r} has shape {tuple(stored)}; the plan needs canonical {shape}")
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
        if not os.path.isfile(path):  # never opens a FIFO or a device
            return False
        try:
            with open_regular(path, "SINGA checkpoint") as handle:
                if not zipfile.is_zipfile(handle):
                    return False
                with zipfile.ZipFile(handle) as archive:
                    return SINGA_TENSORS_MEMBER in archive.namelist()
        except (AdapterError, zipfile.BadZipFile, OSError):
            return False

    def adapter_tensors(
        self, path: str, plan: RewritePlan, adapter_name: Optional[str], graph: Optional[ModelGraph]
    ) -> tuple[str, dict[str, np.ndarray]]:
        return singa_adapter_tensors(path, plan, adapter_name, graph)
