"""BitFit for torch: a per-adapter trainable bias around any layer with a feature axis.

The adapter keeps the layer's full trained bias (``bitfit_bias[adapter]``, canonical name
``bias``). Forward adds ``adapter bias - base bias`` to the base output, which is exactly
zero at initialisation, so the model's output is unchanged bit for bit until training
moves it; several active adapters add their changes. Merging writes the bias into the
base layer (creating one for a layer that had none) and unmerging restores the original
exactly.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from peftcore.errors import AdapterError
from peftcore.methods.bitfit import TrainBias
from peftcore_torch.layers import AdapterLayer, _same_tensor_state, _weight_stamp, warn_changed_while_merged

#: Layers whose bias runs along dimension 1 (channels), not the last dimension.
_CHANNEL_FIRST = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
)


class BiasAdapter(AdapterLayer):
    """Trainable biases, one per adapter, added on top of a frozen base layer."""

    adapter_tensor_names = ("bitfit_bias",)
    canonical_names = {"bitfit_bias": "bias"}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        self.channel_axis = 1 if isinstance(base_layer, _CHANNEL_FIRST) else -1
        self._bias_before_merge: Optional[torch.Tensor] = None
        self._had_bias = self.base_bias() is not None

    def base_bias(self) -> Optional[torch.Tensor]:
        bias = getattr(self.base_layer, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def base_weight(self) -> torch.Tensor:
        bias = self.base_bias()
        if bias is not None:
            return bias
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise AdapterError(f"{type(self.base_layer).__name__} has neither a bias nor a weight to follow")
        return weight

    def add(self, adapter_name: str, op: TrainBias) -> None:
        if self.has_adapter(adapter_name):
            raise AdapterError(f"layer {op.path!r} already has an adapter named {adapter_name!r}")
        bias = self.base_bias() if self._had_bias else None
        if op.added != (bias is None):
            state = "has no bias" if bias is None else "already has a bias"
            raise AdapterError(f"layer {op.path!r} {state}, which the plan's bitfit_bias op did not expect")
        if bias is not None and tuple(bias.shape) != (op.size,):
            raise AdapterError(f"layer {op.path!r} has a bias of shape {tuple(bias.shape)}, the plan expects ({op.size},)")
        value = self.new_tensor(op.size)
        with torch.no_grad():
            value.copy_(bias.detach() if bias is not None else torch.zeros_like(value))
        self.bitfit_bias[adapter_name] = value

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
            return self._bias_before_merge
        return self.base_bias() if self._had_bias else None

    # -- merging ------------------------------------------------------------------------
    def merge(self, adapter_names: list[str]) -> None:
        todo = [a for a in adapter_names if self.has_adapter(a) and a not in self.merged_adapters]
        if not todo:
            return
        if not self.merged_adapters:
            bias = self.base_bias() if self._had_bias else None
            self._bias_before_merge = bias.detach().clone() if bias is not None else None
        original = self._bias_before_merge
        with torch.no_grad():
            current = self.base_bias() if self.merged_adapters or self._had_bias else None
            total = current.detach().to(torch.float32) if current is not None else None
            for name in todo:
                change = self._change(name, original).detach().to(torch.float32)
                total = change if total is None else total + change
            assert total is not None
            if current is None:
                dtype = self.bitfit_bias[todo[0]].dtype
                self.base_layer.bias = nn.Parameter(total.to(dtype), requires_grad=False)
            else:
                current.copy_(total.to(current.dtype))
        self.merged_adapters.extend(todo)
        merged_bias = self.base_bias()
        self._bias_stamp = _weight_stamp(merged_bias) if merged_bias is not None else None

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        with torch.no_grad():
            if self._had_bias:
                bias = self.base_bias()
                assert bias is not None and self._bias_before_merge is not None
                stamp = getattr(self, "_bias_stamp", None)
                if stamp is not None and _same_tensor_state(bias, stamp):
                    bias.copy_(self._bias_before_merge)
                else:  # changed while merged: keep the change, take the adapters' out
                    warn_changed_while_merged(self, "bias")
                    total = bias.detach().to(torch.float32)
                    for name in self.merged_adapters:
                        total = total - self._change(name, self._bias_before_merge).detach().to(torch.float32)
                    bias.copy_(total.to(bias.dtype))
            else:
                self.base_layer.register_parameter("bias", None)
        self._bias_before_merge = None
        self._bias_stamp = None
        self.merged_adapters = []

    def unwrap(self, merge: bool) -> nn.Module:
        self.unmerge()
        if merge:
            self.merge([a for a in self.active_adapters if self.has_adapter(a)])
            self._bias_before_merge = None
        return self.base_layer
