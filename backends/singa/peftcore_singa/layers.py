"""The base class of every adapter layer the SINGA backend builds.

An :class:`AdapterLayer` is a ``singa.layer.Layer`` that takes the place of one base
layer in its parent's ``_layers`` (same key, same layer name). The base layer is kept as
``base_layer`` but deliberately *not* registered as a sublayer, so its name and its
tensors' names (``fc1.W``...) stay exactly as they were: checkpoints of the plain model
still match, and SINGA's prefix-based ``set_params``/``set_states`` keep working.

Each adapter's tensors live in plain dicts named by ``adapter_tensor_names``
(``{adapter name: Tensor}``), with explicit, stable names ``<layer path>.<tensor>.<adapter>``
(e.g. ``fc1.lora_A.default``). :meth:`get_params`, :meth:`set_params`,
:meth:`get_states` and :meth:`set_states` are overridden to include them, so
``Model.get_params()``/``save_states()`` see the adapter, and SINGA optimizers (which key
their state by tensor name) never mix two adapters up.

Adding, deleting, export, import, merging with an exact unmerge and unwrapping are the
core's (:class:`~peftcore.adapter_layer.AdapterLayerCore`) over
:mod:`peftcore_singa.tensors`; base tensors are always changed in place, so their
identity and name, and any reference a recorded graph holds, stay valid.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import layer, tensor  # noqa: E402

from peftcore.adapter_layer import AdapterLayerCore  # noqa: E402
from peftcore_singa.tensors import SINGA_TENSORS, copy_into  # noqa: E402


def constant(value: float, like: Any) -> Any:
    """A frozen ``(1,)`` tensor holding ``value`` on ``like``'s device and dtype: autograd
    ops take only tensors, and this one broadcasts against any shape."""
    out = tensor.Tensor((1,), like.device, like.dtype, requires_grad=False, stores_grad=False)
    out.set_value(float(value))
    return out


class AdapterLayer(AdapterLayerCore, layer.Layer):
    """A base layer plus named adapters, as a SINGA layer. Subclasses set
    ``adapter_tensor_names`` (and ``canonical_names`` where an attribute's saved name
    differs), make an adapter's tensors in ``new_adapter`` and compute ``forward`` and
    ``delta_weight``; the lifecycle is :class:`~peftcore.adapter_layer.AdapterLayerCore`'s."""

    primitives = SINGA_TENSORS

    def __init__(self, base_layer: Any, path: str) -> None:
        super().__init__()
        self.__dict__["base_layer"] = base_layer  # not a registered sublayer (see module doc)
        self.path = path
        self.init_adapter_state()
        for name in (*self.adapter_tensor_names, *self.other_param_names):
            setattr(self, name, {})
        self._initialized = True  # the base layer is; adapter tensors are made in add()

    def adapter_tensors(self, adapter_name: Optional[str] = None) -> list[Any]:
        """The adapter tensors of one adapter, or of every adapter."""
        found = []
        for name in self.adapter_tensor_names:
            for adapter, t in getattr(self, name).items():
                if adapter_name is None or adapter == adapter_name:
                    found.append(t)
        return found

    def base_tensor(self, role: str) -> Any:
        value = self.base_layer.__dict__.get("W" if role == "weight" else role)
        return value if isinstance(value, tensor.Tensor) else None

    def new_tensor(self, shape: Sequence[int], name: str) -> Any:
        """A trainable tensor on the base weight's device and dtype, named ``<path>.<name>``."""
        weight = self.base_weight()
        return tensor.Tensor(
            tuple(int(d) for d in shape),
            weight.device,
            weight.dtype,
            requires_grad=True,
            stores_grad=True,
            name=f"{self.path}.{name}",
        )

    # -- SINGA's parameter API ------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        params = dict(self.base_layer.get_params()) if self.base_layer._initialized else {}
        params.update({t.name: t for t in self.adapter_tensors()})
        return params

    def set_params(self, parameters: Mapping[str, Any]) -> None:
        self._set(parameters, states=False)

    def get_states(self) -> dict[str, Any]:
        states = dict(self.base_layer.get_states()) if self.base_layer._initialized else {}
        states.update({t.name: t for t in self.adapter_tensors()})
        return states

    def set_states(self, states: Mapping[str, Any]) -> None:
        self._set(states, states=True)

    def _set(self, values: Mapping[str, Any], states: bool) -> None:
        base = self.base_layer
        if base._initialized:
            own = base.get_states() if states else base.get_params()
            if any(key in values for key in own):
                (base.set_states if states else base.set_params)(values)
        for t in self.adapter_tensors():
            if t.name in values:
                value = values[t.name]
                if isinstance(value, tensor.Tensor):
                    t.copy_data(value)
                else:
                    copy_into(t, value)
