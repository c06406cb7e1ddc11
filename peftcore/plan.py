"""The rewrite IR: what a method asks a backend to do to a model.

A :class:`RewritePlan` is a frozen, JSON-serialisable list of ops made by a method's
planner from ``(config, ModelGraph)``. Backends build the ops on their framework; the
adapter file stores the plan so loading re-applies exactly what was trained.

Each op also declares the adapter tensors it owns (:meth:`PlanOp.tensor_specs`): their
canonical names, shapes and Hugging Face PEFT key names. The adapter reader and
writer use that to validate files without knowing any framework.

This module holds the IR and the ops every method shares (:class:`FreezeBase`,
:class:`SaveModule`); a method's own ops live in its module under
:mod:`peftcore.methods` (a plugin's, in the plugin) and register themselves with
:func:`register_op`.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional, Sequence, TypeVar

from peftcore.errors import AdapterError, PlanError, did_you_mean
from peftcore.graph import ModelGraph

if TYPE_CHECKING:
    import numpy as np

#: Bumped when the plan JSON changes incompatibly.
PLAN_FORMAT_VERSION = 1

_OP_TYPES: dict[str, type[PlanOp]] = {}
OpT = TypeVar("OpT", bound="PlanOp")


def register_op(cls: type[OpT]) -> type[OpT]:
    """Class decorator: make an op type known to :meth:`RewritePlan.from_dict`.

    The module that defines an op registers it when it is imported: the built-in
    methods' modules (``import peftcore`` imports them all) and a plugin's modules (loaded
    with the plugin), so deserialising a plan never has to look for anything.
    Third-party methods register their own op types the same way.
    """
    if not getattr(cls, "op", ""):
        raise PlanError(f"{cls.__name__} must set a class attribute 'op'")
    _OP_TYPES[cls.op] = cls
    return cls


def op_types() -> dict[str, type[PlanOp]]:
    """All registered op types, by op name."""
    return dict(_OP_TYPES)


@dataclass(frozen=True)
class TensorSpec:
    """An adapter tensor an op creates: canonical shape and its HF PEFT key suffix.

    ``hf_root`` marks a key HF PEFT stores at the top level of the file, not under the
    layer's path (prompt tuning's ``prompt_embeddings``).
    """

    shape: tuple
    hf_name: str
    hf_root: bool = False


@dataclass(frozen=True)
class PlanOp:
    """Base class of rewrite ops. ``path`` is the layer the op acts on ('' = whole model)."""

    op: ClassVar[str] = ""
    #: Whether the backend can fold this op into the base weights (merge_adapter).
    mergeable: ClassVar[bool] = True
    #: Whether the op only trains base parameters in place (:meth:`base_tensors`); the
    #: core builds such ops itself on every backend that has the ``base_tensor`` primitive.
    trains_base_in_place: ClassVar[bool] = False
    #: The base tensor of layer ``path`` a merge changes (canonical name: ``"weight"``,
    #: ``"bias"``), or None when merging it changes no base tensor.
    merge_target: ClassVar[Optional[str]] = None
    path: str = ""

    def __post_init__(self) -> None:
        """Check every field against the type of its default (ops come from files)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.default is not MISSING:
                default = f.default
            elif f.default_factory is not MISSING:
                default = f.default_factory()
            else:  # a field without a default: nothing to check it against
                continue
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, (int, float)):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                if ok and isinstance(default, int):
                    ok = isinstance(value, int)
                elif ok:
                    object.__setattr__(self, f.name, float(value))
            elif isinstance(default, str):
                ok = isinstance(value, str)
            elif isinstance(default, Mapping):
                ok = isinstance(value, Mapping)
            else:
                ok = True
            if not ok:
                raise PlanError(f"plan op {self.op!r}: field {f.name!r} must be {type(default).__name__}, got {value!r}")

    def tensor_specs(self) -> dict[str, TensorSpec]:
        """Adapter tensors this op owns, keyed by canonical name relative to ``path``."""
        return {}

    def base_tensors(self) -> dict[str, str]:
        """The base model's own parameters this op trains in place (not adapter tensors):
        canonical tensor name (a key of :meth:`tensor_specs`) -> the parameter's name on
        the layer at ``path`` (``"bias"``). The core exports, loads and switches their
        training through the backend's ``base_tensor`` primitive."""
        return {}

    def delta(self, tensors: Mapping[str, np.ndarray], base: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """The change merging this op makes to :attr:`merge_target`, as a numpy array in
        canonical layout, computed in the dtype of ``tensors`` (this op's canonical
        tensors, by the names of :meth:`tensor_specs`). ``base`` is the base tensor's value
        where the caller has it. None when the op merges into nothing, or when its change
        cannot be told without ``base``. The merge-overflow check, the conformance
        suite's numpy reference and the converters all use this one definition."""
        return None

    def misfit(self, graph: ModelGraph) -> Optional[str]:
        """Why this op does not fit layer ``path`` of ``graph`` (None when it fits).

        Ops whose tensors depend on a layer's shape override it, so a saved adapter is
        checked against the model before anything is built.
        """
        return None

    def baked(self) -> PlanOp:
        """This op in inference form (``PeftModel.bake``): an op with a training-time
        reparameterisation returns the op its computed tensors are stored in."""
        return self

    def num_trainable(self) -> int:
        """Number of trainable scalars this op adds or unfreezes."""
        return sum(math.prod(spec.shape) for spec in self.tensor_specs().values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return {"op": self.op, **data}


@register_op
@dataclass(frozen=True)
class FreezeBase(PlanOp):
    """Make every parameter of the base model non-trainable."""

    op: ClassVar[str] = "freeze_base"


@register_op
@dataclass(frozen=True)
class SaveModule(PlanOp):
    """Train a full copy of a module per adapter (HF PEFT's ``modules_to_save``).

    ``param_shapes`` maps each parameter under the module (relative name) to its shape.
    ``hf_key_prefix`` is where HF PEFT files keep the module's tensors when that is not
    the usual ``base_model.model.`` (its prompt-learning adapters use ``base_model.``).
    """

    op: ClassVar[str] = "modules_to_save"
    param_shapes: Mapping[str, tuple] = field(default_factory=dict)
    hf_key_prefix: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        shapes = {}
        for name, shape in self.param_shapes.items():
            if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise PlanError(f"modules_to_save op on {self.path!r}: shape of {name!r} must be a list of sizes, got {shape!r}")
            shapes[str(name)] = tuple(shape)
        object.__setattr__(self, "param_shapes", shapes)

    def tensor_specs(self) -> dict[str, TensorSpec]:
        if self.hf_key_prefix:
            return {
                name: TensorSpec(shape, f"{self.hf_key_prefix}{self.path}.{name}", hf_root=True)
                for name, shape in self.param_shapes.items()
            }
        return {name: TensorSpec(shape, name) for name, shape in self.param_shapes.items()}

    def misfit(self, graph: ModelGraph) -> Optional[str]:
        actual = graph.subtree_params(self.path)
        if actual != dict(self.param_shapes):
            return f"module {self.path!r} has parameters {actual}, the adapter saved {dict(self.param_shapes)}"
        return None

    def to_dict(self) -> dict[str, Any]:
        data = {"op": self.op, "path": self.path, "param_shapes": {k: list(v) for k, v in self.param_shapes.items()}}
        if self.hf_key_prefix:
            data["hf_key_prefix"] = self.hf_key_prefix
        return data


@dataclass(frozen=True)
class RewritePlan:
    """An adapter's complete recipe: the method, the adapter name and the ordered ops."""

    method: str
    adapter_name: str
    ops: tuple[PlanOp, ...]
    version: int = PLAN_FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        for op in self.ops:
            if not isinstance(op, PlanOp):
                raise PlanError(f"plan op {op!r} is not a PlanOp")

    def ops_of(self, *op_names: str) -> list[PlanOp]:
        return [op for op in self.ops if op.op in op_names]

    @property
    def paths(self) -> list[str]:
        """Layers the plan touches, in order, without repeats."""
        return list(dict.fromkeys(op.path for op in self.ops if op.path))

    def num_trainable(self) -> int:
        return sum(op.num_trainable() for op in self.ops)

    def tensor_specs(self) -> dict[str, TensorSpec]:
        """Every adapter tensor of the plan, keyed by canonical full name (``path.name``).

        The returned specs' ``hf_name`` is the full HF PEFT key without its
        ``base_model.model.`` prefix (``path.lora_A.weight``).
        """
        specs: dict[str, TensorSpec] = {}
        for op in self.ops:
            for name, spec in op.tensor_specs().items():
                full = f"{op.path}.{name}" if op.path else name
                hf_name = f"{op.path}.{spec.hf_name}" if op.path and not spec.hf_root else spec.hf_name
                specs[full] = TensorSpec(spec.shape, hf_name, spec.hf_root)
        return specs

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "method": self.method,
            "adapter_name": self.adapter_name,
            "ops": [op.to_dict() for op in self.ops],
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RewritePlan:
        if not isinstance(data, Mapping):
            raise PlanError(f"a rewrite plan must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("method", "adapter_name", "ops") if k not in data]
        if missing:
            raise PlanError(f"rewrite plan is missing {missing}")
        version = data.get("version", PLAN_FORMAT_VERSION)
        if not isinstance(version, int) or version > PLAN_FORMAT_VERSION:
            raise PlanError(f"rewrite plan format version {version!r} is newer than this peftcore understands")
        if not isinstance(data["ops"], Sequence) or isinstance(data["ops"], str):
            raise PlanError("rewrite plan 'ops' must be a list")
        if not isinstance(data["method"], str) or not isinstance(data["adapter_name"], str):
            raise PlanError("rewrite plan 'method' and 'adapter_name' must be strings")
        return cls(
            method=data["method"],
            adapter_name=data["adapter_name"],
            ops=tuple(_op_from_dict(op) for op in data["ops"]),
            version=version,
        )

    @classmethod
    def from_json(cls, text: str) -> RewritePlan:
        from peftcore import strict_json

        try:
            data = strict_json.loads(text)
        except ValueError as exc:  # JSONDecodeError too; numbers or nesting out of bounds
            raise PlanError(f"rewrite plan is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def with_adapter_name(self, adapter_name: str) -> RewritePlan:
        return RewritePlan(self.method, adapter_name, self.ops, self.version)


def _op_from_dict(data: Any) -> PlanOp:
    if not isinstance(data, Mapping) or "op" not in data:
        raise PlanError(f"plan op must be an object with an 'op' field, got {data!r}")
    name = data["op"]
    cls = _OP_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise PlanError(
            f"unknown plan op {name!r}{did_you_mean(str(name), _OP_TYPES)} (a plugin's ops are known "
            "once the plugin is loaded: PeftRegistry.load_plugins())"
        )
    allowed = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in data.items() if k != "op"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise PlanError(f"plan op {name!r} has unknown fields {unknown}")
    return cls(**kwargs)


def check_plan_fits(plan: RewritePlan, graph: ModelGraph, source: str) -> None:
    """Raise :class:`AdapterError` unless every op of ``plan`` fits a layer of ``graph``
    (the layer exists and its shapes are those the op was planned for)."""
    for op in plan.ops:
        if not op.path:
            continue
        if op.path not in graph:
            raise AdapterError(
                f"{source}: the adapter adapts layer {op.path!r}, which this model does not have"
                f"{did_you_mean(op.path, graph.paths)}"
            )
        problem = op.misfit(graph)
        if problem:
            raise AdapterError(f"{source}: {problem}")
