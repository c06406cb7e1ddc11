"""LoRA around torch's ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``, laid out as Hugging
Face PEFT lays it out (:mod:`peftcore.methods.lora_conv`).

Each adapter's factors are convolution modules of the base layer's own class, so the
state-dict keys are HF's (``lora_A.<adapter>.weight``) and ``layer.lora_A["default"](x)``
runs A as in HF: A has the base layer's kernel size, stride, padding, dilation and
padding mode; B is ``1x1`` and grouped as the base layer. The forward is the base
output plus ``B(A(dropout(x)))`` scaled (the scaling is applied to A's ``r`` channels,
the narrowest point). A mixed-adapter batch runs each adapter on its own rows.

Merging adds ``scaling * B @ A`` (contracted over the rank) to the base weight; the core
keeps the original weight and restores it exactly on unmerge. A grouped base layer
cannot be merged (see :mod:`peftcore.methods.lora_conv`): the merge is refused.

DoRA (``use_dora``; the norm and magnitude of :mod:`peftcore_torch.dora`) scales each
output channel: the change to the output is ``(scale - 1) conv(x', W) + scale * B(A(x'))``
scaled, ``x'`` the input after dropout, where ``conv(x, W)`` is the base output less its
bias when nothing is merged and no dropout runs (the base convolution is not run twice).
The magnitude is held as HF PEFT holds it, ``(1, out, 1, ...)``.
"""

from __future__ import annotations

from typing import Any, Callable, cast

import torch
from torch import nn

from peftcore.errors import AdapterError, PlanError
from peftcore.methods.lora import MAGNITUDE
from peftcore.methods.lora_conv import AddLoraConv, grouped_dora_refusal, grouped_merge_refusal
from peftcore_torch.layers import AdapterLayer
from peftcore_torch.lora import FactorDict, LoraLayer, _initialise, _runs_as_identity
from peftcore_torch.row_routing import add_row_updates
from peftcore_torch.walk import wrap_layer

#: The torch convolution classes LoRA wraps.
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ConvFactorDict(FactorDict):
    """Adapter name to a factor convolution module (``lora_A`` or ``lora_B``); a parameter
    assigned to it becomes the weight of a convolution ``make(weight)`` builds."""

    def __init__(self, make: Callable[[nn.Parameter], nn.Module]) -> None:
        super().__init__()
        self._make = make

    def __setitem__(self, key: str, value: Any) -> None:
        nn.ModuleDict.__setitem__(self, key, self._make(value) if isinstance(value, nn.Parameter) else value)

    def weight(self, key: str) -> torch.Tensor:
        module = self._modules[key]
        assert module is not None
        return cast(torch.Tensor, module.weight)


