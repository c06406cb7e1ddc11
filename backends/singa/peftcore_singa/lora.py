"""LoRA layers for SINGA: ``layer.Linear``, ``layer.Gemm`` and ``layer.Embedding``.

Canonically A is ``(r, in_features)`` and B ``(out_features, r)`` (for an embedding,
``in_features`` is the vocabulary size and ``out_features`` the width). SINGA multiplies
``x @ W``, so the layers store the transposes, ``A`` as ``(in, r)`` and ``B`` as
``(r, out)``: the forward is then ``x @ A @ B`` with no transposes, and export/import
transpose at the boundary.

The forward uses only ``singa.autograd`` operators (Python operators on tensors would
cut the graph): SINGA's own, plus :class:`ScaledMatmul`, which applies the LoRA scaling
as a constant instead of a broadcast ``(1,)`` tensor (whose gradient SINGA would reduce
on every step). It flattens N-D input to 2-D around the matmuls (SINGA's matmul backward
aborts on 3-D input), and applies LoRA dropout with a fresh Bernoulli mask scaled by ``1/(1-p)``,
only while ``autograd.training`` is on and only when ``p > 0`` (``autograd.dropout``
takes its rate as a seed, keeps ``1-p`` scaled by ``1-p`` and reseeds the device RNG).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import autograd, layer, singa_wrap, tensor  # noqa: E402

from peftcore.errors import PlanError  # noqa: E402
from peftcore.methods.lora import MAGNITUDE, AddLora  # noqa: E402
from peftcore.methods.lora_init import BaseWeightInit, MagnitudeInit  # noqa: E402
from peftcore_singa.describe import is_linear_3d, linear_features  # noqa: E402
from peftcore_singa.dora import DoraParts  # noqa: E402
from peftcore_singa.layers import AdapterLayer  # noqa: E402
from peftcore_singa.tensors import to_numpy  # noqa: E402


class ScaledMatmul(autograd.Operator):
    """``scaling * x @ w`` for 2-D ``x`` and ``w``, with ``scaling`` a Python constant.

    One op instead of ``mul(matmul(x, w), s)``: ``autograd.mul`` with a ``(1,)`` scale
    tensor also computes the scale's gradient (a full reduction over the broadcast output)
    on every backward, the most expensive part of a small LoRA step. The scale is applied
    to ``x``, which has only ``r`` columns in LoRA's up projection, so it is cheap.
    """

    def __init__(self, scaling: float) -> None:
        super().__init__()
        self.scaling = float(scaling)

    def forward(self, x: Any, w: Any) -> Any:
        scaled = singa_wrap.MultFloat(x, self.scaling)
        if autograd.training:
            self.inputs = (scaled, w)
        return singa_wrap.Mult(scaled, w)

    def backward(self, dy: Any) -> tuple:
        scaled, w = self.inputs
        dx = singa_wrap.MultFloat(singa_wrap.Mult(dy, singa_wrap.DefaultTranspose(w)), self.scaling)
        dw = singa_wrap.Mult(singa_wrap.DefaultTranspose(scaled), dy)
        return dx, dw


def scaled_matmul(x: Any, w: Any, scaling: float) -> Any:
    """``scaling * x @ w``, differentiable in ``x`` and ``w`` (see :class:`ScaledMatmul`)."""
    return ScaledMatmul(scaling)(x, w)[0]


def lora_dropout(x: Any, p: float) -> Any:
    """Inverted dropout on ``x`` with rate ``p``: keep each element with probability
    ``1-p`` and scale kept ones by ``1/(1-p)``. Identity when ``p == 0`` or in eval mode."""
    if p <= 0.0 or not autograd.training:
        return x
    mask = tensor.Tensor(x.shape, x.device, x.dtype, requires_grad=False, stores_grad=False)
    mask.bernoulli(1.0 - p)
    mask *= 1.0 / (1.0 - p)  # in place on a constant: no graph needed
    return autograd.mul(x, mask)


class LoraLayer(MagnitudeInit, BaseWeightInit, DoraParts, AdapterLayer):
    adapter_tensor_names = ("lora_A", "lora_B", MAGNITUDE)
    other_param_names = ("scaling", "r", "dropout", "use_dora")
    scaling: dict[str, float]
    r: dict[str, int]
    dropout: dict[str, float]
    use_dora: dict[str, bool]

    def new_adapter(self, adapter_name: str, op: AddLora) -> dict[str, Any]:
        if op.use_dora and not self.takes_dora():
            raise PlanError(
                f"layer {op.path!r}: DoRA on SINGA takes layer.Linear and layer.Embedding; this is a "
                f"{type(self.base_layer).__name__} (use_dora=False there, or the torch backend)"
            )
        a = self.new_tensor((op.in_features, op.r), f"lora_A.{adapter_name}")
        b = self.new_tensor((op.r, op.out_features), f"lora_B.{adapter_name}")
        _initialise(a, b, op)
        # use_dora is switched on once the magnitude has its value (peftcore.methods.lora_init.MagnitudeInit)
        values = {"lora_A": a, "lora_B": b, "scaling": float(op.scaling), "r": int(op.r), "dropout": float(op.dropout), "use_dora": False}
        if op.use_dora:
            magnitude = self.new_tensor((op.out_features,), f"{MAGNITUDE}.{adapter_name}")
            magnitude.set_value(0.0)
            values[MAGNITUDE] = magnitude
        return values

    def takes_dora(self) -> bool:
        return True

    def canonical_export(self, name: str, array: np.ndarray) -> np.ndarray:
        return array.T

    def init_normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """SINGA's RNG (``Tensor.gaussian``, as the other inits use) for the orthogonal init."""
        values = tensor.Tensor(tuple(int(d) for d in shape), self.base_weight().device)
        values.gaussian(0.0, 1.0)
        return to_numpy(values).astype(np.float64)

    def native_import(self, name: str, array: np.ndarray) -> np.ndarray:
        return array.T

    def native_delta(self, adapter_name: str) -> np.ndarray:
        """The adapter's change in the stored ``(in, out)`` (or ``(vocab, dim)``) layout:
        ``scaling * A @ B``, or DoRA's whole change to the weight."""
        if self.use_dora.get(adapter_name, False):
            return self.dora_canonical_delta(adapter_name).T
        return self.native_lora_delta(adapter_name)

    def native_lora_delta(self, adapter_name: str) -> np.ndarray:
        """``scaling * A @ B`` in the stored layout."""
        a = to_numpy(self.lora_A[adapter_name]).astype(np.float64)
        b = to_numpy(self.lora_B[adapter_name]).astype(np.float64)
        return self.scaling[adapter_name] * (a @ b)

    def lora_update(self, adapter_name: str, x2d: Any) -> Any:
        """``scaling * (x @ A) @ B`` for 2-D ``x`` (``(N, in)`` -> ``(N, out)``)."""
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        self.device_check(x2d, a, b)
        return scaled_matmul(autograd.matmul(x2d, a), b, self.scaling[adapter_name])


