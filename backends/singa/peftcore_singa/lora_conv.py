"""LoRA around SINGA's ``layer.Conv2d``, with Hugging Face PEFT's tensors
(:mod:`peftcore.methods.lora_conv`).

SINGA's convolution weight has torch's layout, ``(out, in / group, kh, kw)``, so the
factors are stored canonically: A ``(r, in, kh, kw)`` is the weight of a convolution from
the input channels to ``r`` with the base layer's kernel, stride and padding (its uneven
``odd_padding`` too); B ``(out, r / group, 1, 1)`` the weight of a ``1x1`` convolution
grouped as the base layer. Both run through ``autograd.conv2d`` with handles of their
own, made for the input shape as SINGA's ``Conv2d`` makes its handle (graph recording off),
and with a frozen zero bias kept on the layer: for a bias-free handle SINGA's conv op
makes a temporary zero bias in its forward, which a recorded training graph reads after
Python has freed it (a segmentation fault in graph mode).

DoRA (``use_dora``, :mod:`peftcore_singa.dora`) keeps the magnitude as HF PEFT does,
``(1, out, 1, 1)``, so the scale broadcasts over the output's channel axis; ``conv(x, W)``
is the base output less its bias when no dropout runs and nothing is merged, else the
base convolution of the dropped input by the unmerged weight.

A ``Conv2d`` built with ``activation="RELU"`` applies the ReLU inside its forward; the
wrapper runs the convolution alone, adds the adapters' change and then applies the ReLU,
so the output is what the merged layer gives.

SINGA's CPU convolution handle is fixed to the input shape of the layer's first call:
a later batch of another size gives an output of the first batch's size, and another
image size aborts the process. The base layer has this limit already; the wrapper
checks the batch size and channels against the base layer's handle first and raises a
:class:`~peftcore.errors.BackendError` instead.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import numpy as np

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import autograd, layer, singa_wrap, tensor  # noqa: E402

from peftcore.errors import AdapterError, BackendError, PlanError  # noqa: E402
from peftcore.methods.lora import MAGNITUDE  # noqa: E402
from peftcore.methods.lora_conv import AddLoraConv, conv_delta, grouped_dora_refusal, grouped_merge_refusal  # noqa: E402
from peftcore_singa.layers import AdapterLayer, constant  # noqa: E402
from peftcore_singa.lora import LoraLayer, lora_dropout  # noqa: E402
from peftcore_singa.tensors import to_numpy  # noqa: E402
from peftcore_singa.walk import wrap_layer  # noqa: E402


class LoraConv2d(LoraLayer):
    """LoRA around ``layer.Conv2d`` (see the module docstring)."""

    def __init__(self, base_layer: Any, path: str) -> None:
        super().__init__(base_layer, path)
        #: convolution handles by (factor, input shape): SINGA's are made per input shape
        self.__dict__["_handles"] = {}

    def features(self) -> tuple[int, int]:
        return int(self.base_layer.in_channels), int(self.base_layer.nb_kernels)

    def new_adapter(self, adapter_name: str, op: AddLoraConv) -> dict[str, Any]:  # type: ignore[override]
        base = self.base_layer
        kernel = tuple(int(k) for k in base.kernel_size)
        if kernel != tuple(op.kernel_size) or int(base.group) != op.groups:
            raise AdapterError(
                f"LoRA op for {op.path!r} was planned for kernel {op.kernel_size} and groups={op.groups}; the layer "
                f"has kernel {kernel} and group={base.group}"
            )
        a = self.new_tensor((op.r, op.in_features, *kernel), f"lora_A.{adapter_name}")
        b = self.new_tensor((op.out_features, op.r // op.groups, 1, 1), f"lora_B.{adapter_name}")
        _initialise(a, b, op)
        values = {"lora_A": a, "lora_B": b, "scaling": float(op.scaling), "r": int(op.r), "dropout": float(op.dropout),
                  "use_dora": False}  # switched on by add() once the magnitude has its value
        if op.use_dora:
            if op.groups > 1:
                raise AdapterError(grouped_dora_refusal(op.path, op.groups))
            magnitude = self.new_tensor((1, op.out_features, 1, 1), f"{MAGNITUDE}.{adapter_name}")  # HF's shape
            magnitude.set_value(0.0)
            values[MAGNITUDE] = magnitude
        return values

    def canonical_of(self, weight_tensor: Any) -> np.ndarray:
        return to_numpy(weight_tensor).astype(np.float64)  # SINGA's conv weight has torch's layout

    def canonical_lora_delta(self, adapter_name: str) -> np.ndarray:
        return self.native_lora_delta(adapter_name)

    def canonical_export(self, name: str, array: np.ndarray) -> np.ndarray:
        return array  # stored in canonical layout

    def native_import(self, name: str, array: np.ndarray) -> np.ndarray:
        return array

    def native_delta(self, adapter_name: str) -> np.ndarray:
        """The adapter's change to W (stored canonically): ``scaling * B @ A`` over the
        rank, or DoRA's whole change."""
        if self.use_dora.get(adapter_name, False):
            return self.dora_canonical_delta(adapter_name)
        return self.native_lora_delta(adapter_name)

    def native_lora_delta(self, adapter_name: str) -> np.ndarray:
        a = to_numpy(self.lora_A[adapter_name]).astype(np.float64)
        b = to_numpy(self.lora_B[adapter_name]).astype(np.float64)
        return conv_delta(a, b, self.scaling[adapter_name])

    def delta_weight(self, adapter_name: str) -> np.ndarray:
        """``scaling * B @ A`` over the rank, shaped as W (DoRA's whole change to W for a
        DoRA adapter); refused for a grouped layer."""
        if int(self.base_layer.group) > 1:
            raise AdapterError(grouped_merge_refusal(self.path, int(self.base_layer.group)))
        return self.native_delta(adapter_name)

    def forward(self, x: Any) -> Any:
        running = self.adapters_to_run()
        base = self.base_layer
        if not running:
            return base(x)
        self._check_input(x)
        fused_relu = getattr(base, "activation", "NOTSET") == "RELU"
        if fused_relu:  # the conv's own ReLU comes after the adapters' change, as after a merge
            base.device_check(x, base.W, *([base.b] if base.b is not None else []))
            result = autograd.conv2d(base.handle, x, base.W, base.b, base.odd_padding)
        else:
            result = base(x)
        base_out = result
        for name in running:
            dropped = lora_dropout(x, self.dropout[name])
            update = self.lora_update(name, dropped)
            if self.use_dora.get(name, False):
                update = self.dora_change(name, self._weighted(base_out, dropped, x), update)
            result = autograd.add(result, update)
        return autograd.relu(result) if fused_relu else result

    def _weighted(self, base_out: Any, dropped: Any, x: Any) -> Any:
        """``conv(x', W)`` without bias for DoRA: the base output less its bias when no
        dropout ran and nothing is merged, else the base convolution of ``x'`` by the
        unmerged weight."""
        base = self.base_layer
        if dropped is x and not self.merged_adapters:
            if base.b is None:
                return base_out
            return autograd.sub(base_out, autograd.reshape(base.b, [1, -1, 1, 1]))
        zeros = self._zeros(int(base.nb_kernels), x)
        return autograd.conv2d(base.handle, dropped, self.dora_weight_tensor(), zeros, base.odd_padding)

    def lora_update(self, adapter_name: str, dropped: Any) -> Any:
        """``scaling * B(A(x'))`` for the input ``x'`` after dropout: two convolutions, the
        scaling on A's ``r`` channels."""
        base = self.base_layer
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        self.device_check(dropped, a, b)
        rank, out_channels = int(a.shape[0]), int(b.shape[0])
        hidden = autograd.conv2d(self._handle_a(dropped, rank), dropped, a, self._zeros(rank, dropped), base.odd_padding)
        hidden = autograd.mul(hidden, self._scale(self.scaling[adapter_name], hidden))
        return autograd.conv2d(self._handle_b(hidden), hidden, b, self._zeros(out_channels, dropped))

    def _zeros(self, size: int, like: Any) -> Any:
        """A frozen zero bias of ``size``: SINGA's conv op makes a temporary one for a
        bias-free handle, which a recorded graph would read after it is freed (a crash in
        graph mode), so the factors' convolutions take this one, kept here."""
        key = ("zeros", size, like.device.id(), like.dtype)
        handles = self.__dict__["_handles"]
        if key not in handles:
            with _no_graph(like.device):
                zeros = tensor.Tensor((size,), like.device, like.dtype, requires_grad=False, stores_grad=False)
                zeros.set_value(0.0)
                handles[key] = zeros
        return handles[key]

    def _scale(self, scaling: float, like: Any) -> Any:
        """The ``(1,)`` scaling tensor, made once per value and device, outside any recorded graph."""
        key = ("scale", float(scaling), like.device.id(), like.dtype)
        handles = self.__dict__["_handles"]
        if key not in handles:
            with _no_graph(like.device):
                handles[key] = constant(scaling, like)
        return handles[key]

    def _check_input(self, x: Any) -> None:
        handle = getattr(self.base_layer, "handle", None)
        shape = tuple(int(d) for d in x.shape)
        if handle is None or len(shape) != 4:
            return
        if (int(handle.batchsize), int(handle.channels)) != shape[:2]:
            raise BackendError(
                f"conv layer {self.path!r}: SINGA's Conv2d keeps the input shape of its first call (batch "
                f"{handle.batchsize}, {handle.channels} channels) and cannot take input of shape {shape}; feed "
                "batches of that shape (or build the model anew for another)"
            )

    def _handle_a(self, x: Any, rank: int) -> Any:
        base = self.base_layer
        shape = [int(d) for d in x.shape]
        odd = tuple(int(p) for p in base.odd_padding)
        if any(odd):  # SINGA pads the input first, and makes the handle for the padded shape
            shape[2] += odd[0] + odd[1]
            shape[3] += odd[2] + odd[3]
        return self._handle(("A", rank, tuple(shape)), x, shape, tuple(base.kernel_size), tuple(base.stride),
                            tuple(base.padding), int(base.in_channels), rank, 1)

    def _handle_b(self, hidden: Any) -> Any:
        shape = [int(d) for d in hidden.shape]
        base = self.base_layer
        return self._handle(("B", tuple(shape)), hidden, shape, (1, 1), (1, 1), (0, 0), shape[1], int(base.nb_kernels),
                            int(base.group))

    def _handle(self, key: tuple, like: Any, shape: list, kernel: tuple, stride: tuple, padding: tuple,
                in_channels: int, out_channels: int, group: int) -> Any:
        handles = self.__dict__["_handles"]
        if key not in handles:  # as SINGA's Conv2d makes its handle: with graph recording off
            with _no_graph(like.device):
                sample = tensor.Tensor(tuple(shape), like.device, like.dtype, requires_grad=False, stores_grad=False)
                args = (sample.data, list(kernel), list(stride), list(padding), in_channels, out_channels, True, group)
                on_cpu = like.device.id() == -1
                handles[key] = singa_wrap.ConvHandle(*args) if on_cpu else singa_wrap.CudnnConvHandle(*args)
        return handles[key]


