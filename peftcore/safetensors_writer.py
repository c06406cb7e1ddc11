"""Writing ``.safetensors`` files as a stream of buffers, for the one writer.

Every file of a save is written through a descriptor the writer created
(:mod:`peftcore.save_dir`), and the ``safetensors`` library writes only to a path it opens
itself (``save_file``) or into one new ``bytes`` object (``save``, which copies every
tensor twice and made saving several times slower). :func:`safetensors_buffers` gives
the file as a list of buffers instead: the 8-byte header length, the JSON header (padded
with spaces to a multiple of 8 bytes, as the format allows) and then each tensor's own
memory, uncopied, for the writer to pass to ``os.write``.

The layout is the format's (see :mod:`peftcore.safetensors_reader` for the reader):
tensors follow each other without gaps, ordered by element size, largest first, then by
name, so that every tensor starts at a multiple of its element size (as the library
lays them out, so a reader that maps the file finds them aligned). The files load with
the ``safetensors`` library, HF PEFT and peftcore's reader alike.
"""

from __future__ import annotations

import json
import struct
from typing import Mapping, Union

import numpy as np

from peftcore.errors import AdapterError

#: numpy dtype -> safetensors dtype name (the types an adapter file holds, and integers).
_NAMES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint64): "U64",
    np.dtype(np.uint32): "U32",
    np.dtype(np.uint16): "U16",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}

Buffer = Union[bytes, memoryview]


def safetensors_buffers(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> list[Buffer]:
    """``tensors`` and the string ``metadata`` as the consecutive buffers of one
    ``.safetensors`` file. Tensor memory is not copied unless it is not contiguous
    little-endian; the arrays must not change until the buffers are written."""
    if "__metadata__" in tensors:
        raise AdapterError("a tensor cannot be named '__metadata__' in a safetensors file")
    arrays = {}
    for name, value in tensors.items():
        array = np.asarray(value)
        dtype = array.dtype.newbyteorder("=") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _NAMES:
            raise AdapterError(f"tensor {name!r} has dtype {array.dtype}, which a safetensors file cannot hold")
        arrays[name] = np.asarray(array, dtype=dtype.newbyteorder("<"), order="C")
    order = sorted(arrays, key=lambda name: (-arrays[name].dtype.itemsize, name))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        array = arrays[name]
        header[name] = {
            "dtype": _NAMES[array.dtype.newbyteorder("=")],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    data = (arrays[name].reshape(-1).view(np.uint8).data for name in order if arrays[name].nbytes)
    return [struct.pack("<Q", len(text)), text, *data]
