"""The tensor primitives a backend supplies, over which the core writes everything else.

The core never touches a framework tensor itself. The adapter layer's lifecycle
(:mod:`peftcore.adapter_layer`: export, load, merge with an exact unmerge, unwrap) and the
model-wide operations (:mod:`peftcore.model_ops`) reach tensors only through one
:class:`TensorPrimitives` object per backend, in the spirit of einops' ``AbstractBackend``:
a few small, framework-specific operations, and every rule written once above them.

Two things are deliberately not assumed, so that a framework with immutable arrays
(JAX: an ``nnx.Variable`` holds a new array after each write) fits:

- a write may not happen in place: :meth:`TensorPrimitives.write` and
  :meth:`TensorPrimitives.add_into` *return* the tensor that holds the new value, and the
  caller stores it back where the old one was when it is a different object;
- a tensor has no identity or version the core could rely on: whether a tensor is still
  what it was is asked of :meth:`TensorPrimitives.fingerprint` and
  :meth:`TensorPrimitives.unchanged_since` (a backend may use identity and a version
  counter there as a fast path, as torch does).

Arrays cross the seam as numpy arrays in the tensor's own (native) layout; turning a
native layout into the canonical one is the adapter layer's job, not the primitives'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Hashable, Sequence

if TYPE_CHECKING:
    import numpy as np


class TensorPrimitives:
    """What a backend implements for its tensors (every method raises here).

    A backend's runtime (:class:`~peftcore.runtime.BackendRuntime`) is one of these, and
    its adapter layers name the same object as ``primitives``.
    """

    #: The backend's name, for messages.
    name: str = ""

    # -- reading --------------------------------------------------------------------------
    def to_numpy(self, tensor: Any) -> np.ndarray:
        """A host numpy copy of ``tensor`` in its native layout (numpy arrays pass
        through); a dtype numpy lacks (bfloat16) comes back as float32."""
        raise NotImplementedError

    def numel(self, tensor: Any) -> int:
        """How many values ``tensor`` holds."""
        raise NotImplementedError

    def shape(self, tensor: Any) -> tuple[int, ...]:
        """``tensor``'s shape as a tuple of ints."""
        return tuple(int(d) for d in tensor.shape)

    def dtype_name(self, tensor: Any) -> str:
        """``tensor``'s dtype by its canonical name (``"float32"``, ``"bfloat16"``...)."""
        raise NotImplementedError(f"backend {self.name!r} does not report tensor dtypes")

    # -- training state ---------------------------------------------------------------------
    def is_trainable(self, tensor: Any) -> bool:
        raise NotImplementedError

    def set_trainable(self, tensor: Any, trainable: bool) -> None:
        raise NotImplementedError

    # -- writing ----------------------------------------------------------------------------
    def write(self, tensor: Any, value: Any) -> Any:
        """Give ``tensor`` the value ``value`` (a numpy array, or a tensor of this backend,
        with as many elements), cast to ``tensor``'s dtype and kept on its device. Returns
        the tensor that now holds the value: ``tensor`` itself where writes happen in place."""
        raise NotImplementedError(f"backend {self.name!r} cannot write tensors")

    def clone(self, tensor: Any) -> Any:
        """A frozen copy of ``tensor``'s value (same dtype and device) that :meth:`write`
        accepts as ``value``: what a merge keeps to restore the original exactly."""
        raise NotImplementedError(f"backend {self.name!r} cannot copy tensors")

    def add_into(self, tensor: Any, deltas: Sequence[Any], sign: int) -> Any:
        """``tensor + sign * sum(deltas)``, summed in at least float32 and written into
        ``tensor`` in its dtype; returns the tensor holding the result (see :meth:`write`).
        ``deltas`` are what the layer's ``delta_weight`` returns, in ``tensor``'s layout."""
        raise NotImplementedError(f"backend {self.name!r} cannot merge adapters")

    # -- change detection --------------------------------------------------------------------
    def fingerprint(self, tensor: Any) -> Hashable:
        """A value that is equal for two calls exactly when ``tensor``'s value (dtype,
        shape and bits) is the same: how an exact unmerge knows the merged weight was
        not edited."""
        raise NotImplementedError(f"backend {self.name!r} cannot fingerprint tensors")

    def unchanged_since(self, tensor: Any, fingerprint: Hashable) -> bool:
        """Whether ``tensor`` still has the value ``fingerprint`` was taken of. A backend
        may answer from identity and a version counter first (cheaper than hashing)."""
        return bool(self.fingerprint(tensor) == fingerprint)
