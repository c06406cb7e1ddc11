"""What is loaded must stay finite where it reaches the outputs.

An adapter read from a file (or a state dict) is checked, unless the caller passes
``allow_non_finite=True``, so that finite inputs cannot give non-finite outputs:

- every tensor is free of NaN/Inf and fits its layer's dtype (``io.match_tensors``,
  and :func:`check_embedding_matrices` for the embedding matrices HF PEFT saves beside
  an adapter);
- every float scalar of the plan (LoRA's ``scaling``, which the config's ``lora_alpha``,
  ``r``, ``alpha_pattern``/``rank_pattern`` and ``use_rslora`` give) is finite in float32,
  the adapters' compute dtype (:func:`check_plan_scalars`);
- the factors of a layer's change, each finite, must not overflow together
  (:func:`check_adapter_gains`): for inputs with entries of magnitude at most 1, every
  intermediate of a LoRA (``A x``, ``B A x``, ``scaling B A x``) and of a bottleneck
  adapter, and every query-key product with a prefix's keys (prefix tuning, UniPELT),
  must fit the layer's dtype. The bound is computed from norms
  (``||A||_inf`` is the largest ``|A x|`` over such inputs, and ``||B||_inf ||A||_inf``
  bounds every partial sum of ``B (A x)``), so the check costs one pass over the
  tensors, as the NaN check does. It is an upper bound, and a sound one for the
  forward's partial sums; trained adapters are orders of magnitude below it.

Every failure is an :class:`~peftcore.errors.AdapterError` naming the file and the
config entry or tensor responsible. Nothing here runs in a forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import numpy as np

from peftcore.config import PeftConfig
from peftcore.errors import AdapterError
from peftcore.plan import PlanOp, RewritePlan

#: Largest finite value of each dtype a backend may report for a layer.
DTYPE_MAX = {
    "float16": 65504.0,
    "bfloat16": 3.3895313892515355e38,
    "float32": float(np.finfo(np.float32).max),
    "float64": float(np.finfo(np.float64).max),
}
FLOAT32_MAX = DTYPE_MAX["float32"]
_HINT = "(pass allow_non_finite=True to load it anyway)"


def count_non_finite(array: Any) -> int:
    """How many entries of ``array`` are NaN or Inf."""
    array = np.asarray(array)
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def check_values(array: Any, what: str, layer_dtype: Optional[str], source: str) -> None:
    """Refuse ``array`` (named ``what``) if it holds NaN/Inf or a value beyond the largest
    finite value of ``layer_dtype``."""
    array = np.asarray(array)
    bad = count_non_finite(array)
    if bad:
        raise AdapterError(f"{source}: {what} holds {bad} NaN/Inf value(s); refusing to load it {_HINT}")
    limit = DTYPE_MAX.get(layer_dtype or "")
    if limit is not None and array.size:
        largest = float(np.max(np.abs(array)))
        if largest > limit:
            raise AdapterError(
                f"{source}: {what} holds a value of magnitude {largest:.3g}, beyond the largest {layer_dtype} "
                f"its layer can hold; refusing to load it {_HINT}"
            )


def check_embedding_matrices(
    matrices: Mapping[str, Any], dtypes: Mapping[str, str], source: str
) -> None:
    """The full embedding matrices saved beside an adapter (layer path -> matrix) are
    copied into the base model: each must be finite and fit its layer's dtype."""
    for path, matrix in matrices.items():
        check_values(matrix, f"the embedding matrix for layer {path!r}", dtypes.get(path), source)


