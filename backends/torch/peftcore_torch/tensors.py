"""The torch backend's tensor primitives (see :mod:`peftcore.primitives`).

Writes happen in place (``copy_`` under ``no_grad``), so a parameter keeps its identity,
and optimizers, tied weights and hooks that hold it stay valid. A fingerprint is the
tensor's identity, storage and in-place version plus two sums of its bits: an in-place
edit is seen from the version counter without hashing, and a copy, a move or a write
that bypassed the counter from the sums.

A bitsandbytes-quantised weight (:mod:`peftcore_torch.quantised`) is read as the dense
float32 weight it stands for and written by quantising the new value with the weight's
own settings, its codes and quant state replaced in place; ``clone`` copies its codes and
quant state, and writing such a copy back restores them exactly.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence, cast

import numpy as np
import torch

from peftcore.primitives import TensorPrimitives
from peftcore_torch import quantised
from peftcore_torch.quantised import quantised_kind

_FINGERPRINT_CHUNK = 1 << 20
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class TorchTensors(TensorPrimitives):
    """Tensor primitives on ``torch.Tensor`` (parameters train when ``requires_grad``)."""

    name = "torch"

    def to_numpy(self, tensor: Any) -> np.ndarray:
        """A CPU numpy copy; bfloat16 (which numpy lacks) becomes float32.

        The copy is made in torch before ``.numpy()``: a numpy view makes torch mark the
        parameter's own storage non-resizable, which breaks FSDP's resharding after export.
        """
        if isinstance(tensor, np.ndarray):
            return tensor
        if quantised_kind(tensor):
            return quantised.dequantise(tensor).cpu().numpy()
        tensor = tensor.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.to(torch.float32)
        host = tensor.cpu()
        return (host.clone() if host is tensor else host).numpy()

    def numel(self, tensor: Any) -> int:
        return quantised.dense_numel(tensor) if quantised_kind(tensor) else int(tensor.numel())

    def dtype_name(self, tensor: Any) -> str:
        return str(tensor.dtype).replace("torch.", "")

    def is_trainable(self, tensor: Any) -> bool:
        return bool(tensor.requires_grad)

    def set_trainable(self, tensor: Any, trainable: bool) -> None:
        tensor.requires_grad_(trainable)

    def write(self, tensor: Any, value: Any) -> Any:
        if quantised_kind(tensor):
            return self._write_quantised(tensor, value)
        source = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        with torch.no_grad():
            tensor.copy_(source.reshape(tensor.shape).to(device=tensor.device, dtype=tensor.dtype))
        return tensor

    def _write_quantised(self, tensor: Any, value: Any) -> Any:
        if quantised_kind(value) == quantised_kind(tensor):
            return quantised.assign_quantised(tensor, quantised.copy_quantised(value))
        dense = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        new = quantised.quantised_like(tensor, dense.detach().reshape(quantised.dense_shape(tensor)))
        return quantised.assign_quantised(tensor, new)

    def clone(self, tensor: Any) -> Any:
        return quantised.copy_quantised(tensor) if quantised_kind(tensor) else tensor.detach().clone()

    def add_into(self, tensor: Any, deltas: Sequence[Any], sign: int) -> Any:
        kind = quantised_kind(tensor)
        with torch.no_grad():
            total = quantised.dequantise(tensor) if kind else tensor.detach().to(torch.float32)
            for delta in deltas:
                change = delta.to(device=total.device, dtype=torch.float32)
                total = total + change if sign > 0 else total - change
            if kind:  # dequantised, added, quantised again
                return quantised.assign_quantised(tensor, quantised.quantised_like(tensor, total))
            tensor.copy_(total.to(tensor.dtype))
        return tensor

    def fingerprint(self, tensor: Any) -> Hashable:
        if quantised_kind(tensor):
            return quantised.quantised_fingerprint(tensor, bit_sums)
        return (id(tensor), tensor.data_ptr(), tensor._version, bit_sums(tensor))

    def unchanged_since(self, tensor: Any, fingerprint: Hashable) -> bool:
        if quantised_kind(tensor):
            return quantised.same_quantised_value(tensor, fingerprint, bit_sums)
        identity, pointer, version, sums = cast(tuple[int, int, int, tuple], fingerprint)
        if identity == id(tensor) and pointer == tensor.data_ptr() and version != tensor._version:
            return False  # written in place since: no need to hash
        return bool(sums == bit_sums(tensor))


def bit_sums(weight: torch.Tensor) -> tuple[str, tuple[int, ...], int, int]:
    """dtype, shape and two int64 sums of the tensor's bits (plain and position-weighted),
    computed in bounded chunks: equal for an unchanged tensor, different after an edit."""
    flat = weight.detach().reshape(-1)
    ints = flat.view(_INT_VIEW[flat.element_size()]) if flat.element_size() in _INT_VIEW else flat
    plain = weighted = 0
    for start in range(0, ints.numel(), _FINGERPRINT_CHUNK):
        chunk = ints[start : start + _FINGERPRINT_CHUNK].to(torch.int64)
        position = torch.arange(start, start + chunk.numel(), device=chunk.device, dtype=torch.int64) % 65521 + 1
        plain += int(chunk.sum())
        weighted += int((chunk * position).sum())
    return (str(weight.dtype), tuple(weight.shape), plain, weighted)


#: The one instance the backend's adapter layers and runtime use.
TORCH_TENSORS = TorchTensors()