class LoraConv(LoraLayer):
    """LoRA around a torch convolution (``Conv1d``/``Conv2d``/``Conv3d``)."""

    base_layer: nn.modules.conv._ConvNd

    def _get_name(self) -> str:
        return f"lora.{type(self.base_layer).__name__}"  # how HF PEFT prints it

    def init_factor_stores(self) -> None:
        self.lora_A = ConvFactorDict(self._factor_a)
        self.lora_B = ConvFactorDict(self._factor_b)

    def _factor_a(self, weight: nn.Parameter) -> nn.Module:
        base = self.base_layer
        return _conv_around(
            weight, type(base), stride=base.stride, padding=base.padding, dilation=base.dilation, groups=1,
            padding_mode=base.padding_mode,
        )

    def _factor_b(self, weight: nn.Parameter) -> nn.Module:
        return _conv_around(weight, type(self.base_layer), groups=self.base_layer.groups)

    def features(self) -> tuple[int, int]:
        return int(self.base_layer.in_channels), int(self.base_layer.out_channels)

    @property
    def in_features(self) -> int:
        """The base layer's input channels (HF PEFT's layer attribute)."""
        return int(self.base_layer.in_channels)

    @property
    def out_features(self) -> int:
        """The base layer's output channels."""
        return int(self.base_layer.out_channels)

    def new_adapter(self, adapter_name: str, op: AddLoraConv) -> dict[str, Any]:  # type: ignore[override]
        base = self.base_layer
        if tuple(base.kernel_size) != tuple(op.kernel_size) or int(base.groups) != op.groups:
            raise AdapterError(
                f"LoRA op for {op.path!r} was planned for kernel {op.kernel_size} and groups={op.groups}; the layer "
                f"has kernel {tuple(base.kernel_size)} and groups={base.groups}"
            )
        spatial = tuple(int(k) for k in base.kernel_size)
        a = self.new_tensor(op.r, op.in_features, *spatial)
        b = self.new_tensor(op.out_features, op.r // op.groups, *(1,) * len(spatial))
        _initialise(a, b, op)
        values: dict[str, Any] = {
            "lora_A": a,
            "lora_B": b,
            "lora_dropout": nn.Dropout(op.dropout) if op.dropout > 0 else nn.Identity(),
            "scaling": op.scaling,
            "r": op.r,
            "use_dora": False,  # switched on by add() once the magnitude has its value
        }
        if op.use_dora:
            if op.groups > 1:
                raise AdapterError(grouped_dora_refusal(op.path, op.groups))
            magnitude = self.new_tensor(1, op.out_features, *(1,) * len(spatial))
            nn.init.zeros_(magnitude)
            values[MAGNITUDE] = magnitude
        return values

    def canonical_weight_of(self, weight: torch.Tensor) -> torch.Tensor:
        return weight  # torch's conv weight is already (out, in / groups, *kernel)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B @ A`` over the rank, shaped as the base weight (computed in
        float32 for half-precision factors), a DoRA adapter's whole change to the weight;
        refused for a grouped base layer."""
        groups = int(self.base_layer.groups)
        if groups > 1:
            raise AdapterError(grouped_merge_refusal(getattr(self, "path", "") or type(self.base_layer).__name__, groups))
        if self.use_dora.get(adapter_name, False):
            return self.dora_canonical_delta(adapter_name)
        a, b = self.lora_A.weight(adapter_name), self.lora_B.weight(adapter_name)
        compute = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        rank = a.shape[0]
        change = b.to(compute).reshape(b.shape[0], rank) @ a.to(compute).reshape(rank, -1)
        return change.reshape(b.shape[0], *a.shape[1:]) * self.scaling[adapter_name]

    def routes_rows(self) -> bool:
        return type(self).forward is LoraConv.forward

    def update(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's change to the output for input ``x``: ``s * B(A(dropout(x)))``."""
        factor_a = cast(nn.Module, self.lora_A[adapter_name])
        dropout = self.lora_dropout[adapter_name]
        x = x.to(self.lora_A.weight(adapter_name).dtype)
        hidden = factor_a(x if _runs_as_identity(dropout) else dropout(x))
        return cast(nn.Module, self.lora_B[adapter_name])(self._scaled(hidden, adapter_name))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        groups = self._row_groups(x)
        running = self.adapters_to_run() if groups is None else self._uniform(groups, x)
        if running is None:  # rows use different adapters
            return add_row_updates(result, x, self.batch_routing, groups, self.update, False)  # type: ignore[arg-type]
        base_out = result
        for name in running:
            if self.use_dora.get(name, False):
                result = result + self._dora_change(name, x, base_out)
            else:
                result = result + self.update(name, x).to(result.dtype)
        return result

    def _dora_change(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """A DoRA adapter's change to the output (see the module docstring)."""
        dropout = self.lora_dropout[name]
        identity = _runs_as_identity(dropout)
        dropped = x if identity else dropout(x)
        hidden = cast(nn.Module, self.lora_A[name])(dropped.to(self.lora_A.weight(name).dtype))
        lora = cast(nn.Module, self.lora_B[name])(self._scaled(hidden, name))
        channels = (1, -1) + (1,) * (lora.dim() - 2)
        scale = self.dora_scale(name).to(lora.dtype).view(channels)
        base = self.base_layer
        if identity and not self.merged_adapters:
            weighted = base_out if base.bias is None else base_out - base.bias.view(channels)
        else:  # the base convolution of the dropped input, by the weight before any merge
            weighted = base._conv_forward(dropped.to(lora.dtype), self.dora_base_weight().to(lora.dtype), None)
        return ((scale - 1) * weighted.to(lora.dtype) + scale * lora).to(base_out.dtype)


def _conv_around(weight: nn.Parameter, conv_type: type, **settings: Any) -> nn.Module:
    """A bias-free ``conv_type`` whose weight is ``weight`` (channels and kernel read
    from its shape), made on the meta device so no weight is allocated only to be dropped."""
    out_channels, in_per_group = int(weight.shape[0]), int(weight.shape[1])
    groups = int(settings.get("groups", 1))
    conv = conv_type(
        in_per_group * groups, out_channels, tuple(int(k) for k in weight.shape[2:]), bias=False, device="meta", **settings
    )
    conv.weight = weight
    return cast(nn.Module, conv)


def build_lora_conv(model: nn.Module, layers: dict, op: AddLoraConv, adapter_name: str) -> None:
    """The builder of :class:`~peftcore.methods.lora_conv.AddLoraConv`."""
    target = layers.get(op.path)
    base = target.base_layer if isinstance(target, AdapterLayer) else target
    if not isinstance(base, CONV_TYPES):
        kind = type(base).__name__ if base is not None else "missing"
        raise PlanError(f"torch backend puts convolution LoRA on Conv1d, Conv2d and Conv3d; {op.path!r} is {kind}")
    wrap_layer(model, layers, op.path, LoraConv).add(adapter_name, op)
