"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

One writer and one reader for every backend, on numpy. Tensor keys follow Hugging Face
PEFT (``base_model.model.<layer path>.lora_A.weight``...), built from the canonical names
each plan op declares, so an adapter saved by one backend loads into the same
architecture built with another, and into HF PEFT. peftcore's own data (format version
and the rewrite plan) is stored under the ``peftcore`` key of the safetensors header
metadata, where HF PEFT does not look, with a copy of the config.

Files are never pickled, and reading treats them as hostile (see
:mod:`peftcore.safetensors_reader`). Saving goes through the one writer,
:class:`peftcore.save_dir.SaveDirectory`: both files are written in full under temporary
names, then renamed into place, the weights file last: it carries the plan and the
config it belongs to, so a save interrupted at any point leaves a directory that loads
as the previous adapter or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from peftcore import strict_json
from peftcore.config import CONFIG_NAME, PeftConfig
from peftcore.errors import AdapterError, PeftCoreError
from peftcore.finite import check_values
from peftcore.model_ops import BASE_ROW
from peftcore.plan import RewritePlan, TensorSpec
from peftcore.safe_files import read_bounded
from peftcore.safetensors_reader import read_safetensors
from peftcore.safetensors_writer import safetensors_buffers
from peftcore.save_dir import Content, SaveDirectory
from peftcore.torch_weights import BIN_WEIGHTS_NAME, bin_bytes, bin_path, read_bin

WEIGHTS_NAME = "adapter_model.safetensors"
HF_PREFIX = "base_model.model."
METADATA_KEY = "peftcore"
FORMAT_VERSION = 1
DEFAULT_ADAPTER = "default"
#: Largest ``adapter_config.json`` read (real ones are a few kilobytes).
MAX_CONFIG_BYTES = 16 * 1024 * 1024
#: An adapter name names a folder: well under the usual 255-byte limit of a file name.
MAX_ADAPTER_NAME_BYTES = 200

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


@dataclass(frozen=True)
class AdapterFiles:
    """What an adapter directory holds, parsed and validated."""

    directory: str
    config: PeftConfig
    plan: Optional[RewritePlan]
    tensors: Mapping[str, np.ndarray]
    #: the weights file the tensors came from (safetensors, or torch's ``.bin``)
    weights_path: str = ""


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
    if adapter_name == BASE_ROW:
        raise AdapterError(f"adapter name {BASE_ROW!r} is reserved: in adapter_names it means the base model alone")
    if len(adapter_name.encode("utf-8", "surrogatepass")) > MAX_ADAPTER_NAME_BYTES or not adapter_name.isprintable():
        raise AdapterError(
            f"adapter name {adapter_name[:40]!r}... must be printable and at most {MAX_ADAPTER_NAME_BYTES} bytes "
            "(it names a folder)"
        )
    return adapter_name


def adapter_subfolders(adapter_names: Sequence[str]) -> dict[str, Optional[str]]:
    """The subfolder each adapter is saved in (None: the save directory itself, for
    ``default``), every name checked before anything is written. Whether a subfolder
    may be written (a real folder, not a link) is checked by the writer
    (:class:`peftcore.save_dir.SaveDirectory`), relative to the opened save directory."""
    return {name: None if check_adapter_name(name) == DEFAULT_ADAPTER else name for name in adapter_names}


def adapter_subdir(root: str, adapter_name: str) -> str:
    """Where adapter ``adapter_name`` lives under ``root`` (HF PEFT's layout)."""
    subfolder = adapter_subfolders([adapter_name])[adapter_name]
    return os.fspath(root) if subfolder is None else os.path.join(os.fspath(root), subfolder)


def save_adapter(
    directory: str,
    config: PeftConfig,
    plan: RewritePlan,
    tensors: Mapping[str, np.ndarray],
    base_matrices: Optional[Mapping[str, np.ndarray]] = None,
    auto_mapping: Optional[Mapping[str, str]] = None,
    safe_serialization: bool = True,
) -> None:
    """Write one adapter to ``directory`` (created if needed), all or nothing, through
    :class:`~peftcore.save_dir.SaveDirectory`. Arguments as :func:`adapter_file_contents`;
    the other weights format's old file is removed after, so the directory never holds two
    weights files that disagree."""
    files = adapter_file_contents(config, plan, tensors, base_matrices, auto_mapping, safe_serialization)
    with SaveDirectory.open(directory) as folder:
        folder.write_files([(None, name, content) for name, content in files])
        folder.remove_regular(stale_weights_name(safe_serialization))


def stale_weights_name(safe_serialization: bool) -> str:
    """The weights file of the format not written (removed after a save)."""
    return BIN_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME


