"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

One writer and one reader for every backend, on numpy. Tensor keys follow Hugging Face
PEFT (``base_model.model.<layer path>.lora_A.weight``...), built from the canonical names
each plan op declares, so an adapter saved by one backend loads into the same
architecture built with another, and into HF PEFT. peftcore's own data (format version
and the rewrite plan) is stored under the ``peftcore`` key of the safetensors header
metadata, where HF PEFT does not look, with a copy of the config.

Files are never pickled, and reading treats them as hostile (see
:mod:`peftcore.safetensors_reader`). Saving writes both files in full under temporary
names, then renames them into place, the weights file last: it carries the plan and
the config it belongs to, so a save interrupted at any point leaves a directory that
loads as the previous adapter or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np

from peftcore.config import CONFIG_NAME, PeftConfig
from peftcore.errors import AdapterError, PeftCoreError
from peftcore.graph import ModelGraph
from peftcore.methods.lora import AddLora
from peftcore.plan import RewritePlan, TensorSpec
from peftcore.safetensors_reader import read_safetensors

WEIGHTS_NAME = "adapter_model.safetensors"
HF_PREFIX = "base_model.model."
METADATA_KEY = "peftcore"
FORMAT_VERSION = 1
DEFAULT_ADAPTER = "default"
#: Largest ``adapter_config.json`` read (real ones are a few kilobytes).
MAX_CONFIG_BYTES = 16 * 1024 * 1024

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
#: Largest finite value of each dtype a backend may report for a layer.
_DTYPE_MAX = {
    "float16": 65504.0,
    "bfloat16": 3.3895313892515355e38,
    "float32": float(np.finfo(np.float32).max),
    "float64": float(np.finfo(np.float64).max),
}


@dataclass(frozen=True)
class AdapterFiles:
    """What an adapter directory holds, parsed and validated."""

    directory: str
    config: PeftConfig
    plan: Optional[RewritePlan]
    tensors: Mapping[str, np.ndarray]


def check_adapter_name(adapter_name: str) -> str:
    """Refuse adapter names that are not a single plain path component, so that an
    adapter's folder (``<save dir>/<name>``) can never lie outside the save directory
    nor take the place of the default adapter's files."""
    if not isinstance(adapter_name, str) or not adapter_name:
        raise AdapterError(f"adapter name must be a non-empty string, got {adapter_name!r}")
    bad = (
        adapter_name in (".", "..")
        or os.path.isabs(adapter_name)
        or any(ch in adapter_name for ch in ("/", "\\", "\0", ":"))
    )
    if bad:
        raise AdapterError(f"adapter name {adapter_name!r} must be a plain name (no path separators or '..')")
    if adapter_name in (CONFIG_NAME, WEIGHTS_NAME):
        raise AdapterError(f"adapter name {adapter_name!r} is the name of an adapter file; pick another name")
    return adapter_name


def adapter_subdir(root: str, adapter_name: str) -> str:
    """Where adapter ``adapter_name`` lives under ``root`` (HF PEFT's layout)."""
    check_adapter_name(adapter_name)
    return os.fspath(root) if adapter_name == DEFAULT_ADAPTER else os.path.join(os.fspath(root), adapter_name)


def save_adapter(
    directory: str, config: PeftConfig, plan: RewritePlan, tensors: Mapping[str, np.ndarray]
) -> None:
    """Write one adapter to ``directory`` (created if needed)."""
    specs = plan.tensor_specs()
    missing = sorted(set(specs) - set(tensors))
    extra = sorted(set(tensors) - set(specs))
    if missing or extra:
        raise AdapterError(f"backend exported tensors that do not match the plan: missing {missing}, extra {extra}")
    hf_tensors: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        array = np.ascontiguousarray(tensors[name])
        if tuple(array.shape) != tuple(spec.shape):
            raise AdapterError(f"tensor {name!r} has shape {array.shape}, plan says {spec.shape}")
        hf_tensors[_hf_key(spec)] = array
    config_dict = config.to_dict()
    record = {"format_version": FORMAT_VERSION, "plan": plan.to_dict(), "config": config_dict}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(record)}
    text = json.dumps(config_dict, indent=2, sort_keys=True)
    os.makedirs(directory, exist_ok=True)
    from safetensors.numpy import save_file

    _write_files_atomically(
        directory,
        [
            (CONFIG_NAME, lambda tmp: _write_text(tmp, text)),
            (WEIGHTS_NAME, lambda tmp: save_file(hf_tensors, tmp, metadata=metadata)),  # the commit point
        ],
    )