@contextlib.contextmanager
def _no_graph(device: Any) -> Iterator[None]:
    """Graph recording off on ``device`` for the block: what is made there (handles,
    constants) is made once, not recorded into a training graph and replayed."""
    previous = device.graph_enabled()
    device.EnableGraph(False)
    try:
        yield
    finally:
        device.EnableGraph(previous)


def _initialise(a: Any, b: Any, op: AddLoraConv) -> None:
    """As torch initialises a conv LoRA: A ``kaiming_uniform_(a=sqrt(5))`` (bound
    ``1/sqrt(fan_in)``, fan_in = in * kh * kw) or normal with std ``1/r``; B zero, or
    uniform like A for ``init="random"``."""
    fan_in = op.in_features * math.prod(op.kernel_size)
    if op.init == "gaussian":
        a.gaussian(0.0, 1.0 / op.r)
    else:
        bound = 1.0 / math.sqrt(max(fan_in, 1))
        a.uniform(-bound, bound)
    if op.init == "random":
        bound_b = 1.0 / math.sqrt(max(op.r // op.groups, 1))
        b.uniform(-bound_b, bound_b)
    else:
        b.set_value(0.0)


def build_lora_conv(model: Any, layers: dict, op: AddLoraConv, adapter_name: str) -> None:
    """The builder of :class:`~peftcore.methods.lora_conv.AddLoraConv`: SINGA's ``Conv2d``."""
    target = layers.get(op.path)
    base = target.base_layer if isinstance(target, AdapterLayer) else target
    if not isinstance(base, layer.Conv2d):
        kind = type(base).__name__ if base is not None else "missing"
        raise PlanError(f"singa backend puts convolution LoRA on layer.Conv2d; {op.path!r} is {kind}")
    if not base._initialized:
        raise PlanError(f"layer {op.path!r} is not initialised (no forward has reached it); pass example_inputs")
    wrap_layer(model, layers, op.path, LoraConv2d).add(adapter_name, op)
