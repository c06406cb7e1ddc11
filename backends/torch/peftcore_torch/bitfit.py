"""BitFit for torch: a per-adapter trainable bias around any layer with a feature axis.

The adapter keeps the layer's full trained bias (``bitfit_bias[adapter]``, canonical name
``bias``). Forward adds ``adapter bias - base bias`` to the base output, which is exactly
zero at initialisation, so the model's output is unchanged bit for bit until training
moves it; several active adapters add their changes. Merging (the core's, with
``merge_role = "bias"``) writes the bias into the base layer, giving one to a layer that
had none, and unmerging restores the original exactly.
"""

from __future__ import annotations

from typing import Any, Optional, cast

import torch
from torch import nn

from peftcore.errors import AdapterError
from peftcore.methods.bitfit import TrainBias
from peftcore_torch.layers import AdapterLayer

#: Layers whose bias runs along dimension 1 (channels), not the last dimension.
_CHANNEL_FIRST = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
)


class BiasAdapter(AdapterLayer):
    """Trainable biases, one per adapter, added on top of a frozen base layer."""

    adapter_tensor_names = ("bitfit_bias",)
    canonical_names = {"bitfit_bias": "bias"}
    merge_role = "bias"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        self.channel_axis = 1 if isinstance(base_layer, _CHANNEL_FIRST) else -1
        self._had_bias = self.base_bias() is not None

    def base_bias(self) -> Optional[torch.Tensor]:
        return self.base_tensor("bias")

    def base_weight(self) -> torch.Tensor:
        bias = self.base_bias()
        if bias is not None:
            return bias
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise AdapterError(f"{type(self.base_layer).__name__} has neither a bias nor a weight to follow")
        return weight

    def new_adapter(self, adapter_name: str, op: TrainBias) -> dict[str, Any]:
        bias = self.base_bias() if self._had_bias else None
        op.check_bias(tuple(bias.shape) if bias is not None else None)
        value = self.new_tensor(op.size)
        with torch.no_grad():
            value.copy_(bias.detach() if bias is not None else torch.zeros_like(value))
        return {"bitfit_bias": value}

    def _change(self, adapter_name: str, original: Optional[torch.Tensor]) -> torch.Tensor:
        """The adapter's bias minus the base layer's original one."""
        trained = self.bitfit_bias[adapter_name]
        return trained - original if original is not None else trained

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        result = self.base_layer(x, *args, **kwargs)
        running = self.adapters_to_run()
        if not running:
            return result
        original = self._original_bias()
        change = self._change(running[0], original)
        for name in running[1:]:
            change = change + self._change(name, original)
        if self.channel_axis == 1 and result.dim() > 2:
            change = change.view(1, -1, *([1] * (result.dim() - 2)))
        return result + change.to(result.dtype)

    def _original_bias(self) -> Optional[torch.Tensor]:
        if self.merged_adapters:
            return cast(Optional[torch.Tensor], self.merge_original())
        return self.base_bias() if self._had_bias else None

    # -- merging: the core's, over these ---------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self._change(adapter_name, self._original_bias()).detach()

    def create_base_tensor(self, role: str) -> torch.Tensor:
        like = self.bitfit_bias[self.adapter_names()[0]]
        bias = nn.Parameter(torch.zeros_like(like.detach()), requires_grad=False)
        self.base_layer.bias = bias
        return bias
