"""The (IA)^3 adapter layer for peftcore's torch backend (imported only when building).

:class:`IA3Linear` wraps ``nn.Linear`` or transformers' ``Conv1D`` and subclasses the
backend's :class:`~peftcore_torch.layers.AdapterLayer`, so adding, export, import,
delete, (un)freezing and unloading come from the core's adapter-layer lifecycle. Only merging differs: (IA)^3 is
multiplicative, so :meth:`IA3Linear.merge` multiplies the weight (and, for an output
scale, the bias) instead of adding a delta, and :meth:`IA3Linear.unmerge` restores the
saved originals, bit for bit, instead of dividing.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from peftcore_ia3.config import IA3Scale
from peftcore_torch.layers import AdapterLayer
from peftcore_torch.walk import is_conv1d


class IA3Linear(AdapterLayer):
    """(IA)^3 around ``nn.Linear`` or ``Conv1D``: ``y = l_out * base(l_in * x)``.

    Each adapter has one vector ``ia3_l[name]`` in canonical layout (``(out, 1)`` for
    an output scale, ``(1, in)`` for a feed-forward input scale). Several active
    adapters multiply together, as in HF PEFT.
    """

    adapter_tensor_names = ("ia3_l",)
    other_param_names = ("is_feedforward",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        self.fan_in_fan_out = is_conv1d(base_layer)
        #: the weight and bias before the first merge, restored by unmerge
        self._originals: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    def features(self) -> tuple[int, int]:
        """``(in_features, out_features)`` of the wrapped layer."""
        weight = self.base_weight()
        if self.fan_in_fan_out:
            return int(weight.shape[0]), int(weight.shape[1])
        return int(weight.shape[1]), int(weight.shape[0])

    def new_adapter(self, adapter_name: str, op: IA3Scale) -> dict[str, Any]:
        """Adapter ``adapter_name``'s vector as ``op`` describes (the core checks and stores it)."""
        vector = self.new_tensor(*op.shape)
        with torch.no_grad():
            if op.init == "random":
                nn.init.normal_(vector, mean=1.0, std=0.1)
            else:
                nn.init.ones_(vector)
        return {"ia3_l": vector, "is_feedforward": op.is_feedforward}

    # -- forward ----------------------------------------------------------------------------
    def _scales(self, names: list[str]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The product of the input-scale vectors and of the output-scale vectors (flat)."""
        scale_in: Optional[torch.Tensor] = None
        scale_out: Optional[torch.Tensor] = None
        for name in names:
            vector = self.ia3_l[name].flatten()
            if self.is_feedforward[name]:
                scale_in = vector if scale_in is None else scale_in * vector
            else:
                scale_out = vector if scale_out is None else scale_out * vector
        return scale_in, scale_out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        scale_in, scale_out = self._scales(self.adapters_to_run())
        if scale_in is not None:
            x = (x.to(scale_in.dtype) * scale_in).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if scale_out is not None:
            result = (result.to(scale_out.dtype) * scale_out).to(result.dtype)
        return result

    # -- merging ----------------------------------------------------------------------------
    def _weight_factor(self, vector: torch.Tensor, feedforward: bool) -> torch.Tensor:
        """``vector`` shaped to broadcast over the stored weight (``(out, in)``, or
        ``(in, out)`` for ``Conv1D``): input scales act on the ``in`` axis."""
        flat = vector.flatten()
        on_rows = feedforward == self.fan_in_fan_out
        return flat.reshape(-1, 1) if on_rows else flat.reshape(1, -1)

    def merge(self, adapter_names: list[str]) -> None:
        """Multiply the named adapters' vectors into the weight (and bias, for output scales).

        The original weight and bias are kept until :meth:`unmerge`, which restores them
        exactly (dividing back would not be exact, and fails for zero entries).
        """
        todo = [a for a in adapter_names if self.has_adapter(a) and a not in self.merged_adapters]
        if not todo:
            return
        weight = self.base_weight()
        bias = getattr(self.base_layer, "bias", None)
        if self._originals is None:
            self._originals = (weight.detach().clone(), bias.detach().clone() if bias is not None else None)
        with torch.no_grad():
            new_weight = weight.detach().to(torch.float32)
            new_bias = bias.detach().to(torch.float32) if bias is not None else None
            for name in todo:
                vector = self.ia3_l[name].detach().to(torch.float32)
                feedforward = self.is_feedforward[name]
                new_weight = new_weight * self._weight_factor(vector, feedforward)
                if new_bias is not None and not feedforward:
                    new_bias = new_bias * vector.flatten()
            weight.copy_(new_weight.to(weight.dtype))
            if bias is not None and new_bias is not None:
                bias.copy_(new_bias.to(bias.dtype))
        self.merged_adapters.extend(todo)

    def unmerge(self) -> None:
        """Restore the weight and bias saved by the first :meth:`merge`, bit for bit."""
        if self.merged_adapters and self._originals is not None:
            weight, bias = self._originals
            current_bias = getattr(self.base_layer, "bias", None)
            with torch.no_grad():
                self.base_weight().copy_(weight)
                if current_bias is not None and bias is not None:
                    current_bias.copy_(bias)
        self._originals = None
        self.merged_adapters = []
