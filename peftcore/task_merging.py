"""TIES, DARE and magnitude pruning: combining task tensors, as HF PEFT's ``add_weighted_adapter`` does.

Each function takes the adapters' tensors of one layer (all the same shape: LoRA's A
factors, or B factors, or the full deltas for the ``_svd`` forms) and their weights,
and returns one tensor:

- ``magnitude_prune``: keep the ``int(density * size)`` largest magnitudes of each
  tensor, then the weighted sum;
- ``ties`` (Yadav et al., 2023): magnitude pruning, then per entry a sign is elected
  (``majority_sign_method`` ``"total"``: the sign of the sum of the pruned tensors;
  ``"frequency"``: the sign most of them have, ties going positive) and the weighted
  entries that agree with it are averaged over how many agree;
- ``dare_linear`` (Yu et al., 2023): each entry kept with probability ``density`` and the
  kept ones divided by ``density``, then the weighted sum; ``dare_ties``: that pruning,
  then TIES's sign election and disjoint mean.

The random masks come from ``keep_mask(shape, density)``, so a backend can draw them on
its framework's RNG (the torch shell uses torch's, as HF PEFT does).
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np

#: Draws a 0/1 float mask of ``shape``, each entry 1 with probability ``density``.
KeepMask = Callable[[tuple[int, ...], float], np.ndarray]

#: ``combination_type`` values of this module (each also has an ``_svd`` form over the deltas).
PRUNING_COMBINATIONS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


def numpy_keep_mask(shape: tuple[int, ...], density: float) -> np.ndarray:
    """A Bernoulli(``density``) mask from numpy's default generator."""
    return (np.random.default_rng().random(shape) < density).astype(np.float64)


def magnitude_pruned(tensor: np.ndarray, density: float) -> np.ndarray:
    """``tensor`` with all but its ``int(density * size)`` largest magnitudes zeroed."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.size)
    mask = np.zeros(tensor.size)
    mask[np.argsort(-np.abs(tensor).reshape(-1), kind="stable")[:keep]] = 1.0
    return tensor * mask.reshape(tensor.shape)


def randomly_pruned(tensor: np.ndarray, density: float, keep_mask: KeepMask) -> np.ndarray:
    """DARE's drop-and-rescale: entries kept with probability ``density``, divided by it."""
    if density >= 1:
        return tensor
    return tensor * keep_mask(tuple(tensor.shape), density) / density


def majority_sign_mask(stacked: np.ndarray, method: str) -> np.ndarray:
    """Which entries of ``stacked`` (tensors along axis 0) have the elected sign."""
    signs = np.sign(stacked)
    votes = stacked.sum(axis=0) if method == "total" else signs.sum(axis=0)
    return signs == np.where(votes >= 0, 1.0, -1.0)


def combine(
    kind: str,
    tensors: Sequence[np.ndarray],
    weights: Sequence[float],
    density: float,
    sign_method: str = "total",
    keep_mask: KeepMask = numpy_keep_mask,
) -> np.ndarray:
    """One tensor from ``tensors`` weighted by ``weights`` by ``kind`` (one of
    :data:`PRUNING_COMBINATIONS`, or ``"linear"``: the weighted sum)."""
    if kind != "linear" and density >= 1:
        warnings.warn(f"density {density} is at least 1: nothing is pruned", UserWarning, stacklevel=3)
    arrays = [np.asarray(t, dtype=np.float64) for t in tensors]
    if kind in ("ties", "magnitude_prune"):
        arrays = [magnitude_pruned(t, density) for t in arrays]
    elif kind in ("dare_linear", "dare_ties"):
        arrays = [randomly_pruned(t, density, keep_mask) for t in arrays]
    elif kind != "linear":
        raise ValueError(f"unknown combination {kind!r}")
    stacked = np.stack(arrays)
    weighted = stacked * np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * (stacked.ndim - 1))
    if kind in ("ties", "dare_ties"):
        agree = majority_sign_mask(stacked, sign_method)
        return (weighted * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)
    return weighted.sum(axis=0)
