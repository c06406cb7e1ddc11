"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

One writer and one reader for every backend, on numpy. Tensor keys follow Hugging Face
PEFT (``base_model.model.<layer path>.lora_A.weight``...), built from the canonical names
each plan op declares, so an adapter saved by one backend loads into the same
architecture built with another, and into HF PEFT. peftcore's own data (format version
and the rewrite plan) is stored under the ``peftcore`` key of the safetensors header
metadata, where HF PEFT does not look. Files are never pickled; every file is written
to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np

from peftcore.config import CONFIG_NAME, PeftConfig
from peftcore.errors import AdapterError, PeftCoreError
from peftcore.plan import RewritePlan

WEIGHTS_NAME = "adapter_model.safetensors"
HF_PREFIX = "base_model.model."
METADATA_KEY = "peftcore"
FORMAT_VERSION = 1
DEFAULT_ADAPTER = "default"

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


@dataclass(frozen=True)
class AdapterFiles:
    """What an adapter directory holds, parsed and validated."""

    directory: str
    config: PeftConfig
    plan: Optional[RewritePlan]
    tensors: Mapping[str, np.ndarray]


def check_adapter_name(adapter_name: str) -> str:
    """Refuse adapter names that are not a single plain path component."""
    if not isinstance(adapter_name, str) or not adapter_name:
        raise AdapterError(f"adapter name must be a non-empty string, got {adapter_name!r}")
    bad = (
        adapter_name in (".", "..")
        or os.path.isabs(adapter_name)
        or any(ch in adapter_name for ch in ("/", "\\", "\0", ":"))
    )
    if bad:
        raise AdapterError(f"adapter name {adapter_name!r} must be a plain name (no path separators or '..')")
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
        hf_tensors[_hf_key(spec.hf_name)] = array
    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, "plan": plan.to_dict()}),
    }
    os.makedirs(directory, exist_ok=True)
    from safetensors.numpy import save_file

    _atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(hf_tensors, tmp, metadata=metadata))
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True)
    _atomic_write(os.path.join(directory, CONFIG_NAME), lambda tmp: _write_text(tmp, text))


def read_adapter(directory: str) -> AdapterFiles:
    """Read and parse an adapter directory; every problem is an :class:`AdapterError`."""
    from peftcore.registry import PeftRegistry

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise AdapterError(f"adapter directory {directory!r} does not exist")
    config_path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(config_path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise AdapterError(f"{config_path}: file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_path}: not a readable JSON file: {exc}") from None
    try:
        config = PeftRegistry.config_from_dict(data)
    except PeftCoreError as exc:
        raise AdapterError(f"{config_path}: {exc}") from None

    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise AdapterError(f"{weights_path}: file is missing")
    tensors, metadata = _read_safetensors(weights_path)
    plan = None
    if METADATA_KEY in metadata:
        try:
            record = json.loads(metadata[METADATA_KEY])
            if not isinstance(record, dict) or "plan" not in record:
                raise ValueError("no 'plan' entry")
            if int(record.get("format_version", 0)) > FORMAT_VERSION:
                raise ValueError(f"format version {record['format_version']} is newer than this peftcore")
            plan = RewritePlan.from_dict(record["plan"])
        except (ValueError, TypeError, PeftCoreError) as exc:
            raise AdapterError(f"{weights_path}: bad '{METADATA_KEY}' metadata: {exc}") from None
    return AdapterFiles(directory, config, plan, tensors)


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
        by_key[_hf_key(spec.hf_name)] = name
    found: dict[str, np.ndarray] = {}
    unexpected = []
    for key, array in tensors.items():
        canonical = by_key.get(key) or by_key.get(HF_PREFIX + key)
        if canonical is None:
            unexpected.append(key)
            continue
        spec = specs[canonical]
        if array.dtype.type not in _FLOAT_DTYPES:
            raise AdapterError(f"{source}: tensor {key!r} has dtype {array.dtype}, expected a float type")
        if tuple(array.shape) != tuple(spec.shape):
            raise AdapterError(f"{source}: tensor {key!r} has shape {tuple(array.shape)}, expected {tuple(spec.shape)}")
        found[canonical] = array
    missing = [_hf_key(s.hf_name) for n, s in specs.items() if n not in found]
    if missing:
        raise AdapterError(f"{source}: missing tensor(s) {', '.join(repr(m) for m in missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected and strict:
        raise AdapterError(
            f"{source}: unexpected tensor(s) {', '.join(repr(u) for u in unexpected[:5])} that the adapter's "
            f"plan does not create (pass strict=False to ignore them)"
        )
    return found


def _hf_key(hf_name: str) -> str:
    return HF_PREFIX + hf_name


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types and OSError
        raise AdapterError(f"{path}: not a valid safetensors file: {exc}") from None
    return tensors, metadata


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """Write through ``write(tmp_path)`` next to ``path``, then rename over it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