def adapter_file_contents(
    config: PeftConfig,
    plan: RewritePlan,
    tensors: Mapping[str, np.ndarray],
    base_matrices: Optional[Mapping[str, np.ndarray]] = None,
    auto_mapping: Optional[Mapping[str, str]] = None,
    safe_serialization: bool = True,
) -> list[tuple[str, Content]]:
    """The files of one adapter, in the order they are renamed into place: the config,
    then the weights (the commit point; made only when written), every tensor checked
    against ``plan`` first. ``base_matrices`` are base model weights stored beside it
    under their HF keys (HF PEFT's saved embeddings). ``auto_mapping`` is HF PEFT's
    record of the base model's class for an adapter without a task type
    (``{"base_model_class": ..., "parent_library": ...}``); HF writes the key, null, for
    the others. ``safe_serialization=False`` gives torch's ``adapter_model.bin`` (HF
    PEFT's keys, no peftcore plan) instead of safetensors."""
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
    for key, value in (base_matrices or {}).items():
        if key in hf_tensors:
            raise AdapterError(f"base matrix {key!r} has the name of one of the adapter's tensors")
        hf_tensors[key] = np.ascontiguousarray(value)
    config_dict, own_fields = config.hf_dict()  # HF PEFT's keys in the JSON file, peftcore's with the weights
    config_dict["auto_mapping"] = dict(auto_mapping) if auto_mapping is not None else None
    record = {"format_version": FORMAT_VERSION, "plan": plan.to_dict(), "config": config_dict}
    if own_fields:
        record["peftcore_config"] = own_fields
    metadata = {"format": "pt", METADATA_KEY: json.dumps(record)}
    text = json.dumps(config_dict, indent=2, sort_keys=True)
    if not safe_serialization:
        return [(CONFIG_NAME, text.encode("utf-8")), (BIN_WEIGHTS_NAME, lambda: [bin_bytes(hf_tensors)])]
    return [(CONFIG_NAME, text.encode("utf-8")), (WEIGHTS_NAME, lambda: safetensors_buffers(hf_tensors, metadata))]


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
        if os.path.isfile(bin_path(directory)):  # an older adapter, or HF's safe_serialization=False
            return AdapterFiles(directory, config, None, read_bin(bin_path(directory)), bin_path(directory))
        raise AdapterError(f"{weights_path}: file is missing (and there is no {BIN_WEIGHTS_NAME} either)")
    tensors, metadata = read_safetensors(weights_path)
    plan = None
    if METADATA_KEY in metadata:
        plan, saved_config, own_fields = _parse_record(metadata[METADATA_KEY], weights_path)
        if saved_config is not None and _hf_fields(saved_config) != _hf_fields(data):
            warnings.warn(
                f"{config_path} differs from the config saved with {WEIGHTS_NAME} (an interrupted save or "
                "an edit by hand); using the one saved with the weights",
                stacklevel=2,
            )
            data = saved_config
            config = _parse_config(data, f"{weights_path}: config in '{METADATA_KEY}' metadata")
        if own_fields:
            config = _parse_config({**data, **own_fields}, f"{weights_path}: config in '{METADATA_KEY}' metadata")
    if plan is not None:
        check_plan_matches_config(plan, config, weights_path)
    return AdapterFiles(directory, config, plan, tensors, weights_path)


def check_plan_matches_config(plan: RewritePlan, config: PeftConfig, where: str) -> None:
    """Refuse a stored plan that disagrees with its config where a reader of the config
    alone (HF PEFT, ``convert --to hf``) would compute something else (each method says
    what, :meth:`~peftcore.config.PeftConfig.plan_disagreement`)."""
    if plan.method != config.method:
        raise AdapterError(f"{where}: the stored plan is for method {plan.method!r}, the config for {config.method!r}")
    try:
        reason = config.plan_disagreement(plan)
    except PeftCoreError as exc:
        raise AdapterError(f"{where}: {exc}") from None
    if reason:
        raise AdapterError(f"{where}: {reason}; refusing an adapter whose plan and config would load differently")


def _read_config_json(path: str) -> Any:
    raw = read_bounded(path, MAX_CONFIG_BYTES, "adapter config")  # a regular file only: never a FIFO
    try:
        return _strict_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterError(f"{path}: not a readable JSON file: {exc}") from None


def _strict_json(text: str) -> Any:
    """``json.loads`` that refuses what standard JSON has no place for: NaN, Infinity,
    numbers too large for a float or an int64, nesting too deep (see
    :mod:`peftcore.strict_json`)."""
    return strict_json.loads(text)


