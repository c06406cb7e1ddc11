"""A strict reader for ``.safetensors`` files, in pure Python and numpy.

Adapter files come from anywhere, so loading treats them as hostile: the header is
parsed and checked in full (its length against the file, its JSON, every entry's
dtype, shape and byte range, the ranges against each other) before any tensor byte is
read, and every problem is an :class:`~peftcore.errors.AdapterError` that names the
file and the offending entry. Nothing is unpickled or executed, no native parser sees
the bytes, and nothing is allocated beyond what the file itself holds.

The format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON mapping
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the data section that follows the header) plus an optional
``"__metadata__"`` object of strings, then the data section, which the tensors must
cover exactly, without gaps or overlaps. Files are written by
:mod:`peftcore.safetensors_writer`.

Tensors are read lazily: :func:`read_safetensors` checks the whole header and returns a
mapping whose :meth:`SafetensorsTensors.spec` gives each tensor's dtype and shape from
the header alone, so a loader checks names, shapes and sizes against its plan first and
reads only the tensors it needs (a header declaring an 8 GiB tensor over a sparse hole
costs nothing unless the plan asks for exactly that tensor). Only a regular file is
opened (never a FIFO or device); a file changed after its header was read is refused.
"""

from __future__ import annotations

import math
import os
import struct
from io import BufferedReader
from typing import Any, Iterator, Mapping

import numpy as np

from peftcore import strict_json
from peftcore.errors import AdapterError
from peftcore.safe_files import open_regular

#: Largest header read (the ``safetensors`` library allows 100 MB; an adapter of 200,000
#: tensors needs about 25).
MAX_HEADER_BYTES = 32 * 1024 * 1024

#: Most tensors a file may declare (counted while its header is parsed).
MAX_TENSORS = 200_000

#: Most dimensions a tensor may have (numpy's limit on older versions).
MAX_DIMS = 32

#: safetensors dtype name -> (little-endian numpy dtype it is read as, bytes per element).
#: BF16 has no numpy type: it is read as raw 16-bit words and widened to float32 exactly.
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U64": ("<u8", 8),
    "U32": ("<u4", 4),
    "U16": ("<u2", 2),
    "U8": ("u1", 1),
    "BOOL": ("?", 1),
}

_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


