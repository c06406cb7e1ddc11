"""DoRA (``LoraConfig(use_dora=True)``) for the SINGA LoRA layers on ``layer.Linear``,
``layer.Embedding`` and ``layer.Conv2d``.

The maths is the core's (:func:`peftcore.methods.lora.dora_merged`): the layer computes
with ``m / ||W + s B A|| * (W + s B A)`` per output. The norm is a constant of the step
(no gradient, as the paper's section 4.3 and HF PEFT treat it), computed on the host
from the canonical weights; the forward adds ``(scale - 1) * W x + scale * s x A B`` to
the base output with ``singa.autograd`` operators, ``scale = m / norm`` keeping its
gradient to ``m`` (``autograd.mul`` broadcasts the ``(out,)`` vector over the rows and
reduces its gradient). ``W x`` is the base output less its bias when no dropout runs and
nothing is merged, so the base product is not repeated.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import autograd, tensor  # noqa: E402

from peftcore.errors import BackendError  # noqa: E402
from peftcore.methods.lora import MAGNITUDE, dora_merged, dora_weight_norm  # noqa: E402
from peftcore_singa.tensors import copy_into, to_numpy  # noqa: E402


class DoraParts:
    """Mixed into the SINGA LoRA layers: a DoRA adapter's magnitude lives in the
    ``lora_magnitude_vector`` dict (tensor ``<path>.lora_magnitude_vector.<adapter>``).
    The layer supplies ``canonical_of(weight)`` (a numpy ``(out, in)`` copy of a base
    weight tensor) and ``native_lora_delta(name)`` (``s A B`` as ``(in, out)``)."""

    use_dora: dict[str, bool]
    scaling: dict[str, float]
    merged_adapters: list[str]

    def canonical_of(self, weight: Any) -> np.ndarray:
        raise NotImplementedError

    def native_lora_delta(self, adapter_name: str) -> np.ndarray:
        raise NotImplementedError

    def dora_weight_tensor(self) -> Any:
        """The base weight DoRA's norm is of: the one before any merge."""
        layer: Any = self
        original = layer.merge_original() if self.merged_adapters else None
        return original if original is not None else layer.base_weight()

    def dora_norm(self, adapter_name: str) -> np.ndarray:
        """``||W + s B A||`` per output, float64, on the host."""
        weight = self.canonical_of(self.dora_weight_tensor())
        return dora_weight_norm(weight + self.canonical_lora_delta(adapter_name))

    def dora_canonical_delta(self, adapter_name: str) -> np.ndarray:
        """DoRA's weight minus W, canonical ``(out, in)``, float64."""
        layer: Any = self
        weight = self.canonical_of(self.dora_weight_tensor())
        magnitude = to_numpy(layer.lora_magnitude_vector[adapter_name]).astype(np.float64).reshape(-1)
        return dora_merged(weight, self.canonical_lora_delta(adapter_name), magnitude) - weight

    def canonical_lora_delta(self, adapter_name: str) -> np.ndarray:
        """``s B A`` in the canonical layout (a linear layer stores ``(in, out)``)."""
        return self.native_lora_delta(adapter_name).T

    def init_magnitude(self, adapter_name: str) -> None:
        layer: Any = self
        copy_into(layer.lora_magnitude_vector[adapter_name], self.dora_norm(adapter_name))

    def dora_scales(self, adapter_name: str, like: Any) -> tuple[Any, Any]:
        """``(scale - 1, scale)`` shaped as the magnitude (``(out,)``; a convolution's
        ``(1, out, 1, 1)``), ``scale = m / norm`` differentiable in ``m`` (zero where the
        norm is zero)."""
        layer: Any = self
        if like.device.graph_enabled():  # reading the weights then would abort the process in SINGA's C++
            raise BackendError(
                f"layer {getattr(self, 'path', '')!r}: a DoRA adapter's norm is computed from the weights on the host "
                "each step, which cannot happen while SINGA records a graph (model.compile runs the forward so, and "
                "so does graph-mode training): compile the model before get_peft_model, and train with use_graph=False"
            )
        norm = self.dora_norm(adapter_name)
        inverse = np.where(norm > 0, 1.0 / np.where(norm > 0, norm, 1.0), 0.0)
        shape = tuple(int(d) for d in layer.lora_magnitude_vector[adapter_name].shape)
        constant = tensor.Tensor(shape, like.device, like.dtype, requires_grad=False, stores_grad=False)
        constant.copy_from_numpy(inverse.reshape(shape).astype(np.float32))
        scale = autograd.mul(layer.lora_magnitude_vector[adapter_name], constant)
        minus_one = tensor.Tensor((1,), like.device, like.dtype, requires_grad=False, stores_grad=False)
        minus_one.set_value(-1.0)
        return autograd.add(scale, minus_one), scale

    def dora_change(self, adapter_name: str, weighted: Any, update: Any) -> Any:
        """``(scale - 1) * W x + scale * update`` for 2-D ``W x`` and ``update`` (a
        convolution's ``(batch, out, h, w)``: the scale broadcasts over its channel axis)."""
        scale_minus_one, scale = self.dora_scales(adapter_name, update)
        return autograd.add(autograd.mul(weighted, scale_minus_one), autograd.mul(update, scale))


__all__ = ["MAGNITUDE", "DoraParts"]
