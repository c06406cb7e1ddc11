"""What a backend provides: a small runtime of framework primitives plus op builders.

The core does everything that is the same in every framework (applying a plan with
rollback, exporting and importing canonical tensors, the active/trainable/enabled state,
merging, unloading, baking, counting: :mod:`peftcore.model_ops`). It reaches a model
only through a :class:`BackendRuntime`, which a backend plugin returns from its one
backend hook, ``peftcore_backend``. A runtime says what it is (:meth:`BackendRuntime.info`),
recognises and describes models, walks and replaces layers, converts tensors to numpy,
flips trainability, and builds each plan op kind it supports with a builder.

Adapter layers, which each backend builds on its framework's kernels, follow one
protocol (:class:`AdapterLayerProtocol`; :class:`peftcore.adapter_layer.AdapterLayerCore`
implements it over the runtime's tensor primitives). What belongs to one method is a
capability of that method's layers, a small protocol of :mod:`peftcore.capabilities`
(baking, recorded gates, row routing, the weight's dtype). A runtime missing a required
primitive is reported unavailable, naming it, when its plugin registers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Iterable,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Union,
    runtime_checkable,
)

from peftcore.adapter_layer import AdapterLayerCore
from peftcore.primitives import TensorPrimitives

if TYPE_CHECKING:
    import numpy as np

    from peftcore.graph import ModelGraph
    from peftcore.plan import PlanOp, RewritePlan

#: ``builder(model, layers, op, adapter_name)``: build one op (each builder takes its own
#: :class:`~peftcore.plan.PlanOp` subclass); ``layers`` maps every layer path of the model
#: (``""`` is the model) to its layer and is kept current by builders that replace a layer.
OpBuilder = Callable[[Any, dict, Any, str], None]
#: Op builders keyed by the :class:`~peftcore.plan.PlanOp` subclass each one builds.
OpBuilders = Mapping[type["PlanOp"], OpBuilder]


@dataclass(frozen=True)
class BackendInfo:
    """What a backend says about itself.

    ``ops`` lists the plan op kinds it can build (``"lora"``, ``"freeze_base"``...);
    ``reason`` says why it is unavailable (e.g. its framework is not installed);
    ``limitations`` maps a method name to why the backend cannot build it, which
    ``peftcore backends`` shows next to the ops it lacks, or, for a method it does build,
    what it cannot build of it (shown as a limit of that method).
    """

    name: str
    framework: str
    available: bool
    version: Optional[str] = None
    reason: str = ""
    ops: Sequence[str] = field(default_factory=tuple)
    limitations: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class AdapterLayerProtocol(Protocol):
    """What the core needs of every adapter layer a backend builds."""

    active_adapters: list[str]
    merged_adapters: list[str]
    disabled: bool

    def adapter_names(self) -> list[str]: ...

    def has_adapter(self, adapter_name: str) -> bool: ...

    def adapters_to_run(self) -> list[str]: ...

    def tensor_names(self, adapter_name: str) -> list[str]: ...

    def canonical_name(self, attribute: str) -> str: ...

    def adapter_store(self, attribute: str) -> Any: ...

    def canonical_export(self, name: str, tensor: Any) -> Any: ...

    def export(self, adapter_name: str) -> Mapping[str, Any]: ...

    def load(self, adapter_name: str, tensors: Mapping[str, Any]) -> None: ...

    def delete(self, adapter_name: str) -> None: ...

    def set_trainable(self, adapter_name: str, trainable: bool) -> None: ...

    def merge(self, adapter_names: list[str]) -> None: ...

    def unmerge(self) -> None: ...

    def unwrap(self, merge: bool) -> Any: ...


@runtime_checkable
class CheckpointFormat(Protocol):
    """A framework's own checkpoint file as a source of adapters (``peftcore convert``).

    ``name`` is the layout's short name (``"singa"``), ``description`` says what such a
    file is, for messages. ``adapter_tensors`` returns ``(adapter name, canonical
    tensors)`` of one adapter of ``plan``; ``adapter_name`` None means the only one.
    It must read without the framework installed and never unpickle.
    """

    name: str
    description: str

    def recognises(self, path: Union[str, os.PathLike]) -> bool: ...

    def adapter_tensors(
        self, path: str, plan: RewritePlan, adapter_name: Optional[str], graph: Optional[ModelGraph]
    ) -> tuple[str, dict[str, np.ndarray]]: ...


@runtime_checkable
class TaskPeftModelClasses(Protocol):
    """Optional runtime capability: a PeftModel shell class per task type, as Hugging Face
    PEFT returns ``PeftModelForCausalLM`` for ``task_type="CAUSAL_LM"``. A runtime without
    it gets :meth:`BackendRuntime.peft_model_class` for every task type."""

    def task_peft_model_class(self, task_type: str) -> type: ...


class BackendRuntime(TensorPrimitives):
    """Base class of a backend's runtime: model primitives here, tensor primitives from
    :class:`~peftcore.primitives.TensorPrimitives` (the same object its adapter layers
    name as ``primitives``). Subclasses implement every method of
    :data:`REQUIRED_PRIMITIVES`; the lifecycle primitives (``write``, ``clone``,
    ``add_into``, ``fingerprint``) are needed by backends whose layers use the core's
    adapter-layer lifecycle, and ``write`` by :meth:`base_tensor`'s users."""

    #: The backend's name (``"torch"``) and framework (``"PyTorch"``).
    name: str = ""
    framework: str = ""

    # -- identity ------------------------------------------------------------------------
    def info(self) -> BackendInfo:
        """Describe the backend and whether it can run here (import the framework lazily)."""
        raise NotImplementedError

    def detect(self, model: Any) -> bool:
        """Whether ``model`` is a native model of this framework; never imports it."""
        raise NotImplementedError

    def describe(self, model: Any, example_inputs: Any, extra_kinds: Mapping[Any, str]) -> Optional[ModelGraph]:
        """The model as a ModelGraph with canonical shapes (adapter layers described as
        their base layers); None while its layers do not know their shapes yet."""
        raise NotImplementedError

    def peft_model_class(self) -> type:
        """The native PeftModel shell (see :mod:`peftcore.peft_model`)."""
        raise NotImplementedError

    # -- primitives ----------------------------------------------------------------------
    def layers(self, model: Any) -> Iterable[tuple[str, Any]]:
        """Every layer of ``model`` by dotted path, parents before children, adapter
        layers included (their base layers are not listed separately)."""
        raise NotImplementedError

    def is_adapter_layer(self, layer: Any) -> bool:
        """Whether ``layer`` is one of this backend's adapter layers (by default: whether
        it runs the core's lifecycle, :class:`~peftcore.adapter_layer.AdapterLayerCore`)."""
        return isinstance(layer, AdapterLayerCore)

    def replace_layer(self, model: Any, layers: dict, path: str, new: Any) -> None:
        """Put ``new`` at ``path`` in ``model`` and in the ``layers`` index."""
        raise NotImplementedError

    def parameters(self, model: Any) -> list[Any]:
        """Every parameter tensor of ``model``, once each."""
        raise NotImplementedError

    def adapter_parameters(self, layer: Any) -> list[Any]:
        """The parameter tensors an adapter layer owns (not its base layer's)."""
        raise NotImplementedError

    def builders(self) -> OpBuilders:
        """One builder per op class this backend builds itself."""
        raise NotImplementedError

    # -- optional ------------------------------------------------------------------------
    def gradients(self, loss: Any, tensors: Sequence[Any]) -> list[Optional[Any]]:
        """d ``loss`` / d each tensor (None where one took no part), leaving stored
        gradients alone. Optional: XPrompt's scoring needs it."""
        raise NotImplementedError(f"backend {self.name!r} cannot compute adapter gradients")

    def model_changed(self, model: Any) -> None:
        """Told after every change to what a forward computes (SINGA drops a recorded graph)."""

    def base_tensor(self, model: Any, path: str, name: str) -> Any:
        """The base model's parameter ``name`` (canonical: ``"weight"``, ``"bias"``) of the
        layer at ``path`` (of its wrapped layer when an adapter layer sits there), or None
        when it has none. Optional: ops that train base parameters in place (LoRA's
        ``bias="all"``) need it."""
        raise NotImplementedError(f"backend {self.name!r} cannot train base model parameters in place")

    def place_adapter_tensors(self, layer: Any, adapter_name: str, upcast: bool, on_meta: bool) -> None:
        """Where one layer's tensors of a new adapter live (HF PEFT's
        ``autocast_adapter_dtype``: ``upcast`` keeps half-precision ones in float32;
        ``low_cpu_mem_usage``: ``on_meta`` holds them as shapes only, until loading fills
        them). Optional: by default they stay as built."""

    def row_routing(self, adapter_names: Sequence[str]) -> Any:
        """The per-call routing object a mixed-adapter batch sets on layers that route rows.
        Optional: without it mixed-adapter batches are refused."""
        raise NotImplementedError(f"backend {self.name!r} cannot run mixed-adapter batches")


#: Methods a runtime must override.
REQUIRED_PRIMITIVES = (
    "info",
    "detect",
    "describe",
    "peft_model_class",
    "layers",
    "replace_layer",
    "parameters",
    "is_trainable",
    "set_trainable",
    "numel",
    "to_numpy",
    "adapter_parameters",
    "builders",
)


def missing_primitives(runtime: Any) -> list[str]:
    """The required primitives ``runtime`` lacks (not a BackendRuntime: it lacks all of
    those it does not define)."""
    missing = []
    for name in REQUIRED_PRIMITIVES:
        method = getattr(type(runtime), name, None)
        if not callable(method) or method is getattr(BackendRuntime, name):
            missing.append(name)
    return missing


class UnavailableRuntime(BackendRuntime):
    """The runtime of a backend whose framework cannot be used here, with the reason."""

    def __init__(self, name: str, framework: str, reason: str) -> None:
        self.name, self.framework, self.reason = name, framework, reason

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, self.framework, available=False, reason=self.reason)

    def detect(self, model: Any) -> bool:
        return False
