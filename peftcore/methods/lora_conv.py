"""LoRA on convolutions (``Conv1d``/``Conv2d``/``Conv3d``, SINGA's ``Conv2d``), with
Hugging Face PEFT's tensor layout.

The low-rank path is two convolutions: A is a convolution from the base layer's input
channels to ``r`` channels with the base layer's kernel size, stride, padding and
dilation, and B a ``1x1`` (``1``, ``1x1x1``) convolution from ``r`` to the output
channels, grouped as the base layer is. Canonically (torch's layout, the file's):

- ``lora_A``: ``(r, in_channels, *kernel_size)``;
- ``lora_B``: ``(out_channels, r // groups, 1, ...)``.

With ``groups == 1`` the path is one convolution by ``scaling * B @ A`` (contracted over
``r``), a change of the base weight's own shape ``(out, in, *kernel_size)``, so merging
is exact up to rounding. With ``groups > 1`` it is not: A mixes every input channel
while the base weight of a grouped convolution sees only its group's, so no change of
that weight equals the path, and merging is refused (HF PEFT refuses it too).

DoRA (``use_dora``) is as on a linear layer, the norm taken per output channel over
``(in, *kernel_size)``; the magnitude is stored as HF PEFT stores it, ``(1, out, 1, ...)``
(laid along the output's channel axis). It needs the change of the base weight, so it is
refused on a grouped convolution.

Where this differs from HF PEFT 0.21.2: HF builds A without the base layer's dilation
and padding mode, so a dilated base layer fails in HF's forward (the two outputs differ in
size), and a base layer with ``padding_mode="reflect"`` gives different merged and
unmerged outputs there. Here A takes both, so such a layer works and merges exactly; the
files are the same either way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional, Union

import numpy as np

from peftcore.errors import AdapterError, PlanError
from peftcore.graph import LayerNode, ModelGraph
from peftcore.methods.lora import MAGNITUDE, AddLora, dora_merged
from peftcore.plan import TensorSpec, register_op

#: Padding as a graph node and the op hold it: one size per spatial axis (or a start and an
#: end per axis, SINGA's uneven padding), or torch's ``"same"``/``"valid"``.
Padding = Union[tuple, str]


@register_op
@dataclasses.dataclass(frozen=True)
class AddLoraConv(AddLora):
    """LoRA on a convolution with ``len(kernel_size)`` spatial axes (see the module
    docstring). ``in_features``/``out_features`` are the input and output channels;
    ``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups`` and
    ``padding_mode`` are the base layer's. ``init`` is ``"kaiming"``, ``"gaussian"`` or
    ``"random"``, as for a linear layer (B zero unless random).
    """

    op: ClassVar[str] = "lora_conv"
    layer_kind: str = "conv"
    kernel_size: tuple = ()
    stride: tuple = ()
    padding: Any = ()
    dilation: tuple = ()
    groups: int = 1
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:
        # AddLora's checks, except its layer kinds and the inits that read a linear weight
        if self.layer_kind != "conv":
            raise PlanError(f"lora_conv op on {self.path!r}: layer_kind must be 'conv', got {self.layer_kind!r}")
        if self.init not in ("kaiming", "gaussian", "random"):
            raise PlanError(f"lora_conv op on {self.path!r}: init must be 'kaiming', 'gaussian' or 'random', got {self.init!r}")
        kernel = _sizes(self.path, "kernel_size", self.kernel_size)
        object.__setattr__(self, "kernel_size", kernel)
        for name in ("stride", "dilation"):
            object.__setattr__(self, name, _sizes(self.path, name, getattr(self, name), len(kernel)))
        object.__setattr__(self, "padding", _padding(self.path, self.padding, len(kernel)))
        super(AddLora, self).__post_init__()  # the field type checks of every op
        if min(self.r, self.in_features, self.out_features) <= 0 or not 0.0 <= self.dropout < 1.0:
            raise PlanError(f"lora_conv op on {self.path!r}: r, in_features and out_features must be positive, dropout in [0, 1)")
        if self.groups <= 0 or self.in_features % self.groups or self.out_features % self.groups:
            raise PlanError(
                f"lora_conv op on {self.path!r}: groups={self.groups} must divide the {self.in_features} input and "
                f"{self.out_features} output channels"
            )
        if self.r % self.groups:
            raise PlanError(  # HF PEFT's rule: B is grouped as the base layer, so each group gets r / groups ranks
                f"lora_conv op on {self.path!r}: the layer has groups={self.groups} and the rank is {self.r}; LoRA on a "
                "grouped convolution needs a rank divisible by groups (choose another r, or rank_pattern for this layer)"
            )
        if self.use_dora and self.groups > 1:
            raise PlanError(grouped_dora_refusal(self.path, self.groups))

    @classmethod
    def for_layer(cls, node: LayerNode, **fields: Any) -> AddLoraConv:
        """The op for the conv layer ``node`` of a graph, with the LoRA ``fields`` given."""
        missing = [name for name in ("kernel_size", "stride", "padding", "dilation", "groups") if getattr(node, name) is None]
        if missing or node.in_features is None or node.out_features is None:
            raise PlanError(
                f"conv layer {node.path!r} ({node.type_name}) was described without its "
                f"{', '.join(missing) or 'channels'}; the backend cannot put LoRA on it"
            )
        return cls(
            path=node.path,
            in_features=int(node.in_features),
            out_features=int(node.out_features),
            kernel_size=tuple(node.kernel_size or ()),
            stride=tuple(node.stride or ()),
            padding=node.padding,
            dilation=tuple(node.dilation or ()),
            groups=int(node.groups or 1),
            padding_mode=node.padding_mode or "zeros",
            **fields,
        )

    def geometry(self) -> dict[str, Any]:
        """The base layer's convolution settings the op was planned for."""
        return {
            "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
            "dilation": self.dilation, "groups": self.groups, "padding_mode": self.padding_mode,
        }

    def misfit(self, graph: ModelGraph) -> Optional[str]:
        node = graph.get(self.path)
        if node.kind != "conv":
            return f"layer {self.path!r} is a {node.kind}, the adapter expects a convolution"
        if (node.in_features, node.out_features) != (self.in_features, self.out_features):
            return (
                f"layer {self.path!r} maps {node.in_features} -> {node.out_features} channels, the adapter was "
                f"trained for {self.in_features} -> {self.out_features}"
            )
        layer_geometry = {
            "kernel_size": tuple(node.kernel_size or ()), "stride": tuple(node.stride or ()), "padding": node.padding,
            "dilation": tuple(node.dilation or ()), "groups": node.groups, "padding_mode": node.padding_mode or "zeros",
        }
        differing = [name for name, value in self.geometry().items() if layer_geometry[name] != value]
        if differing:
            shown = ", ".join(f"{name} {layer_geometry[name]!r} (adapter: {self.geometry()[name]!r})" for name in differing)
            return f"conv layer {self.path!r} has {shown}"
        return None

    def tensor_specs(self) -> dict[str, TensorSpec]:
        ones = (1,) * len(self.kernel_size)
        specs = {
            "lora_A": TensorSpec((self.r, self.in_features, *self.kernel_size), "lora_A.weight"),
            "lora_B": TensorSpec((self.out_features, self.r // self.groups, *ones), "lora_B.weight"),
        }
        if self.use_dora:  # HF PEFT's shape: the vector laid along the output-channel axis of the conv's output
            specs[MAGNITUDE] = TensorSpec((1, self.out_features, *ones), MAGNITUDE)
        return specs

    def delta(self, tensors: Mapping[str, Any], base: Any = None) -> Any:
        """``scaling * B @ A`` contracted over the rank: the change to the weight,
        ``(out, in, *kernel_size)``. An :class:`AdapterError` for a grouped convolution,
        whose LoRA path no change of the weight equals (see the module docstring). DoRA's
        change is the merged weight minus ``base`` (the base weight), so None without it."""
        if self.groups > 1:
            raise AdapterError(grouped_merge_refusal(self.path, self.groups))
        b = tensors["lora_B"]
        change = conv_delta(tensors["lora_A"], b, b.dtype.type(self.scaling))
        if self.use_dora:
            if base is None:
                return None
            change = dora_merged(base, change, tensors[MAGNITUDE].reshape(-1)) - base
        return change


def grouped_merge_refusal(path: str, groups: int) -> str:
    """Why LoRA on a grouped convolution cannot be merged (for every backend's message)."""
    return (
        f"cannot merge LoRA into conv layer {path!r} with groups={groups}: LoRA's A convolution reads every input "
        "channel, while each output of a grouped convolution's weight reads only its group's, so no change of "
        "that weight equals the adapter (HF PEFT refuses this merge too); run the adapter unmerged"
    )


def grouped_dora_refusal(path: str, groups: int) -> str:
    """Why DoRA is not put on a grouped convolution (for every backend's message)."""
    return (
        f"DoRA cannot be put on conv layer {path!r} with groups={groups}: DoRA's norm is of the base weight plus "
        "the adapter's change to it, and LoRA on a grouped convolution has no such change (its A convolution reads "
        "every input channel; see the merge refusal). HF PEFT 0.21.2 accepts it but takes the norm of B @ A "
        "reshaped to the weight's shape, which is not the adapter's change; target ungrouped convolutions only, "
        "or use_dora=False"
    )


def _sizes(path: str, name: str, value: Any, axes: Optional[int] = None) -> tuple:
    """``value`` as a tuple of positive ints (one per spatial axis when ``axes`` is given)."""
    sizes = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    ok = bool(sizes) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes)
    if not ok or (axes is not None and len(sizes) != axes) or len(sizes) > 3:
        raise PlanError(f"lora_conv op on {path!r}: {name} must be 1 to 3 positive sizes, one per spatial axis, got {value!r}")
    return sizes


def _padding(path: str, value: Any, axes: int) -> Padding:
    if value in ("same", "valid"):
        return str(value)
    sizes = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if len(sizes) not in (axes, 2 * axes) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes):
        raise PlanError(f"lora_conv op on {path!r}: padding must be {axes} sizes >= 0 (or {2 * axes}: each axis's start and end), 'same' or 'valid', got {value!r}")
    return sizes


def conv_delta(a: np.ndarray, b: np.ndarray, scaling: Any) -> np.ndarray:
    """``scaling * B @ A`` over the rank for factors in canonical layout (numpy)."""
    rank = a.shape[0]
    return (b.reshape(b.shape[0], rank) @ a.reshape(rank, -1)).reshape(b.shape[0], *a.shape[1:]) * scaling