def read_adapter(directory: str) -> AdapterFiles:
    """Read and parse an adapter directory; every problem is an :class:`AdapterError`.

    When the weights file carries the config it was saved with (peftcore writes one)
    and ``adapter_config.json`` says otherwise (a save interrupted between its two
    renames, or an edit by hand), the copy saved with the weights is used, with a
    warning: it is the one that belongs to the tensors.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise AdapterError(f"adapter directory {directory!r} does not exist")
    config_path = os.path.join(directory, CONFIG_NAME)
    data = _read_config_json(config_path)
    config = _parse_config(data, config_path)

    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise AdapterError(f"{weights_path}: file is missing")
    tensors, metadata = read_safetensors(weights_path)
    plan = None
    if METADATA_KEY in metadata:
        plan, saved_config = _parse_record(metadata[METADATA_KEY], weights_path)
        if saved_config is not None and saved_config != data:
            warnings.warn(
                f"{config_path} differs from the config saved with {WEIGHTS_NAME} (an interrupted save or "
                "an edit by hand); using the one saved with the weights",
                stacklevel=2,
            )
            config = _parse_config(saved_config, f"{weights_path}: config in '{METADATA_KEY}' metadata")
    return AdapterFiles(directory, config, plan, tensors)


def _read_config_json(path: str) -> Any:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise AdapterError(f"{path}: file is missing") from None
    except OSError as exc:
        raise AdapterError(f"{path}: not a readable JSON file: {exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes, not an adapter config")
    try:
        return _strict_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterError(f"{path}: not a readable JSON file: {exc}") from None


def _strict_json(text: str) -> Any:
    """``json.loads`` that refuses what standard JSON has no place for: NaN, Infinity
    and numbers too large for a float (Python's parser would make them infinite)."""

    def finite(literal: str) -> float:
        value = float(literal)
        if not np.isfinite(value):
            raise ValueError(f"number {literal[:40]} is out of range")
        return value

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    return json.loads(text, parse_float=finite, parse_constant=refuse)


def _parse_config(data: Any, source: str) -> PeftConfig:
    from peftcore.registry import PeftRegistry

    try:
        return PeftRegistry.config_from_dict(data)
    except PeftCoreError as exc:
        raise AdapterError(f"{source}: {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as exc:
        # a value no validator foresaw; still the file's fault, so still an AdapterError
        raise AdapterError(f"{source}: invalid config: {type(exc).__name__}: {exc}") from None


def _parse_record(text: str, weights_path: str) -> tuple[RewritePlan, Optional[dict]]:
    """The plan and (when present) the config stored in the ``peftcore`` metadata."""
    try:
        record = _strict_json(text)
        if not isinstance(record, dict) or "plan" not in record:
            raise ValueError("no 'plan' entry")
        version = record.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"format_version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(f"format version {version} is newer than this peftcore")
        saved_config = record.get("config")
        if saved_config is not None and not isinstance(saved_config, dict):
            raise ValueError(f"'config' must be an object, got {type(saved_config).__name__}")
        return RewritePlan.from_dict(record["plan"]), saved_config
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, PeftCoreError) as exc:
        raise AdapterError(f"{weights_path}: bad '{METADATA_KEY}' metadata: {exc}") from None


def match_tensors(
    plan: RewritePlan, tensors: Mapping[str, np.ndarray], source: str, strict: bool = True
) -> dict[str, np.ndarray]:
    """Map file tensors (HF keys) onto the plan's canonical names, checking each one.

    Keys may carry HF PEFT's ``base_model.model.`` prefix or not. Missing tensors, wrong
    shapes and non-float dtypes are errors; unexpected keys are errors when ``strict``.
    """
    by_key: dict[str, str] = {}
    specs = plan.tensor_specs()
    for name, spec in specs.items():
        by_key[_hf_key(spec)] = name
    found: dict[str, np.ndarray] = {}
    unexpected = []
    for key, array in tensors.items():
        canonical = by_key.get(key) or by_key.get(HF_PREFIX + key)
        if canonical is None:
            unexpected.append(key)
            continue
        if canonical in found:
            raise AdapterError(f"{source}: tensor {key!r} is stored twice (with and without {HF_PREFIX!r})")
        spec = specs[canonical]
        if array.dtype.type not in _FLOAT_DTYPES:
            raise AdapterError(f"{source}: tensor {key!r} has dtype {array.dtype}, expected a float type")
        if tuple(array.shape) != tuple(spec.shape):
            raise AdapterError(f"{source}: tensor {key!r} has shape {tuple(array.shape)}, expected {tuple(spec.shape)}")
        found[canonical] = array
    missing = [_hf_key(s) for n, s in specs.items() if n not in found]
    if missing:
        raise AdapterError(f"{source}: missing tensor(s) {', '.join(repr(m) for m in missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected and strict:
        raise AdapterError(
            f"{source}: unexpected tensor(s) {', '.join(repr(u) for u in unexpected[:5])} that the adapter's "
            f"plan does not create (pass strict=False to ignore them)"
        )
    return found


def check_safe_to_merge(adapters: Mapping[str, tuple[RewritePlan, Mapping[str, np.ndarray]]], graph: ModelGraph) -> None:
    """Raise :class:`AdapterError` unless merging ``adapters`` (name -> (plan, exported
    tensors), in merge order) keeps the merged weights finite.

    Every tensor must be free of NaN and Inf, and for each LoRA layer the summed delta
    ``scaling * B @ A`` of all the adapters must fit the layer's dtype. The base
    weights stay with the backend, so a finite weight plus a fitting delta whose sum
    still overflows (a weight already near its dtype's limit) is not caught here.
    """
    deltas: dict[str, np.ndarray] = {}
    for name, (plan, tensors) in adapters.items():
        for key, array in tensors.items():
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            if bad:
                raise AdapterError(f"adapter {name!r}: tensor {key!r} has {bad} NaN/Inf value(s); refusing to merge it")
        for op in plan.ops:
            if not isinstance(op, AddLora):
                continue
            a, b = tensors.get(f"{op.path}.lora_A"), tensors.get(f"{op.path}.lora_B")
            if a is None or b is None:
                continue
            dtype = graph.get(op.path).dtype if op.path in graph else "float32"
            compute = np.float64 if dtype == "float64" else np.float32
            with np.errstate(over="ignore", invalid="ignore"):
                delta = (np.asarray(b, dtype=compute) @ np.asarray(a, dtype=compute)) * compute(op.scaling)
                total = deltas[op.path] + delta if op.path in deltas else delta
            largest = float(np.max(np.abs(total))) if total.size else 0.0
            if not largest <= _DTYPE_MAX.get(dtype, _DTYPE_MAX["float32"]):
                raise AdapterError(
                    f"adapter {name!r}: merging tensors '{op.path}.lora_A' and '{op.path}.lora_B' would put values "
                    f"of magnitude {largest:.3g} into layer {op.path!r} ({dtype}), which overflows; refusing to merge it"
                )
            deltas[op.path] = total


def _hf_key(spec: TensorSpec) -> str:
    """The key a tensor has in the file: under ``base_model.model.`` unless it is a
    top-level entry (prompt tuning's ``prompt_embeddings``)."""
    return spec.hf_name if spec.hf_root else HF_PREFIX + spec.hf_name


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _write_files_atomically(directory: str, files: list[tuple[str, Callable[[str], Any]]]) -> None:
    """Write each ``(name, write)`` of ``files`` in ``directory`` so that no reader (and
    no crash) ever sees a partly written file.

    Every file is first written in full through ``write(tmp_path)`` to a hidden
    temporary name and flushed to disk; only then are they renamed over their targets,
    in order, so the last one is the commit point. Temporary files are removed on any
    error; a process killed outright leaves a ``.<name>.*.tmp`` file, which readers ignore.
    """
    staged: list[str] = []
    mode = _file_mode()
    try:
        for name, write in files:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            os.close(fd)
            staged.append(tmp)
            write(tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.chmod(tmp, mode)  # mkstemp makes files private (0600)
        for (name, _), tmp in zip(files, staged):
            os.replace(tmp, os.path.join(directory, name))
    finally:
        for tmp in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
    _fsync_directory(directory)


def _file_mode() -> int:
    """The mode ``open()`` would give a new file: 0666 less the process umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask



def _fsync_directory(directory: str) -> None:
    """Make the renames durable too (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
