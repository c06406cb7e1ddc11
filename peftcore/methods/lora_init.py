"""LoRA initialisations that read the base weight: PiSSA, OLoRA, and orthogonal A/B.

HF PEFT's ``init_lora_weights`` values, with HF PEFT's meaning:

- ``"pissa"``: the top ``r`` singular triplets of the base weight ``W = U S V^T`` become
  the adapter, ``A = sqrt(S_r / scaling) V_r^T`` and ``B = U_r sqrt(S_r / scaling)``; the
  base keeps the rest, ``W_res = W - scaling * B @ A``, so the model's output is unchanged.
- ``"pissa_niter_K"``: the same from a randomized SVD with ``K`` subspace iterations
  (Halko et al., as ``torch.svd_lowrank`` computes it), for large weights.
- ``"olora"``: ``W = Q R``; ``B = Q[:, :r]`` and ``A = R[:r]``, and the base keeps
  ``W - scaling * B @ A``.
- ``"orthogonal"``: A and B from the odd and even rows of one random orthogonal
  ``r x r`` matrix, so ``B @ A = 0`` (the output is unchanged) while neither is zero.

Everything here is numpy over the canonical ``(out, in)`` weight; a layer reads its base
weight through its backend's primitives and writes the factors and ``W_res`` back
(:func:`initialise_from_base`), so every backend with a LoRA layer gets these inits.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import numpy as np

from peftcore.errors import AdapterError, ConfigError

#: A sampler of standard-normal values of a given shape (a backend's RNG, or numpy's).
NormalSampler = Callable[[tuple[int, ...]], np.ndarray]

_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")

#: The ``init_lora_weights`` strings handled here (besides ``pissa_niter_K``).
WEIGHT_INITS = ("pissa", "olora", "orthogonal")


def is_weight_init(init: str) -> bool:
    """Whether ``init`` (an op's ``init``) is one of this module's initialisations."""
    return init in WEIGHT_INITS or _PISSA_NITER.fullmatch(init) is not None


def changes_base(init: str) -> bool:
    """Whether ``init`` rewrites the base weight (PiSSA and OLoRA do; orthogonal does not)."""
    return init == "olora" or init.startswith("pissa")


def check_init_name(init: Any) -> None:
    """A :class:`ConfigError` unless ``init`` is a string this module knows."""
    if not isinstance(init, str) or not is_weight_init(init):
        raise ConfigError(f"unknown LoRA initialisation {init!r}; expected one of {WEIGHT_INITS} or 'pissa_niter_<K>'")


def pissa_factors(weight: np.ndarray, r: int, scaling: float, niter: Optional[int] = None,
                  rng: Optional[np.random.Generator] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` of PiSSA for the canonical ``(out, in)`` ``weight``: a full SVD, or a
    randomized one with ``niter`` subspace iterations."""
    w = np.asarray(weight, dtype=np.float64)
    if niter is None:
        u, s, vh = np.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, vh = randomized_svd(w, r, niter, rng if rng is not None else np.random.default_rng())
    root = np.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]


