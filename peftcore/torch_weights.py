"""``adapter_model.bin``: the torch-pickled weights file of older adapters, and of HF
PEFT's ``save_pretrained(safe_serialization=False)``.

Only torch reads and writes this format, so torch is imported here when such a file is
actually asked for, never before (``import peftcore`` stays framework-free). Reading
goes through ``torch.load(weights_only=True)``, the restricted unpickler that builds
nothing but tensors and plain containers (safe as of torch 2.6, required here); the
result must be a flat ``{name: dense tensor}`` dict, bounded like a safetensors file
(:mod:`peftcore.safetensors_reader`), and each tensor becomes a numpy array, so the
same name, shape and finiteness checks then apply (:func:`peftcore.io.match_tensors`).
Nothing but this one file name is ever unpickled. The file is read by the one reader
(:func:`peftcore.safe_files.read_bounded`) and written by the one writer
(:class:`peftcore.save_dir.SaveDirectory`, from :func:`bin_bytes`); this module opens no file.
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping

import numpy as np

from peftcore.errors import AdapterError
from peftcore.safe_files import read_bounded
from peftcore.safetensors_reader import MAX_DIMS, MAX_TENSORS

BIN_WEIGHTS_NAME = "adapter_model.bin"
#: The first torch whose ``weights_only`` unpickler is the default and the supported safe path.
MIN_TORCH = (2, 6)
#: Largest ``adapter_model.bin`` read (it is read whole into memory before unpickling).
MAX_BIN_BYTES = 16 * 1024**3
_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _torch(purpose: str) -> Any:
    try:
        import torch
    except ImportError:
        raise AdapterError(f"{purpose} needs torch (the .bin format is torch's pickle); install torch") from None
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2] if part.isdigit())
    if version < MIN_TORCH:
        raise AdapterError(
            f"{purpose} needs torch >= {'.'.join(map(str, MIN_TORCH))}, whose torch.load(weights_only=True) is the "
            f"safe loader; this is torch {torch.__version__}. Convert the file to safetensors with a newer torch"
        )
    return torch


def bin_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    """``tensors`` as ``torch.save`` writes them (a plain ``{name: tensor}`` dict), in memory."""
    torch = _torch("saving adapter_model.bin")
    buffer = io.BytesIO()
    torch.save({name: torch.from_numpy(np.ascontiguousarray(array)).clone() for name, array in tensors.items()}, buffer)
    return buffer.getvalue()


def read_bin(path: str) -> dict[str, np.ndarray]:
    """The tensors of torch weights file ``path`` as numpy arrays (bfloat16 widened
    exactly to float32); anything but a flat dict of dense tensors is an :class:`AdapterError`."""
    torch = _torch(f"reading {path}")
    raw = read_bounded(path, MAX_BIN_BYTES, "adapter weights")  # the one reader: a regular file, bounded
    try:
        loaded = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler's refusals are plain exceptions of many kinds
        raise AdapterError(f"{path}: not a torch weights file that loads safely: {type(exc).__name__}: {exc}") from None
    if not isinstance(loaded, dict):
        raise AdapterError(f"{path}: holds a {type(loaded).__name__}, expected a dict of tensors")
    if len(loaded) > MAX_TENSORS:
        raise AdapterError(f"{path}: holds {len(loaded)} entries; at most {MAX_TENSORS}")
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in loaded.items():
        where = f"{path}: entry {name!r:.80}"
        if not isinstance(name, str):
            raise AdapterError(f"{where}: tensor names must be strings")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.is_quantized:
            raise AdapterError(f"{where}: is a {type(tensor).__name__}, expected a dense tensor")
        if tensor.dim() > MAX_DIMS:
            raise AdapterError(f"{where}: has {tensor.dim()} dimensions; at most {MAX_DIMS}")
        dtype = str(tensor.dtype).replace("torch.", "")
        if dtype not in _FLOATS and tensor.is_floating_point():
            raise AdapterError(f"{where}: dtype {dtype} is not one adapters are stored in")
        detached = tensor.detach()
        arrays[name] = (detached.float() if dtype == "bfloat16" else detached).contiguous().numpy().copy()
    return arrays


def bin_path(directory: str) -> str:
    return os.path.join(os.fspath(directory), BIN_WEIGHTS_NAME)
