"""The plugin contract: pluggy hook specifications (project name and prefix ``peftcore``).

Two families of hooks:

* **Backend hooks** are implemented by a backend plugin and called on the selected
  backend only (pluggy's subset caller), never broadcast. A plugin is a backend when it
  implements ``peftcore_backend_info``; it must then implement every hook in
  :data:`REQUIRED_BACKEND_HOOKS`.
* **Extension hooks** are broadcast to every plugin: register methods, map extra layer
  classes to IR kinds, supply builders for new op types.

A plugin module must import without its framework installed (keep heavy imports inside
functions) and report itself unavailable through :class:`BackendInfo` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import pluggy

if TYPE_CHECKING:
    import numpy as np

    from peftcore.config import PeftConfig
    from peftcore.graph import ModelGraph
    from peftcore.plan import RewritePlan
    from peftcore.testing.toys import ToySpec

PROJECT = "peftcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class BackendInfo:
    """What a backend says about itself.

    ``ops`` lists the plan op types it can build (``"lora"``, ``"freeze_base"``...);
    ``reason`` says why it is unavailable (e.g. its framework is not installed).
    """

    name: str
    framework: str
    available: bool
    version: Optional[str] = None
    reason: str = ""
    ops: Sequence[str] = field(default_factory=tuple)


# -- backend hooks (subset-called on one backend) ---------------------------------------


@hookspec(firstresult=True)
def peftcore_backend_info() -> BackendInfo:  # type: ignore[empty-body]
    """Describe this backend and whether it can run here."""


@hookspec(firstresult=True)
def peftcore_detect(model: Any) -> Optional[bool]:  # type: ignore[empty-body]
    """Return True if ``model`` is a native model of this backend's framework.

    Check ``sys.modules`` for the framework first, so detection never imports it.
    """


@hookspec(firstresult=True)
def peftcore_describe(model: Any, example_inputs: Any) -> ModelGraph:  # type: ignore[empty-body]
    """Describe ``model`` as a ModelGraph with canonical shapes.

    A model that already carries adapters is described as its base layers.
    """


@hookspec(firstresult=True)
def peftcore_apply(model: Any, plan: RewritePlan) -> Any:  # type: ignore[empty-body]
    """Build every op of ``plan`` into ``model`` in place; return the model."""


@hookspec(firstresult=True)
def peftcore_peft_model_class() -> type:  # type: ignore[empty-body]
    """The backend's native PeftModel shell: a subclass of :class:`peftcore.peft_model.PeftModel`
    and of the framework's model class, built as ``shell(model, backend_name, graph)``.
    Optional: without it the core wraps the model in a plain handle."""


@hookspec(firstresult=True)
def peftcore_export_adapter(model: Any, adapter_name: str) -> Mapping[str, np.ndarray]:  # type: ignore[empty-body]
    """Return the adapter's tensors as numpy arrays in canonical layout, keyed by
    canonical name (``<layer path>.<tensor name>`` as in ``RewritePlan.tensor_specs``)."""


@hookspec(firstresult=True)
def peftcore_import_adapter(model: Any, adapter_name: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy canonical-layout numpy tensors into the adapter's parameters."""


@hookspec(firstresult=True)
def peftcore_set_active_adapters(model: Any, adapter_names: Sequence[str]) -> None:
    """Make exactly ``adapter_names`` active (used in forward, trainable)."""


@hookspec(firstresult=True)
def peftcore_set_adapters_enabled(model: Any, enabled: bool) -> None:
    """Switch every adapter layer off (base model behaviour) or back on."""


@hookspec(firstresult=True)
def peftcore_set_batch_adapters(model: Any, adapter_names: Optional[Sequence[str]]) -> None:
    """Route each row of the following forward passes through the adapter it names
    (one name per row, ``"__base__"`` for none; names are already checked to exist and
    to be unmerged); ``None`` stops routing. Raise if a layer cannot route rows, leaving
    nothing routed. Optional for a backend (mixed-adapter batches need it)."""


