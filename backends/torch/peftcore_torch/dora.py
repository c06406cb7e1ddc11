"""DoRA's arithmetic for the torch LoRA layers (``LoraConfig(use_dora=True)``).

DoRA (Liu et al., 2024) computes with ``W' = m / ||W + s B A|| * (W + s B A)``, the norm
taken per output over every other axis of the canonical weight (output axis first), the
same definition as :func:`peftcore.methods.lora.dora_merged`. Training treats the norm
as a constant (the paper's section 4.3, as Hugging Face PEFT does), so only ``m``, A and
B receive gradients.

What makes it cheap here:

* the norm is never formed from a ``(out, in)`` temporary: ``||W + s B A||^2`` per
  output is ``||W||^2 + 2 s rowsum(B * (W A^T)) + s^2 rowsum((B (A A^T)) * B)``; the
  first term is cached while the base weight is unchanged, so a step costs one thin
  product ``W A^T`` (what ``B @ A`` alone would cost) and nothing of size ``out x in``;
* the base product is not run twice: a frozen plain linear layer computes
  ``y = bias + scale * (x W^T + s (x A^T) B^T)`` as one autograd node whose backward
  folds the scale into W and B (:mod:`peftcore_torch.dora_kernels`); the magnitude's
  gradient is the only extra pass over the output;
* without autograd, with enough tokens, the scaled weight is folded into a temporary
  copy and applied in one product.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator, MutableMapping, Optional, cast

import torch
from torch import nn


class DoraMagnitude(nn.Module):
    """One adapter's magnitude vector, held as HF PEFT holds it: a module whose
    ``weight`` is the vector, so the state-dict key is ``lora_magnitude_vector.<adapter>.weight``."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def _get_name(self) -> str:
        return "lora.dora.DoraMagnitude"