class SafetensorsTensors(Mapping[str, np.ndarray]):
    """The tensors of a checked safetensors file, each read from the file when first
    asked for (and kept); :meth:`spec` answers from the header without reading."""

    def __init__(self, path: str, entries: list[tuple[str, str, tuple, int, int]], data_start: int, identity: tuple) -> None:
        self.path = path
        self._entries = {entry[0]: entry for entry in entries}
        self._data_start = data_start
        self._identity = identity
        self._loaded: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._loaded:
            entry = self._entries[key]
            try:
                with open_regular(self.path, "safetensors file") as handle:
                    if _identity(handle) != self._identity:
                        raise AdapterError(f"{self.path}: tensor {key!r}: the file changed after its header was read")
                    self._loaded[key] = _read_tensor(handle, self._data_start, entry, self.path)
            except OSError as exc:
                raise AdapterError(f"{self.path}: tensor {key!r}: cannot read it: {exc}") from None
        return self._loaded[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def subset(self, keys: Any) -> SafetensorsTensors:
        """The same file's tensors named in ``keys`` only (still read lazily)."""
        part = SafetensorsTensors(self.path, [self._entries[k] for k in keys], self._data_start, self._identity)
        part._loaded = {k: v for k, v in self._loaded.items() if k in part._entries}
        return part

    def spec(self, key: str) -> tuple[np.dtype, tuple[int, ...]]:
        """``(numpy dtype it loads as, shape)`` from the header alone."""
        _, dtype, shape, _, _ = self._entries[key]
        return (np.dtype(np.float32) if dtype == "BF16" else np.dtype(DTYPES[dtype][0]).newbyteorder("=")), shape


def read_safetensors(path: str) -> tuple[SafetensorsTensors, dict[str, str]]:
    """Check the header of the safetensors file at ``path``; return its tensors (read
    lazily, see :class:`SafetensorsTensors`) and its string metadata."""
    try:
        with open_regular(path, "safetensors file") as handle:
            identity = _identity(handle)
            size = identity[2]
            header_len, header = _read_header(handle, size, path)
            metadata = _check_metadata(header.pop("__metadata__", {}), path)
            data_size = size - 8 - header_len
            entries = [_check_entry(key, value, data_size, path) for key, value in header.items()]
            _check_layout(entries, data_size, path)
    except OSError as exc:
        raise AdapterError(f"{path}: cannot read the file: {exc}") from None
    return SafetensorsTensors(path, entries, 8 + header_len, identity), metadata


def _identity(handle: Any) -> tuple:
    info = os.fstat(handle.fileno())
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _read_header(handle: BufferedReader, size: int, path: str) -> tuple[int, dict[str, Any]]:
    if size < 8:
        raise AdapterError(f"{path}: not a safetensors file: {size} bytes, too short for the header length")
    (header_len,) = struct.unpack("<Q", handle.read(8))
    if header_len > MAX_HEADER_BYTES:
        raise AdapterError(
            f"{path}: not a valid safetensors file: header length {header_len} is more than the "
            f"{MAX_HEADER_BYTES} bytes allowed"
        )
    if header_len > size - 8:
        raise AdapterError(
            f"{path}: not a valid safetensors file: header length {header_len} exceeds the "
            f"{size - 8} bytes after it (truncated or corrupt)"
        )
    try:
        header = strict_json.loads(
            handle.read(header_len).decode("utf-8"), max_objects=MAX_TENSORS + 2, object_pairs_hook=_no_duplicate_keys
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterError(f"{path}: not a valid safetensors file: header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: not a valid safetensors file: header is a {type(header).__name__}, not an object")
    return header_len, header


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def _check_metadata(metadata: Any, path: str) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterError(f"{path}: '__metadata__' must be an object of strings, got {metadata!r:.200}")
    return metadata


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(key: str, entry: Any, data_size: int, path: str) -> tuple[str, str, tuple, int, int]:
    """Validate one header entry; returns ``(key, dtype, shape, begin, end)``."""
    where = f"{path}: tensor {key!r}"
    if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
        raise AdapterError(f"{where}: header entry must have exactly {sorted(_ENTRY_FIELDS)}, got {entry!r:.200}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise AdapterError(f"{where}: unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_size(d) and d < 2**62 for d in shape):
        raise AdapterError(
            f"{where}: shape must be a list of at most {MAX_DIMS} sizes (non-negative integers), got {shape!r:.200}"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)):
        raise AdapterError(f"{where}: data_offsets must be two non-negative integers, got {offsets!r:.200}")
    begin, end = offsets
    if begin > end:
        raise AdapterError(f"{where}: data_offsets {offsets} run backwards")
    if end > data_size:
        raise AdapterError(
            f"{where}: data ends at byte {end} but the data section has only {data_size} bytes (truncated file?)"
        )
    needed = math.prod(shape) * DTYPES[dtype][1]
    if needed != end - begin:
        raise AdapterError(
            f"{where}: shape {shape} of {dtype} needs {needed} bytes, its data_offsets {offsets} span {end - begin}"
        )
    return key, dtype, tuple(shape), begin, end


def _check_layout(entries: list[tuple[str, str, tuple, int, int]], data_size: int, path: str) -> None:
    """The tensors must tile the data section: no overlap, no gap, nothing after."""
    position = 0
    for key, _, _, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else f"leaves a gap at byte {position}"
            raise AdapterError(f"{path}: tensor {key!r}: data_offsets [{begin}, {end}] {problem}")
        position = end
    if position != data_size:
        raise AdapterError(f"{path}: {data_size - position} bytes after the last tensor belong to no entry")


def _read_tensor(handle: BufferedReader, data_start: int, entry: tuple[str, str, tuple, int, int], path: str) -> np.ndarray:
    key, dtype, shape, begin, end = entry
    handle.seek(data_start + begin)
    buffer = bytearray(end - begin)
    if handle.readinto(buffer) != len(buffer):
        raise AdapterError(f"{path}: tensor {key!r}: the file ended while reading it (changed while being read?)")
    array = np.frombuffer(buffer, dtype=np.dtype(DTYPES[dtype][0])).reshape(shape)
    if dtype == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="), copy=False)
