"""BitFit for SINGA: a per-adapter trainable bias around a layer that has (or gets) one.

The adapter keeps the layer's full trained bias (``bitfit_bias[adapter]``, canonical name
``bias``, stored ``(size,)`` and named ``<path>.bitfit_bias.<adapter>``). Forward adds
``adapter bias - base bias`` to the base output, which is exactly zero at initialisation,
so the model's output is unchanged bit for bit until training moves it; several active
adapters add their changes. Merging writes the bias into the base layer (creating one for
a ``Linear``/``Gemm`` that had none, named ``<layer>.b`` as SINGA would) and unmerging
restores the original exactly.

Which tensor is "the bias": ``b`` of ``layer.Linear`` and ``layer.Gemm`` (a Gemm's
``(1, out)`` bias is seen as ``(out,)``, and its ``beta`` scales the change as it scales
``b``), and the ``bias`` attribute of any other layer (``BatchNorm2d``, user norm layers),
added along axis 1 for ``BatchNorm2d``/``Conv2d`` outputs and along the last axis otherwise.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import autograd, layer, tensor  # noqa: E402

from peftcore.errors import AdapterError, PlanError  # noqa: E402
from peftcore.methods.bitfit import TrainBias  # noqa: E402
from peftcore_singa.layers import AdapterLayer, constant  # noqa: E402
from peftcore_singa.tensors import to_numpy  # noqa: E402

_LINEAR = (layer.Linear, layer.Gemm)
#: Layers whose bias runs along axis 1 (channels), not the last axis.
_CHANNEL_FIRST = (layer.BatchNorm2d, layer.Conv2d, layer.SeparableConv2d)


def bias_attribute(base: Any) -> str:
    """The attribute that holds ``base``'s bias tensor."""
    return "b" if isinstance(base, _LINEAR) else "bias"


def base_bias(base: Any) -> Optional[Any]:
    """``base``'s bias tensor, or None when it has none."""
    value = base.__dict__.get(bias_attribute(base))
    return value if isinstance(value, tensor.Tensor) else None


class BiasAdapter(AdapterLayer):
    """Trainable biases, one per adapter, added on top of a frozen base layer.

    Like :class:`~peftcore_singa.lora.LoraLinear`, the wrapper of a ``Linear``/``Gemm``
    flattens N-D input ``(..., in)`` to 2-D for the base layer and reshapes back.
    """

    adapter_tensor_names = ("bitfit_bias",)
    canonical_names = {"bitfit_bias": "bias"}
    merge_role = "bias"

    def __init__(self, base_layer: Any, path: str) -> None:
        super().__init__(base_layer, path)
        self._had_bias = base_bias(base_layer) is not None
        self.channel_axis = 1 if isinstance(base_layer, _CHANNEL_FIRST) else -1

    def base_tensor(self, role: str) -> Any:
        return base_bias(self.base_layer) if role == "bias" else super().base_tensor(role)

    def base_weight(self) -> Any:
        """The tensor whose device and dtype new adapter tensors follow."""
        bias = base_bias(self.base_layer)
        if bias is not None:
            return bias
        weight = self.base_layer.__dict__.get("W")
        if not isinstance(weight, tensor.Tensor):
            raise AdapterError(f"{type(self.base_layer).__name__} at {self.path!r} has neither a bias nor a weight W")
        return weight

    def new_adapter(self, adapter_name: str, op: TrainBias) -> dict[str, Any]:
        bias = base_bias(self.base_layer) if self._had_bias else None
        op.check_bias(tuple(bias.shape) if bias is not None else None)
        if op.added and not isinstance(self.base_layer, _LINEAR):
            raise PlanError(f"singa backend can give a new bias only to Linear and Gemm layers, not {op.path!r}")
        value = self.new_tensor((op.size,), f"bitfit_bias.{adapter_name}")
        if bias is not None:
            value.copy_data(bias)
        else:
            value.set_value(0.0)
        return {"bitfit_bias": value}

    # -- forward --------------------------------------------------------------------------
    def _original_bias(self) -> Optional[Any]:
        if self.merged_adapters:
            return self.merge_original()
        return base_bias(self.base_layer) if self._had_bias else None

    def _change(self, running: Sequence[str]) -> Any:
        """Sum over ``running`` adapters of (adapter bias - original base bias), ``(size,)``."""
        original = self._original_bias()
        total = None
        for name in running:
            trained = self.bitfit_bias[name]
            if original is not None:  # a Gemm's (1, out) bias broadcasts against (out,)
                self.device_check(trained, original)
            change = autograd.sub(trained, original) if original is not None else trained
            total = change if total is None else autograd.add(total, change)
        beta = float(getattr(self.base_layer, "beta", 1.0)) if isinstance(self.base_layer, layer.Gemm) else 1.0
        if beta != 1.0:
            total = autograd.mul(total, constant(beta, total))
        return total

    def forward(self, x: Any) -> Any:
        base = self.base_layer
        shape = tuple(x.shape)
        flatten = isinstance(base, _LINEAR) and len(shape) != 2 and not getattr(base, "transA", 0)
        flat = autograd.reshape(x, [-1, shape[-1]]) if flatten else x
        result = base(flat)
        running = self.adapters_to_run()
        if running:
            change = self._change(running)
            self.device_check(result, change)
            if self.channel_axis == 1 and len(result.shape) > 2:
                change = autograd.reshape(change, [1, -1] + [1] * (len(result.shape) - 2))
            result = autograd.add(result, change)
        if flatten:
            result = autograd.reshape(result, list(shape[:-1]) + [int(result.shape[-1])])
        return result

    # -- merging: the core's, over these -------------------------------------------------
    def delta_weight(self, adapter_name: str) -> np.ndarray:
        """The adapter's bias minus the original one, ``(size,)``, on the host."""
        original = self._original_bias()
        change = to_numpy(self.bitfit_bias[adapter_name]).astype(np.float64)
        return change - to_numpy(original).reshape(-1).astype(np.float64) if original is not None else change

    def create_base_tensor(self, role: str) -> Any:
        """Give the ``Linear``/``Gemm`` base layer a zero, frozen bias, as ``bias=True`` would."""
        base = self.base_layer
        weight = base.W
        size = int(self.bitfit_bias[self.adapter_names()[0]].size())
        shape = (size,) if isinstance(base, layer.Linear) else (1, size)
        prefix = weight.name[: -len(".W")] if weight.name.endswith(".W") else self.path
        bias = tensor.Tensor(
            shape, weight.device, weight.dtype, requires_grad=False, stores_grad=False, name=f"{prefix}.b"
        )
        bias.set_value(0.0)
        self.set_base_tensor(role, bias)
        return bias

    def set_base_tensor(self, role: str, value: Any) -> None:
        base = self.base_layer
        base.__dict__[bias_attribute(base)] = value
        if isinstance(base, _LINEAR):
            base.__dict__["bias"] = value is not None