class LoraLinear(LoraLayer):
    """LoRA around ``layer.Linear`` (W is ``(in, out)``), ``layer.Gemm`` (W is
    ``(out, in)`` with ``transB``, the default; ``alpha`` and ``transA`` are honoured) or
    SINGA's transformer example's ``Linear3D`` (W ``(in, out)``, 3-D input).

    Unlike a bare ``Linear``, the wrapper also accepts N-D input ``(..., in)``: it is
    flattened to 2-D for the base layer and the adapters, and the result reshaped back.
    """

    def features(self) -> tuple[int, int]:
        return linear_features(self.base_layer)

    def __getattr__(self, name: str) -> Any:
        """An attribute the wrapper lacks is the base layer's: SINGA code that reads the
        layer it called reads it (sonnx's run reads a Gemm's ``transB`` and ``bias``)."""
        try:
            return layer.Layer.__getattr__(self, name)
        except AttributeError:
            base = self.__dict__.get("base_layer")
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)

    def delta_weight(self, adapter_name: str) -> np.ndarray:
        delta = self.native_delta(adapter_name)
        base = self.base_layer
        if isinstance(base, layer.Gemm):
            delta = (delta.T if base.transB else delta) / float(base.alpha)
        return delta

    def takes_dora(self) -> bool:
        return not isinstance(self.base_layer, layer.Gemm) and not is_linear_3d(self.base_layer)

    def canonical_base_weight(self) -> np.ndarray:
        """The weight as ``(out, in)``, a Gemm's ``alpha`` folded in (``delta_weight``'s inverse)."""
        return self.canonical_of(self.base_layer.W)

    def canonical_of(self, weight_tensor: Any) -> np.ndarray:
        base = self.base_layer
        weight = to_numpy(weight_tensor).astype(np.float64)
        if isinstance(base, layer.Gemm):
            return (weight if base.transB else weight.T) * float(base.alpha)
        return weight.T

    def forward(self, x: Any) -> Any:
        base = self.base_layer
        trans_a = isinstance(base, layer.Gemm) and bool(base.transA)
        shape = tuple(x.shape)
        flat = x if trans_a or len(shape) == 2 else autograd.reshape(x, [-1, shape[-1]])
        result = _linear_3d(base, flat) if is_linear_3d(base) else base(flat)
        running = self.adapters_to_run()
        if running:
            lora_in = autograd.transpose(flat, [1, 0]) if trans_a else flat
            base_out = result
            for name in running:
                dropped = lora_dropout(lora_in, self.dropout[name])
                update = self.lora_update(name, dropped)
                if self.use_dora.get(name, False):
                    update = self.dora_change(name, self._weighted(base_out, dropped, lora_in), update)
                result = autograd.add(result, update)
        if flat is not x:
            result = autograd.reshape(result, list(shape[:-1]) + [int(result.shape[-1])])
        return result


    def _weighted(self, base_out: Any, dropped: Any, lora_in: Any) -> Any:
        """``x' @ W`` (no bias) for DoRA: the base output itself when it is exactly that
        (no bias, no dropout, nothing merged), else a product with the unmerged weight."""
        if dropped is lora_in and getattr(self.base_layer, "b", None) is None and not self.merged_adapters:
            return base_out
        return autograd.matmul(dropped, self.dora_weight_tensor())


