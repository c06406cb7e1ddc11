"""The pluggy plugin (entry point ``ia3`` in the ``peftcore`` group).

It registers the (IA)^3 method with peftcore and, for the torch and SINGA backends, the
builder of the ``ia3_scale`` plan op. This module imports without torch or SINGA: the
frameworks and the layer modules are imported inside the builders. It is not a backend (it implements no
``peftcore_backend``), only the broadcast extension hooks.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from peftcore.config import PeftConfig
from peftcore.hookspecs import hookimpl
from peftcore.plan import PlanOp
from peftcore_ia3.config import IA3Config, IA3Scale


@hookimpl
def peftcore_register_methods() -> Sequence[type[PeftConfig]]:
    """Register :class:`~peftcore_ia3.config.IA3Config` as method ``"ia3"`` (peft_type ``"IA3"``)."""
    return [IA3Config]


@hookimpl
def peftcore_op_builders(backend: str) -> Mapping[type[PlanOp], Callable[..., Any]]:
    """Builders for the ``ia3_scale`` op, by its class, for the torch and SINGA backends."""
    if backend == "torch":
        return {IA3Scale: build_ia3_scale_torch}
    if backend == "singa":
        return {IA3Scale: build_ia3_scale_singa}
    return {}


def build_ia3_scale_torch(model: Any, modules: dict, op: IA3Scale, adapter_name: str) -> None:
    """Torch builder: wrap ``op.path`` in an :class:`~peftcore_ia3.torch_layers.IA3Linear`
    (once) and add adapter ``adapter_name``'s vector to it."""
    from torch import nn

    from peftcore.errors import PlanError
    from peftcore_ia3.torch_layers import IA3Linear
    from peftcore_torch.layers import AdapterLayer
    from peftcore_torch.walk import is_conv1d, wrap_layer

    target = modules.get(op.path)
    base = target.base_layer if isinstance(target, AdapterLayer) else target
    if not (isinstance(base, nn.Linear) or (base is not None and is_conv1d(base))):
        kind = type(base).__name__ if base is not None else "missing"
        raise PlanError(f"(IA)^3 cannot scale {op.path!r} ({kind}); it supports nn.Linear and Conv1D")
    wrap_layer(model, modules, op.path, IA3Linear).add(adapter_name, op)


def build_ia3_scale_singa(model: Any, layers: dict, op: IA3Scale, adapter_name: str) -> None:
    """SINGA builder: wrap ``op.path`` in an :class:`~peftcore_ia3.singa_layers.IA3SingaLinear`
    (once) and add adapter ``adapter_name``'s vector to it."""
    from peftcore.errors import PlanError
    from peftcore_ia3.singa_layers import IA3SingaLinear, is_singa_linear
    from peftcore_singa.layers import AdapterLayer
    from peftcore_singa.walk import wrap_layer

    target = layers.get(op.path)
    base = target.base_layer if isinstance(target, AdapterLayer) else target
    if base is None or not is_singa_linear(base):
        kind = type(base).__name__ if base is not None else "missing"
        raise PlanError(f"(IA)^3 cannot scale {op.path!r} ({kind}); on SINGA it supports Linear, Gemm and Linear3D")
    if not base._initialized:
        raise PlanError(f"layer {op.path!r} is not initialised (no forward has reached it); pass example_inputs")
    wrap_layer(model, layers, op.path, IA3SingaLinear).add(adapter_name, op)