class MagnitudeDict(nn.ModuleDict):
    """Adapter name to :class:`DoraMagnitude` (HF PEFT's ``lora_magnitude_vector``);
    :attr:`weights` is the name -> vector view the adapter code reads and writes."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, DoraMagnitude(value) if isinstance(value, nn.Parameter) else value)

    @property
    def weights(self) -> MagnitudeWeights:
        return MagnitudeWeights(self)


class MagnitudeWeights(MutableMapping):
    """The dict-like adapter name -> magnitude vector view of a :class:`MagnitudeDict`."""

    def __init__(self, modules: MagnitudeDict) -> None:
        self.modules = modules

    def __getitem__(self, key: str) -> torch.Tensor:
        return cast(DoraMagnitude, self.modules[key]).weight

    def __setitem__(self, key: str, value: nn.Parameter) -> None:
        if key in self.modules:
            cast(DoraMagnitude, self.modules[key]).weight = value
        else:
            self.modules[key] = value

    def __delitem__(self, key: str) -> None:
        del self.modules[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules.keys())

    def __len__(self) -> int:
        return len(self.modules)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.dtype


class BaseNorms:
    """``||W||^2`` per output of a base weight, cached while the weight is the same
    tensor at the same version (torch bumps the version on every in-place write)."""

    def __init__(self) -> None:
        self._tensor: Optional[weakref.ref] = None
        self._key: Optional[tuple] = None
        self._value: Optional[torch.Tensor] = None

    def squared(self, canonical_weight: torch.Tensor) -> torch.Tensor:
        w = canonical_weight
        holder = w._base if w._base is not None else w  # a transposed view's own tensor
        key = (w.data_ptr(), w._version, w.shape, w.stride(), w.dtype, w.device)
        cached = self._tensor() if self._tensor is not None else None
        if cached is not holder or self._key != key or self._value is None:
            with torch.no_grad():
                flat = w.reshape(w.shape[0], -1).to(_compute_dtype(w))
                value = (flat * flat).sum(1)
            self._tensor, self._key, self._value = weakref.ref(holder), key, value
            return value
        return self._value


@torch.no_grad()
def weight_norm(
    canonical_weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, base_norms: BaseNorms
) -> torch.Tensor:
    """``||W + s B A||`` per output (no gradient), W canonical with the output axis first
    (``(out, in)``; a convolution's ``(out, in, *kernel)``, with A ``(r, in * prod(kernel))``)."""
    compute = _compute_dtype(canonical_weight)
    w = canonical_weight.reshape(canonical_weight.shape[0], -1).to(compute)
    a, b = lora_a.detach().reshape(lora_a.shape[0], -1).to(compute), lora_b.detach().reshape(lora_b.shape[0], -1).to(compute)
    squared = base_norms.squared(canonical_weight).clone()
    squared.add_((b * (w @ a.t())).sum(1), alpha=2.0 * scaling)
    squared.add_((b @ (a @ a.t()) * b).sum(1), alpha=scaling * scaling)
    return squared.clamp_min_(0.0).sqrt_()


def output_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``m / norm`` per output, differentiable in ``m``; an output whose norm is zero
    gets scale zero (as :func:`peftcore.methods.lora.dora_merged`)."""
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    scale = magnitude.to(norm.dtype) / safe
    return torch.where(norm > 0, scale, torch.zeros_like(scale))


def merged_canonical(
    canonical_weight: torch.Tensor, lora_delta: torch.Tensor, magnitude: torch.Tensor, base_norms: BaseNorms,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """DoRA's weight in canonical layout (``lora_delta`` is ``s B A`` reshaped like it),
    in the compute dtype, without gradient."""
    with torch.no_grad():
        norm = weight_norm(canonical_weight, lora_a, lora_b, scaling, base_norms)
        scale = output_scale(magnitude.detach(), norm)
        combined = canonical_weight.to(norm.dtype) + lora_delta.to(norm.dtype).reshape(canonical_weight.shape)
        return combined * scale.view((-1,) + (1,) * (combined.dim() - 1))


def magnitude_init(
    canonical_weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, base_norms: BaseNorms
) -> torch.Tensor:
    """The initial magnitude: ``||W + s B A||`` per output, computed by the same
    function as the forward's norm, so the scale starts at exactly one."""
    return weight_norm(canonical_weight, lora_a, lora_b, scaling, base_norms)


class DoraParts:
    """Mixed into the torch LoRA layers: each adapter with ``use_dora`` keeps a magnitude
    vector in ``lora_magnitude_vector`` (HF PEFT's attribute and state-dict keys), and
    these methods give its scale, its merged change and its initial value. The layer
    supplies ``canonical_weight_of(weight)`` (its base weight viewed output axis first)."""

    lora_magnitude_vector: MagnitudeDict
    use_dora: dict[str, bool]
    scaling: dict[str, float]
    merged_adapters: list[str]

    def init_dora_stores(self) -> None:
        self.lora_magnitude_vector = MagnitudeDict()
        self.use_dora = {}
        self._base_norms = BaseNorms()

    def canonical_weight_of(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dora_base_weight(self) -> torch.Tensor:
        """The canonical base weight DoRA's norm is taken of: the weight before any merge
        (a merged adapter's change is not part of another adapter's base)."""
        layer: Any = self
        original = layer.merge_original() if self.merged_adapters else None
        return self.canonical_weight_of(original if original is not None else layer.base_weight())

    def dora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A ``(r, in)``, B ``(out, r)`` (a convolution's as its layer holds them) and the
        magnitude of ``adapter_name`` as a vector."""
        layer: Any = self
        a_name, b_name = layer.adapter_tensor_names[:2]
        a, b = layer.adapter_store(a_name)[adapter_name], layer.adapter_store(b_name)[adapter_name]
        magnitude = self.lora_magnitude_vector.weights[adapter_name]
        # a convolution's is (1, out, 1, ...), HF PEFT's shape; its view keeps the gradient
        return a, b, magnitude.view(-1) if magnitude.dim() > 1 else magnitude

    def dora_scale(self, adapter_name: str) -> torch.Tensor:
        """``m / ||W + s B A||`` per output: a gradient reaches ``m`` only."""
        a, b, magnitude = self.dora_factors(adapter_name)
        norm = weight_norm(self.dora_base_weight(), a, b, self.scaling[adapter_name], self._base_norms)
        return output_scale(magnitude, norm)

    def dora_inv_norm(self, adapter_name: str) -> torch.Tensor:
        """``1 / ||W + s B A||`` per output (zero where the norm is), without gradient."""
        a, b, _ = self.dora_factors(adapter_name)
        norm = weight_norm(self.dora_base_weight(), a, b, self.scaling[adapter_name], self._base_norms)
        return torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))

    def dora_canonical_delta(self, adapter_name: str) -> torch.Tensor:
        """The adapter's change to the base weight, canonical layout: DoRA's weight minus W."""
        a, b, magnitude = self.dora_factors(adapter_name)
        weight, scaling = self.dora_base_weight(), self.scaling[adapter_name]
        with torch.no_grad():
            compute = _compute_dtype(a)
            rank = a.shape[0]  # a convolution's A and B flattened to (r, in * kernel) and (out, r)
            lora_delta = (b.to(compute).reshape(-1, rank) @ a.to(compute).reshape(rank, -1)) * scaling
            merged = merged_canonical(weight, lora_delta, magnitude, self._base_norms, a, b, scaling)
            return merged - weight.to(merged.dtype)

    def init_magnitude(self, adapter_name: str) -> None:
        """Set the magnitude to ``||W + s B A||``, so the adapter starts as plain LoRA's
        output (the base output, with B zero)."""
        a, b, magnitude = self.dora_factors(adapter_name)
        norm = magnitude_init(self.dora_base_weight(), a, b, self.scaling[adapter_name], self._base_norms)
        with torch.no_grad():
            magnitude.copy_(norm.to(magnitude.dtype))
