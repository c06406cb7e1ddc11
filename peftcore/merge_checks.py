"""The check before adapters are merged into the base weights.

What is loaded is checked by :mod:`peftcore.finite`. Before adapters are merged,
:func:`check_safe_to_merge` sums each mergeable op's change to its layer (the op's
numpy :meth:`~peftcore.plan.PlanOp.delta`: LoRA's ``scaling * B @ A``, BitFit's bias, a
third-party method's own) and refuses a merge whose change does not fit the layer's
dtype, before any layer is touched.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from peftcore.errors import AdapterError
from peftcore.finite import DTYPE_MAX
from peftcore.graph import ModelGraph
from peftcore.plan import RewritePlan


def check_safe_to_merge(
    adapters: Mapping[str, tuple[RewritePlan, Mapping[str, np.ndarray]]],
    graph: ModelGraph,
    dtypes: Optional[Mapping[str, str]] = None,
) -> None:
    """Raise :class:`AdapterError` unless merging ``adapters`` (name -> (plan, exported
    tensors), in merge order) keeps the merged weights finite.

    Every tensor must be free of NaN and Inf, and for each layer the summed change of
    all the adapters' mergeable ops (:meth:`~peftcore.plan.PlanOp.delta`, computed in
    float32, or float64 for a float64 layer) must fit the layer's dtype. The base
    tensors stay with the backend, so a finite weight plus a fitting change whose sum
    still overflows (a weight already near its dtype's limit) is not caught here, nor is
    an op whose change needs the base tensor (a multiplicative one) checked beyond its
    tensors being finite. ``dtypes`` gives each layer's dtype as it is now (the model may
    have been cast since it was described); the graph's is used only for a layer it
    does not name.
    """
    totals: dict[tuple[str, str], np.ndarray] = {}
    for name, (plan, tensors) in adapters.items():
        for key, array in tensors.items():
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            if bad:
                raise AdapterError(  # HF PEFT's opening words, which its users' code matches
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken: tensor {key!r} has "
                    f"{bad} NaN/Inf value(s); refusing to merge it"
                )
        for op in plan.ops:
            if op.merge_target is None:
                continue
            keys = {canonical: f"{op.path}.{canonical}" if op.path else canonical for canonical in op.tensor_specs()}
            if not keys or any(key not in tensors for key in keys.values()):
                continue
            dtype = (dtypes or {}).get(op.path) or (graph.get(op.path).dtype if op.path in graph else "float32")
            compute = np.float64 if dtype == "float64" else np.float32
            with np.errstate(over="ignore", invalid="ignore"):
                change = op.delta({c: np.asarray(tensors[k], dtype=compute) for c, k in keys.items()})
                if change is None:
                    continue
                target = (op.path, op.merge_target)
                total = totals[target] + change if target in totals else change
            largest = float(np.max(np.abs(total))) if total.size else 0.0
            if not largest <= DTYPE_MAX.get(dtype, DTYPE_MAX["float32"]):
                names = " and ".join(repr(key) for key in keys.values())
                raise AdapterError(
                    f"adapter {name!r}: merging tensors {names} would put values of magnitude {largest:.3g} "
                    f"into layer {op.path!r} ({dtype}), which overflows; refusing to merge it"
                )
            totals[target] = total