@hookspec(firstresult=True)
def peftcore_set_trainable(model: Any, adapter_name: str, trainable: bool) -> None:
    """Make one adapter's parameters trainable or frozen."""


@hookspec(firstresult=True)
def peftcore_delete_adapter(model: Any, adapter_name: str) -> None:
    """Remove one adapter's modules and parameters."""


@hookspec(firstresult=True)
def peftcore_merge(model: Any, adapter_names: Sequence[str]) -> None:
    """Fold the named adapters into the base weights."""


@hookspec(firstresult=True)
def peftcore_unmerge(model: Any) -> None:
    """Undo every merge, restoring the base weights."""


@hookspec(firstresult=True)
def peftcore_unload(model: Any, merge: bool) -> Any:
    """Remove every adapter layer (folding active adapters in first when ``merge``);
    return the plain model with its original layer types."""


@hookspec(firstresult=True)
def peftcore_count_parameters(model: Any) -> tuple:  # type: ignore[empty-body]
    """Return ``(trainable, total)`` scalar counts of the model's parameters."""


@hookspec(firstresult=True)
def peftcore_bake(model: Any, adapter_name: str) -> None:
    """Store what the adapter's training-time reparameterisations compute (residual
    prompt tuning's MLP output) as plain tensors and drop the reparameterisation, so the
    adapter matches its plan's ``baked()`` ops. Optional for a backend."""


@hookspec(firstresult=True)
def peftcore_gate_values(model: Any, adapter_name: str) -> Mapping[str, np.ndarray]:  # type: ignore[empty-body]
    """The adapter's gate values from the last forward pass (UniPELT), numpy ``(batch,)``
    arrays keyed ``<op path>.<gate stem>``. Optional for a backend."""


@hookspec(firstresult=True)
def peftcore_adapter_gradients(model: Any, adapter_name: str, loss: Any) -> Mapping[str, np.ndarray]:  # type: ignore[empty-body]
    """The gradient of ``loss`` (a scalar of the backend's framework, computed by running
    the model) with respect to each of the adapter's tensors, as canonical-layout numpy
    arrays keyed like ``peftcore_export_adapter``. Stored gradients are left alone.
    Optional for a backend (XPrompt's scoring uses it)."""


# -- conformance-suite hooks (backend) -------------------------------------------------


@hookspec(firstresult=True)
def peftcore_build_toy_model(spec: ToySpec, weights: Mapping[str, np.ndarray]) -> Any:
    """Build ``spec`` natively with the given canonical-layout weights."""


@hookspec(firstresult=True)
def peftcore_toy_forward(model: Any, inputs: np.ndarray) -> np.ndarray:  # type: ignore[empty-body]
    """Run a toy model (or the wrapped model) in eval mode on numpy inputs."""


# -- extension hooks (broadcast) --------------------------------------------------------


@hookspec
def peftcore_register_methods() -> Sequence[type[PeftConfig]]:  # type: ignore[empty-body]
    """Return config classes of extra PEFT methods (each sets ``method``)."""


@hookspec
def peftcore_layer_kinds(backend: str) -> Mapping[Any, str]:  # type: ignore[empty-body]
    """Map extra native layer classes of ``backend`` (e.g. a quantised linear) to IR kinds."""


@hookspec
def peftcore_op_builders(backend: str) -> Mapping[str, Callable[..., Any]]:  # type: ignore[empty-body]
    """Return builders for extra op types on ``backend``: ``{op name: builder}``.

    The builder's signature is the backend's own (documented in the backend package).
    """


#: Hooks every backend must implement.
REQUIRED_BACKEND_HOOKS = (
    "peftcore_backend_info",
    "peftcore_detect",
    "peftcore_describe",
    "peftcore_apply",
    "peftcore_export_adapter",
    "peftcore_import_adapter",
    "peftcore_set_active_adapters",
    "peftcore_set_adapters_enabled",
    "peftcore_set_trainable",
    "peftcore_delete_adapter",
    "peftcore_merge",
    "peftcore_unmerge",
    "peftcore_unload",
    "peftcore_count_parameters",
)
