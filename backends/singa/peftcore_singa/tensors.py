"""The SINGA backend's tensor primitives (see :mod:`peftcore.primitives`).

Writes happen in place (``copy_from_numpy``, ``copy_data``), so a tensor keeps its
identity and its name, which SINGA optimizers key their state by and a recorded graph
holds. Arithmetic for merging runs on the host in float64 (merges are rare; SINGA's
``+`` on tensors would build autograd nodes). A fingerprint is a hash of the bits.
"""

from __future__ import annotations

import hashlib
from typing import Any, Hashable, Sequence

import numpy as np

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import tensor  # noqa: E402

from peftcore.errors import AdapterError  # noqa: E402
from peftcore.primitives import TensorPrimitives  # noqa: E402

#: SINGA dtype codes (``tensor.float32``...) and their numpy types and names.
NP_DTYPES = {tensor.float32: np.float32, tensor.float16: np.float16, tensor.int32: np.int32}
DTYPE_NAMES = {tensor.float32: "float32", tensor.float16: "float16", tensor.int32: "int32"}


def to_numpy(t: Any) -> np.ndarray:
    """A host numpy copy of a SINGA tensor (the tensor itself is not moved)."""
    return np.array(tensor.to_numpy(t), copy=True)


def copy_into(t: Any, array: Any) -> None:
    """Copy ``array`` into tensor ``t`` in place (cast to its dtype; same number of elements)."""
    value = np.asarray(array)
    if value.size != int(np.prod(t.shape)):
        raise AdapterError(f"cannot copy an array of shape {value.shape} into tensor {t.name!r} of shape {t.shape}")
    t.copy_from_numpy(np.ascontiguousarray(value.reshape(t.shape), dtype=NP_DTYPES.get(t.dtype, np.float32)))


def set_trainable_flags(t: Any, trainable: bool) -> None:
    """Freeze or unfreeze one tensor: SINGA optimizers update exactly the tensors with
    ``stores_grad``; ``requires_grad`` lets backward skip frozen subgraphs."""
    t.stores_grad = bool(trainable)
    t.requires_grad = bool(trainable)


class SingaTensors(TensorPrimitives):
    """Tensor primitives on ``singa.tensor.Tensor`` (a tensor trains when it ``stores_grad``)."""

    name = "singa"

    def to_numpy(self, t: Any) -> np.ndarray:
        return t if isinstance(t, np.ndarray) else to_numpy(t)

    def numel(self, t: Any) -> int:
        return int(np.prod(t.shape))

    def dtype_name(self, t: Any) -> str:
        return DTYPE_NAMES.get(t.dtype, "float32")

    def is_trainable(self, t: Any) -> bool:
        return bool(t.stores_grad)

    def set_trainable(self, t: Any, trainable: bool) -> None:
        set_trainable_flags(t, trainable)

    def write(self, t: Any, value: Any) -> Any:
        if isinstance(value, tensor.Tensor):
            t.copy_data(value)
        else:
            copy_into(t, value)
        return t

    def clone(self, t: Any) -> Any:
        copy = t.clone()
        copy.requires_grad = copy.stores_grad = False
        return copy

    def add_into(self, t: Any, deltas: Sequence[Any], sign: int) -> Any:
        total = to_numpy(t).astype(np.float64)
        for delta in deltas:
            change = np.asarray(delta, dtype=np.float64).reshape(total.shape)
            total = total + change if sign > 0 else total - change
        copy_into(t, total)
        return t

    def fingerprint(self, t: Any) -> Hashable:
        array = np.ascontiguousarray(to_numpy(t))
        return array.dtype.str, tuple(array.shape), hashlib.blake2b(array.tobytes(), digest_size=16).digest()


#: The one instance the backend's adapter layers and runtime use.
SINGA_TENSORS = SingaTensors()
