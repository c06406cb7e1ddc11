"""The (IA)^3 adapter layer for peftcore's SINGA backend (imported only when building).

:class:`IA3SingaLinear` wraps SINGA's ``layer.Linear``, ``layer.Gemm`` or the transformer
example's ``Linear3D`` and subclasses the backend's
:class:`~peftcore_singa.layers.AdapterLayer` (adding, export, import, delete, freezing, SINGA's
``get_params``/``save_states`` and unloading come from it and the core's lifecycle). Each adapter's vector
``ia3_l`` is stored in the canonical layout, ``(out, 1)`` or ``(1, in)`` for a
feed-forward input scale, and named ``<path>.ia3_l.<adapter>``. The forward is built
from ``singa.autograd`` ops on a 2-D view of the input, so gradients reach the vectors.
Merging multiplies the weight (and, for an output scale, the bias) and keeps the
originals, which unmerge restores bit for bit.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import autograd, layer  # noqa: E402

from peftcore_ia3.config import IA3Scale  # noqa: E402
from peftcore_singa.describe import is_linear_3d, linear_features, native_params  # noqa: E402
from peftcore_singa.layers import AdapterLayer  # noqa: E402
from peftcore_singa.tensors import copy_into, to_numpy  # noqa: E402


class IA3SingaLinear(AdapterLayer):
    """(IA)^3 around a SINGA linear layer: ``y = l_out * base(l_in * x)``; several active
    adapters multiply together, as in HF PEFT."""

    adapter_tensor_names = ("ia3_l",)
    other_param_names = ("is_feedforward",)
    is_feedforward: dict[str, bool]

    def features(self) -> tuple[int, int]:
        return linear_features(self.base_layer)

    def new_adapter(self, adapter_name: str, op: IA3Scale) -> dict[str, Any]:
        """Adapter ``adapter_name``'s vector as ``op`` describes (the core checks and stores it)."""
        vector = self.new_tensor(op.shape, f"ia3_l.{adapter_name}")
        if op.init == "random":
            vector.gaussian(1.0, 0.1)
        else:
            vector.set_value(1.0)
        return {"ia3_l": vector, "is_feedforward": bool(op.is_feedforward)}

    def _scale(self, names: Sequence[str], feedforward: bool) -> Optional[Any]:
        """The product of the named adapters' input (or output) scales, as a ``(1, n)`` row."""
        scale = None
        for name in names:
            if self.is_feedforward[name] == feedforward:
                vector = self.ia3_l[name]
                row = autograd.reshape(vector, [1, int(np.prod(vector.shape))])
                scale = row if scale is None else autograd.mul(scale, row)
        return scale

    def forward(self, x: Any) -> Any:
        base = self.base_layer
        shape = tuple(x.shape)
        flat = x if len(shape) == 2 else autograd.reshape(x, [-1, shape[-1]])
        running = self.adapters_to_run()
        scale_in, scale_out = self._scale(running, True), self._scale(running, False)
        if scale_in is not None:
            flat = autograd.mul(flat, scale_in)
        if is_linear_3d(base):  # its own forward slices x[i], which passes no gradient back
            result = autograd.matmul(flat, base.W)
            if getattr(base, "b", None) is not None:
                result = autograd.add_bias(result, base.b, axis=0)
        else:
            result = base(flat)
        if scale_out is not None:
            result = autograd.mul(result, scale_out)
        if len(shape) != 2:
            result = autograd.reshape(result, list(shape[:-1]) + [int(result.shape[-1])])
        return result

    # -- merging: multiplicative, so the originals are kept and restored ----------------------
    def merge(self, adapter_names: list[str]) -> None:
        todo = [a for a in adapter_names if self.has_adapter(a) and a not in self.merged_adapters]
        if not todo:
            return
        views = native_params(self.base_layer)
        weight_view, bias_view = views["weight"], views.get("bias")
        weight = weight_view.tensor
        if not self.merged_adapters:  # the originals, restored by unmerge
            original_bias = self.primitives.clone(bias_view.tensor) if bias_view is not None else None
            self.__dict__["_ia3_originals"] = (self.primitives.clone(weight), original_bias)
        canonical = weight_view.to_canonical(to_numpy(weight)).astype(np.float32)  # (out, in)
        bias = to_numpy(bias_view.tensor).astype(np.float32).reshape(-1) if bias_view is not None else None
        for name in todo:
            vector = to_numpy(self.ia3_l[name]).astype(np.float32).reshape(-1)
            if self.is_feedforward[name]:
                canonical = canonical * vector[None, :]
            else:
                canonical = canonical * vector[:, None]
                bias = bias * vector if bias is not None else None
        copy_into(weight, weight_view.to_native(canonical))
        if bias_view is not None and bias is not None:
            copy_into(bias_view.tensor, bias_view.to_native(bias))
        self.merged_adapters.extend(todo)
        self.__dict__["_ia3_fingerprint"] = self.primitives.fingerprint(weight)

    def unmerge(self) -> None:
        """Restore the originals; a weight changed while merged has the adapters' change
        subtracted instead (with a warning), keeping the edit."""
        originals = self.__dict__.get("_ia3_originals")
        if self.merged_adapters and originals is not None:
            views = native_params(self.base_layer)
            weight, bias_view = views["weight"].tensor, views.get("bias")
            if bias_view is not None and originals[1] is not None:
                self.primitives.write(bias_view.tensor, originals[1])
            if self.primitives.unchanged_since(weight, self.__dict__.get("_ia3_fingerprint")):
                self.primitives.write(weight, originals[0])
            else:
                self.warn_changed_while_merged("weight")
                self.primitives.add_into(weight, [self.delta_weight(name) for name in self.merged_adapters], -1)
        self.__dict__["_ia3_originals"] = self.__dict__["_ia3_fingerprint"] = None
        self.merged_adapters = []

    def delta_weight(self, adapter_name: str) -> np.ndarray:
        """What merging this adapter alone adds to the weight now, in its native layout
        (used only when the weight changed while merged and cannot be restored)."""
        view = native_params(self.base_layer)["weight"]
        canonical = view.to_canonical(to_numpy(view.tensor)).astype(np.float64)
        vector = to_numpy(self.ia3_l[adapter_name]).astype(np.float64).reshape(-1)
        factor = vector[None, :] if self.is_feedforward[adapter_name] else vector[:, None]
        return view.to_native(canonical * factor - canonical)


def is_singa_linear(node: Any) -> bool:
    return isinstance(node, (layer.Linear, layer.Gemm)) or is_linear_3d(node)