def _linear_3d(base: Any, x2d: Any) -> Any:
    """What ``Linear3D`` computes (``x @ W (+ b)``), on the flattened input: SINGA's example
    layer slices its input per sample with ``x[i]``, which autograd cannot differentiate,
    so no gradient would reach the layers before it."""
    base.device_check(x2d, base.W)
    result = autograd.matmul(x2d, base.W)
    bias = getattr(base, "b", None)
    return autograd.add_bias(result, bias, axis=0) if bias is not None else result


class LoraEmbedding(LoraLayer):
    """LoRA around ``layer.Embedding``: rows of A (stored ``(vocab, r)``) are looked up
    like a table, then projected by B (stored ``(r, dim)``). No dropout, as in HF PEFT."""

    def features(self) -> tuple[int, int]:
        return int(self.base_layer.W.shape[0]), int(self.base_layer.W.shape[1])

    def delta_weight(self, adapter_name: str) -> np.ndarray:
        return self.native_delta(adapter_name)

    def canonical_of(self, weight_tensor: Any) -> np.ndarray:
        """The table ``(vocab, dim)`` as the canonical ``(dim, vocab)``."""
        return to_numpy(weight_tensor).astype(np.float64).T

    def forward(self, x: Any) -> Any:
        result = base_out = self.base_layer(x)
        out_shape = [int(d) for d in result.shape]
        for name in self.adapters_to_run():
            self.device_check(result, self.lora_A[name], self.lora_B[name])
            looked_up = autograd.embedding(x, self.lora_A[name])
            flat = autograd.reshape(looked_up, [-1, self.r[name]])
            update = scaled_matmul(flat, self.lora_B[name], self.scaling[name])
            if self.use_dora.get(name, False):  # the looked-up rows are W x
                weighted = autograd.embedding(x, self.dora_weight_tensor()) if self.merged_adapters else base_out
                update = self.dora_change(name, autograd.reshape(weighted, [-1, out_shape[-1]]), update)
            result = autograd.add(result, autograd.reshape(update, out_shape))
        return result


def _initialise(a: Any, b: Any, op: AddLora) -> None:
    """A as torch's ``kaiming_uniform_(a=sqrt(5))`` on the canonical ``(r, in)`` shape
    (bound ``1/sqrt(in)``) or normal with std ``1/r``; B zero, or random for ``init="random"``.
    An embedding's is A zero and B unit normal (see ``AddLora``)."""
    if op.layer_kind == "embedding" and op.init != "random":
        a.set_value(0.0)
        b.gaussian(0.0, 1.0)
        return
    if op.init == "gaussian":
        a.gaussian(0.0, 1.0 / op.r)
    else:
        bound = 1.0 / math.sqrt(max(op.in_features, 1))
        a.uniform(-bound, bound)
    if op.init == "random":
        bound_b = 1.0 / math.sqrt(op.r)
        b.uniform(-bound_b, bound_b)
    else:
        b.set_value(0.0)