def _parse_config(data: Any, source: str) -> PeftConfig:
    from peftcore.registry import PeftRegistry

    try:
        return PeftRegistry.config_from_dict(data)
    except PeftCoreError as exc:
        raise AdapterError(f"{source}: {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as exc:
        # a value no validator foresaw; still the file's fault, so still an AdapterError
        raise AdapterError(f"{source}: invalid config: {type(exc).__name__}: {exc}") from None


def _hf_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict without the keys that say who wrote it (``auto_mapping``, ``peft_version``...)."""
    return {k: v for k, v in data.items() if k not in PeftConfig.hf_metadata_fields}


def _parse_record(text: str, weights_path: str) -> tuple[RewritePlan, Optional[dict], dict]:
    """The plan, the config (when present) and the config's peftcore-only fields stored
    in the ``peftcore`` metadata."""
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
        own_fields = record.get("peftcore_config", {})
        if not isinstance(own_fields, dict):
            raise ValueError(f"'peftcore_config' must be an object, got {type(own_fields).__name__}")
        return RewritePlan.from_dict(record["plan"]), saved_config, own_fields
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, PeftCoreError) as exc:
        raise AdapterError(f"{weights_path}: bad '{METADATA_KEY}' metadata: {exc}") from None


class LoadResult(NamedTuple):
    """What ``load_adapter`` reports, as torch's ``load_state_dict`` (and so HF PEFT)
    does: ``missing_keys`` (always empty: a missing tensor is an error) and the
    ``unexpected_keys`` a non-strict load skipped."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def unexpected_tensor_keys(plan: RewritePlan, keys: Iterable[str]) -> list[str]:
    """The file keys (with or without HF's prefix) that are no tensor of ``plan``."""
    known = {_hf_key(spec) for spec in plan.tensor_specs().values()}
    return [key for key in keys if key not in known and HF_PREFIX + key not in known]


def match_tensors(
    plan: RewritePlan,
    tensors: Mapping[str, np.ndarray],
    source: str,
    strict: bool = True,
    *,
    allow_non_finite: bool = False,
    dtypes: Optional[Mapping[str, str]] = None,
) -> dict[str, np.ndarray]:
    """Map file tensors (HF keys) onto the plan's canonical names, checking each one.

    Keys may carry HF PEFT's ``base_model.model.`` prefix or not. Missing tensors, wrong
    shapes and non-float dtypes are errors; unexpected keys are errors when ``strict``.
    Names, dtypes and shapes are checked (from the file's header when it has one) before
    any tensor is read, and only the tensors the plan needs are read. Unless
    ``allow_non_finite``, a tensor holding NaN/Inf, or values beyond the largest finite
    value of its layer's dtype (``dtypes``: layer path -> dtype name), is an error.
    """
    by_key: dict[str, str] = {}
    specs = plan.tensor_specs()
    for name, spec in specs.items():
        by_key[_hf_key(spec)] = name
    # names, dtypes and shapes first, from the file's header where it has one: no tensor
    # data is read until everything the plan needs is known to be there and to fit
    header_spec = getattr(tensors, "spec", None)
    keys: dict[str, str] = {}
    unexpected = []
    for key in tensors:
        canonical = by_key.get(key) or by_key.get(HF_PREFIX + key)
        if canonical is None:
            unexpected.append(key)
            continue
        if canonical in keys:
            raise AdapterError(f"{source}: tensor {key!r} is stored twice (with and without {HF_PREFIX!r})")
        spec = specs[canonical]
        dtype, shape = header_spec(key) if callable(header_spec) else (tensors[key].dtype, tensors[key].shape)
        if np.dtype(dtype).type not in _FLOAT_DTYPES:
            raise AdapterError(f"{source}: tensor {key!r} has dtype {np.dtype(dtype)}, expected a float type")
        if tuple(shape) != tuple(spec.shape):
            raise AdapterError(f"{source}: tensor {key!r} has shape {tuple(shape)}, expected {tuple(spec.shape)}")
        keys[canonical] = key
    missing = [_hf_key(s) for n, s in specs.items() if n not in keys]
    if missing:
        raise AdapterError(f"{source}: missing tensor(s) {', '.join(repr(m) for m in missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected and strict:
        raise AdapterError(
            f"{source}: unexpected tensor(s) {', '.join(repr(u) for u in unexpected[:5])} that the adapter's "
            f"plan does not create (pass strict=False to ignore them)"
        )
    found = {canonical: tensors[key] for canonical, key in keys.items()}
    if not allow_non_finite:
        layer_of = {
            (f"{op.path}.{name}" if op.path else name): op.path for op in plan.ops for name in op.tensor_specs()
        }
        for canonical, array in found.items():
            check_values(array, f"tensor {keys[canonical]!r}", (dtypes or {}).get(layer_of.get(canonical, "")), source)
    return found


def hf_key_of(plan: RewritePlan) -> Callable[[str], str]:
    """Canonical tensor name -> the key it has in an adapter file (for messages)."""
    specs = plan.tensor_specs()
    return lambda name: _hf_key(specs[name]) if name in specs else name


def _hf_key(spec: TensorSpec) -> str:
    """The key a tensor has in the file: under ``base_model.model.`` unless it is a
    top-level entry (prompt tuning's ``prompt_embeddings``)."""
    return spec.hf_name if spec.hf_root else HF_PREFIX + spec.hf_name