def randomized_svd(matrix: np.ndarray, rank: int, niter: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A rank-``rank`` ``(U, S, V^T)`` of ``matrix`` by Halko et al.'s range finder with
    ``niter`` power iterations, re-orthonormalised each time (torch's ``svd_lowrank``)."""
    rows, cols = matrix.shape
    rank = min(rank, rows, cols)
    q, _ = np.linalg.qr(matrix @ rng.standard_normal((cols, rank)))
    for _ in range(niter):
        z, _ = np.linalg.qr(matrix.T @ q)
        q, _ = np.linalg.qr(matrix @ z)
    u_small, s, vh = np.linalg.svd(q.T @ matrix, full_matrices=False)
    return q @ u_small, s, vh


def olora_factors(weight: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` of OLoRA for the canonical ``(out, in)`` ``weight``: ``R[:r]`` and ``Q[:, :r]``."""
    q, upper = np.linalg.qr(np.asarray(weight, dtype=np.float64))
    return upper[:r], q[:, :r]


def orthogonal_factors(r: int, in_features: int, out_features: int, normal: NormalSampler) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` with ``B @ A = 0``: A mixes the odd rows of a random orthogonal ``r x r``
    matrix, B its even rows (HF PEFT's orthogonal init, values scaled by 1/10). ``r`` must be even."""
    if r % 2:
        raise AdapterError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}")
    q, _ = np.linalg.qr(np.asarray(normal((r, r)), dtype=np.float64))
    a = (np.asarray(normal((in_features, r // 2)), dtype=np.float64) @ q[0::2]).T / 10.0
    b = np.asarray(normal((r // 2, out_features)), dtype=np.float64).T @ q[1::2] / 10.0
    return a, b


def factors_for(op: Any, weight: Optional[np.ndarray], normal: NormalSampler) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` of ``op.init`` for a LoRA op (``r``, ``scaling``, feature sizes) whose
    layer's canonical weight is ``weight`` (needed by PiSSA and OLoRA only)."""
    init = op.init
    if init == "orthogonal":
        return orthogonal_factors(op.r, op.in_features, op.out_features, normal)
    if weight is None:
        raise AdapterError(f"layer {op.path!r}: init_lora_weights={init!r} needs the base weight, which it cannot read")
    if init == "olora":
        return olora_factors(weight, op.r)
    match = _PISSA_NITER.fullmatch(init)
    if init == "pissa" or match:
        return pissa_factors(weight, op.r, op.scaling, int(match.group(1)) if match else None)
    raise AdapterError(f"layer {op.path!r}: unknown LoRA initialisation {init!r}")


def numpy_normal(shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal values from numpy's default generator (a backend without its own sampler)."""
    return np.random.default_rng().standard_normal(shape)


def initialise_from_base(layer: Any, adapter_name: str, op: Any, normal: NormalSampler = numpy_normal) -> None:
    """Give the adapter ``adapter_name`` of ``layer`` (an adapter layer with LoRA's
    ``lora_A``/``lora_B`` and a ``canonical_base_weight()``) the factors of ``op.init``;
    for PiSSA and OLoRA, also subtract ``scaling * B @ A`` from the base weight, in the
    weight's dtype, through the backend's primitives (the layer's ``delta_weight``, as an
    unmerge would). A float weight is required, as HF PEFT requires it."""
    weight = None
    if changes_base(op.init):
        if getattr(layer, "merged_adapters", None):
            raise AdapterError(
                f"layer {op.path!r}: adapters {layer.merged_adapters} are merged into the base weight; unmerge them "
                f"before adding an adapter with init_lora_weights={op.init!r}, which splits that weight"
            )
        raw = np.asarray(layer.canonical_base_weight())
        if not np.issubdtype(raw.dtype, np.floating):
            raise AdapterError(f"layer {op.path!r}: init_lora_weights={op.init!r} needs a float base weight, it is {raw.dtype}")
        weight = raw.astype(np.float64)
    a, b = factors_for(op, weight, normal)
    dtypes = layer.export(adapter_name)
    # the adapter's other tensors (DoRA's magnitude) are loaded back as they are
    layer.load(adapter_name, {**dtypes, "lora_A": a.astype(dtypes["lora_A"].dtype), "lora_B": b.astype(dtypes["lora_B"].dtype)})
    if weight is not None:
        target = layer.base_tensor("weight")
        residual = layer.primitives.add_into(target, [layer.delta_weight(adapter_name)], -1)
        if residual is not target:
            layer.set_base_tensor("weight", residual)


class BaseWeightInit:
    """Mixed into a backend's LoRA layer (before its adapter-layer base): after the layer
    adds an adapter, an op whose ``init`` is one of this module's gets its factors (and
    PiSSA/OLoRA their residual base weight) from :func:`initialise_from_base`. A failure
    removes the adapter again; the base weight is written last, so it is never half-changed.

    The layer supplies :meth:`canonical_base_weight` and may supply :meth:`init_normal`
    (its framework's RNG)."""

    def add(self, adapter_name: str, op: Any) -> None:
        super().add(adapter_name, op)  # type: ignore[misc]
        if not is_weight_init(str(getattr(op, "init", ""))):
            return
        try:
            initialise_from_base(self, adapter_name, op, self.init_normal)
        except BaseException:
            self.delete(adapter_name)  # type: ignore[attr-defined]
            raise

    def canonical_base_weight(self) -> np.ndarray:
        """The base weight as a numpy ``(out, in)`` array."""
        raise AdapterError(f"{type(self).__name__} cannot read its base weight for PiSSA/OLoRA")

    def init_normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """Standard-normal values for the orthogonal init (numpy's generator by default)."""
        return numpy_normal(shape)


class MagnitudeInit:
    """Mixed into a backend's LoRA layer (before :class:`BaseWeightInit`): after the layer
    adds an adapter whose op has ``use_dora``, its magnitude gets its value from the layer's
    ``init_magnitude`` (``||W + s B A||``, which needs the final factors and base weight, so
    it comes after any PiSSA/OLoRA init), and only then does the adapter run as DoRA (its
    ``use_dora`` entry switched on). A failure removes the adapter again."""

    def add(self, adapter_name: str, op: Any) -> None:
        super().add(adapter_name, op)  # type: ignore[misc]
        if not getattr(op, "use_dora", False):
            return
        layer: Any = self
        try:
            layer.init_magnitude(adapter_name)
        except BaseException:
            layer.delete(adapter_name)
            raise
        layer.use_dora[adapter_name] = True
