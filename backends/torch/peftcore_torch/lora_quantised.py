"""LoRA around bitsandbytes' quantised linear layers (QLoRA): ``Linear4bit`` (nf4, fp4,
double-quantised or not) and ``Linear8bitLt``.

The base layer runs its own quantised kernel; each adapter's update is computed in the
adapters' dtype (float32, as HF PEFT keeps adapters over a quantised base) and added in
the output's dtype. The fused dense kernel of :mod:`peftcore_torch.lora_kernels` is never
used: it reads ``weight`` as a dense matrix, which a quantised weight is not (the base
layer's type is not exactly ``nn.Linear``, so :class:`LoraLinear` never picks it).

Merging is the core's (:mod:`peftcore.adapter_layer`) over the torch primitives, which
dequantise the weight, add the adapters' change in float32 and quantise the sum again
with the weight's own settings, in place; the first merge keeps a copy of the quantised
weight (codes and quant state), and unmerge puts that copy back, bit-exact.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from peftcore.errors import PlanError
from peftcore_torch import quantised
from peftcore_torch.lora import LoraLinear


class LoraQuantisedLinear(LoraLinear):
    """LoRA around a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (HF PEFT's
    ``lora.Linear4bit``/``lora.Linear8bitLt``)."""

    def _get_name(self) -> str:
        return f"lora.{type(self.base_layer).__name__}"

    def features(self) -> tuple[int, int]:
        base: Any = self.base_layer
        return int(base.in_features), int(base.out_features)

    def base_tensor(self, role: str) -> Optional[torch.Tensor]:
        if role == "weight":
            quantised.attach_row_scales(self.base_layer)
        return super().base_tensor(role)

    def new_adapter(self, adapter_name: str, op: Any) -> dict[str, Any]:
        if getattr(op, "use_dora", False):
            raise PlanError(
                f"layer {op.path!r} is a bitsandbytes {type(self.base_layer).__name__}: DoRA on a quantised base "
                "(QDoRA) is not built; use plain LoRA there"
            )
        return super().new_adapter(adapter_name, op)

    def new_tensor(self, *shape: int) -> nn.Parameter:
        """A float32 parameter on the base weight's device (the weight itself holds codes)."""
        weight = self.base_weight()
        return nn.Parameter(torch.empty(shape, device=weight.device, dtype=torch.float32))

    def weight_dtype(self) -> str:
        """The dtype of the dense weight the quantised one stands for (what a merged
        weight must fit before it is quantised again)."""
        weight = self.base_weight()
        if quantised.quantised_kind(weight):
            return str(quantised.dense_dtype(weight)).replace("torch.", "")
        return super().weight_dtype()