def check_plan_scalars(plan: RewritePlan, config: PeftConfig, source: str) -> None:
    """Every float field of every op of ``plan`` must be finite in float32 (a scaling of
    ``inf`` gives ``0 * inf = NaN`` even where the adapter's tensors are zero). The
    error names the config entry, through ``config.scalar_source(path, field)`` where
    the config has it."""
    describe = getattr(config, "scalar_source", None)
    for op in plan.ops:
        for field in dataclasses.fields(op):
            value = getattr(op, field.name)
            if not isinstance(value, float) or (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
                continue
            entry = describe(op.path, field.name) if callable(describe) else f"{field.name}"
            raise AdapterError(
                f"{source}: the config's {entry} gives layer {op.path!r} {field.name} = {value!r}, which is not "
                f"finite in float32 (the adapters' compute dtype); refusing to load it {_HINT}"
            )


def check_adapter_gains(
    plan: RewritePlan,
    tensors: Mapping[str, Any],
    dtypes: Mapping[str, str],
    source: str,
    key_of: Callable[[str], str] = str,
) -> None:
    """For inputs with entries of magnitude at most 1, every intermediate of each layer's
    change must fit the layer's dtype (float32 where unknown). ``tensors`` are canonical
    (``<path>.lora_A``...); ``key_of`` turns a canonical name into the file key shown."""
    for op in plan.ops:
        gains = _GAINS.get(op.op)
        if gains is None:
            continue
        limit = DTYPE_MAX.get(dtypes.get(op.path) or "float32", FLOAT32_MAX)
        problem = gains(op, tensors, limit)
        if problem is not None:
            names, largest, what = problem
            shown = " and ".join(repr(key_of(f"{op.path}.{name}" if op.path else name)) for name in names)
            raise AdapterError(
                f"{source}: tensors {shown} of layer {op.path!r} are finite but {what} reaches magnitude "
                f"{largest:.3g} for inputs of magnitude 1, beyond the largest {dtypes.get(op.path) or 'float32'} "
                f"value; refusing to load them {_HINT}"
            )


Gain = Callable[[PlanOp, Mapping[str, Any], float], Optional[tuple[tuple[str, ...], float, str]]]


def _row_sums(matrix: np.ndarray) -> float:
    """``||M||_inf``: the largest ``|M x|`` entry over inputs with ``|x_j| <= 1``."""
    return float(np.max(np.sum(np.abs(matrix), axis=1))) if matrix.size else 0.0


def _lora_gain(op: Any, tensors: Mapping[str, Any], limit: float) -> Optional[tuple[tuple[str, ...], float, str]]:
    a_name, b_name = "lora_A", "lora_B"
    a_key, b_key = f"{op.path}.{a_name}", f"{op.path}.{b_name}"
    if a_key not in tensors or b_key not in tensors:
        return None
    a = np.asarray(tensors[a_key], dtype=np.float64)
    b = np.asarray(tensors[b_key], dtype=np.float64)
    scale = max(1.0, abs(float(op.scaling)))  # the product is formed before and after scaling
    embedding = getattr(op, "layer_kind", "linear") == "embedding"
    # an embedding's input is one-hot: A contributes one column, no row sum
    a_gain = float(np.max(np.abs(a))) if embedding and a.size else _row_sums(a)
    if a_gain > limit:
        return (a_name,), a_gain, "A x"
    gain = _row_sums(b) * a_gain * scale
    if gain > limit or not math.isfinite(gain):
        return (a_name, b_name), gain, f"B A x, scaled by {op.scaling:.3g},"
    return None


def _bottleneck_gain(op: Any, tensors: Mapping[str, Any], limit: float) -> Optional[tuple[tuple[str, ...], float, str]]:
    names = ("adapter.down.weight", "adapter.down.bias", "adapter.up.weight", "adapter.up.bias")
    keys = [f"{op.path}.{name}" for name in names]
    if any(key not in tensors for key in keys):
        return None
    down, down_bias, up, up_bias = (np.asarray(tensors[key], dtype=np.float64) for key in keys)
    # relu/gelu/silu/tanh never grow a value's magnitude
    inner = _row_sums(down) + (float(np.max(np.abs(down_bias))) if down_bias.size else 0.0)
    outer = _row_sums(up) * inner + (float(np.max(np.abs(up_bias))) if up_bias.size else 0.0)
    if max(inner, outer) > limit or not math.isfinite(outer):
        return names, max(inner, outer), "up(act(down y))"
    return None


def _key_block_gain(table: np.ndarray, width: int) -> float:
    """The largest ``sum |k|`` over one layer's key (or value) vector of a prefix table:
    ``q . k`` for a query with entries of magnitude at most 1 stays below it."""
    if not table.size or width <= 0 or table.shape[-1] % width:
        return 0.0
    return float(np.max(np.sum(np.abs(table.reshape(-1, width)), axis=1)))


def _prefix_table_gain(op: Any, tensors: Mapping[str, Any], limit: float) -> Optional[tuple[tuple[str, ...], float, str]]:
    name = "prefix_encoder.prompt_embeddings"  # with a projection, this is the MLP's output HF PEFT saves
    key = f"{op.path}.{name}"
    if key not in tensors:
        return None
    gain = _key_block_gain(np.asarray(tensors[key], dtype=np.float64), int(op.width))
    return ((name,), gain, "q . k over a prefix key") if gain > limit or not math.isfinite(gain) else None


def _prefix_gain(op: Any, tensors: Mapping[str, Any], limit: float) -> Optional[tuple[tuple[str, ...], float, str]]:
    key = f"{op.path}.prefix.keys"
    if key not in tensors:
        return None
    gain = _key_block_gain(np.asarray(tensors[key], dtype=np.float64), int(op.width))
    return (("prefix.keys",), gain, "q . k over a prefix key") if gain > limit or not math.isfinite(gain) else None


_GAINS: dict[str, Gain] = {
    "lora": _lora_gain,
    "bottleneck_adapter": _bottleneck_gain,
    "prefix_encoder": _prefix_table_gain,
    "prefix": _prefix_gain,
}
