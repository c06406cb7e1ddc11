"""The (IA)^3 config, its planner and its plan op. Pure Python: no framework import.

(IA)^3 learns a vector ``l`` per adapted linear layer. For an ordinary layer the
layer's output is multiplied by ``l`` (``y = l * (W x + b)``, ``l`` of shape
``(out_features, 1)``); for a *feed-forward* layer the input is (``y = W (l * x) + b``,
``l`` of shape ``(1, in_features)``). These are Hugging Face PEFT's shapes and its
tensor key (``base_model.model.<layer path>.ia3_l``), so adapter files are shared with
HF PEFT in both directions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence, Union

from peftcore.architectures import ia3_defaults
from peftcore.config import PeftConfig, check, check_type, config_class
from peftcore.errors import ConfigError, PlanError
from peftcore.graph import LayerNode, ModelGraph
from peftcore.methods.common import effective_modules_to_save, modules_to_save_ops, validate_modules_to_save
from peftcore.peft_type import PeftType
from peftcore.plan import FreezeBase, PlanOp, RewritePlan, TensorSpec, register_op
from peftcore.targeting import ALL_LINEAR, Targets, select_layers, validate_targets

_INITS = ("ones", "random")


@register_op
@dataclass(frozen=True)
class IA3Scale(PlanOp):
    """Scale a linear layer's output (or, when ``is_feedforward``, its input) by a learned vector.

    ``in_features``/``out_features`` are the layer's canonical sizes. ``init`` is
    ``"ones"`` (the layer is unchanged at first) or ``"random"`` (values around one, so
    the output changes at once; for tests). The vector is ``ia3_l``, shaped
    ``(out_features, 1)``, or ``(1, in_features)`` for a feed-forward layer.
    """

    op: ClassVar[str] = "ia3_scale"
    merge_target: ClassVar[Optional[str]] = "weight"
    in_features: int = 0
    out_features: int = 0
    is_feedforward: bool = False
    init: str = "ones"

    def __post_init__(self) -> None:
        base_check = getattr(super(), "__post_init__", None)  # generic field checks, where the core has them
        if base_check is not None:
            base_check()
        for name in ("in_features", "out_features"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise PlanError(f"ia3_scale op for {self.path!r}: {name} must be a positive int, got {value!r}")
        if not isinstance(self.is_feedforward, bool):
            raise PlanError(f"ia3_scale op for {self.path!r}: is_feedforward must be a bool, got {self.is_feedforward!r}")
        if self.init not in _INITS:
            raise PlanError(f"ia3_scale op for {self.path!r}: init must be one of {_INITS}, got {self.init!r}")
        if not self.path:
            raise PlanError("ia3_scale op needs the path of the layer it scales")

    @property
    def shape(self) -> tuple[int, int]:
        """The canonical (and HF PEFT) shape of the ``ia3_l`` vector."""
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def tensor_specs(self) -> dict[str, TensorSpec]:
        return {"ia3_l": TensorSpec(self.shape, "ia3_l")}

    def delta(self, tensors: Any, base: Any = None) -> Any:
        """``W * (l - 1)``: the change scaling the canonical ``(out, in)`` weight ``base``
        makes (the vector broadcasts along its axis). Multiplicative, so unknown (None)
        without the weight."""
        if base is None:
            return None
        return base * (tensors["ia3_l"] - 1)


@config_class
class IA3Config(PeftConfig):
    """Configure (IA)^3 with Hugging Face PEFT's field names.

    - ``target_modules``: layers to adapt; a list (exact name or dotted suffix), a
      regex string (full match) or ``"all-linear"``. ``None`` uses a per-model-type
      default (:func:`peftcore.architectures.ia3_defaults`).
    - ``feedforward_modules``: which targeted layers get their *input* scaled. A list
      entry matches a layer path that ends with it (HF PEFT's rule), a string is a full
      regex. ``None`` uses a per-model-type default (:func:`peftcore.architectures.ia3_defaults`); pass
      ``[]`` when no layer is feed-forward. When both fields are lists, every
      feed-forward entry must also be a target entry.
    - ``exclude_modules``: layers never adapted (same syntax as ``target_modules``).
    - ``init_ia3_weights``: ``True`` (vectors of ones: the model is unchanged at first)
      or ``False`` (random vectors around one; for tests).
    - ``fan_in_fan_out``: accepted for HF compatibility and ignored; the backend reads
      each layer's weight layout itself (e.g. transformers' ``Conv1D``).
    - ``modules_to_save``: modules trained in full (a copy per adapter) and saved.
    """

    method: ClassVar[str] = "ia3"
    peft_type: ClassVar[str] = PeftType.IA3
    tensor_prefix: ClassVar[str] = "ia3_"
    plan_ops: ClassVar[tuple] = ("freeze_base", "ia3_scale", "modules_to_save")

    target_modules: Targets = None
    feedforward_modules: Targets = None
    exclude_modules: Targets = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True
    modules_to_save: Optional[list] = None

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        self.target_modules = validate_targets(name, "target_modules", self.target_modules)
        self.exclude_modules = validate_targets(name, "exclude_modules", self.exclude_modules)
        self.feedforward_modules = validate_targets(name, "feedforward_modules", self.feedforward_modules)
        check(
            self.feedforward_modules != ALL_LINEAR,
            f"{name}.feedforward_modules cannot be {ALL_LINEAR!r}; name the feed-forward layers (list or regex)",
        )
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            stray = sorted(set(self.feedforward_modules) - set(self.target_modules))
            check(
                not stray,
                f"{name}.feedforward_modules must be a subset of target_modules; {stray} are not targets",
            )
        check_type(name, "init_ia3_weights", self.init_ia3_weights, (bool,))
        check_type(name, "fan_in_fan_out", self.fan_in_fan_out, (bool,))
        validate_modules_to_save(name, self.modules_to_save)

    def as_saved(self, graph: Optional[ModelGraph], plan: Optional[RewritePlan]) -> IA3Config:
        """Also the model type's default ``target_modules`` and ``feedforward_modules``
        written out, as HF PEFT saves them."""
        changes: dict[str, Any] = {"inference_mode": True}
        if graph is not None:
            for field_name, default in zip(("target_modules", "feedforward_modules"), ia3_defaults(graph.model_type)):
                if getattr(self, field_name) is None and default is not None:
                    changes[field_name] = sorted(set(default))
        return self.replace(**changes)

    # -- planning -------------------------------------------------------------------
    def resolved_targets(self, graph: ModelGraph) -> Targets:
        """``target_modules``, or the model type's default when it is None."""
        return self._resolve("target_modules", self.target_modules, ia3_defaults(graph.model_type)[0], graph)

    def resolved_feedforward(self, graph: ModelGraph) -> Targets:
        """``feedforward_modules``, or the model type's default when it is None."""
        return self._resolve("feedforward_modules", self.feedforward_modules, ia3_defaults(graph.model_type)[1], graph)

    def _resolve(self, field_name: str, value: Targets, default: Optional[list[str]], graph: ModelGraph) -> Targets:
        if value is not None:
            return value
        if default is not None:
            return default
        hint = " (use [] if no layer is feed-forward)" if field_name == "feedforward_modules" else ""
        raise ConfigError(
            f"{type(self).__name__}.{field_name} is not set and there is no (IA)^3 default for model type "
            f"{graph.model_type or 'unknown'!r}; name the layers{hint}"
        )

    def plan(self, graph: ModelGraph, adapter_name: str = "default") -> RewritePlan:
        """Plan (IA)^3 on ``graph``: freeze the base, one ``ia3_scale`` op per targeted linear."""
        owner = type(self).__name__
        feedforward = self.resolved_feedforward(graph)
        layers = select_layers(
            graph,
            self.resolved_targets(graph),
            owner=owner,
            supported_kinds=("linear",),
            exclude_modules=self.exclude_modules,
        )
        ops: list[PlanOp] = [FreezeBase()]
        ops.extend(self._scale_op(node, is_feedforward(node.path, feedforward)) for node in layers)
        # as HF PEFT: a task's new head (SEQ_CLS's classifier) is trained in full and saved
        ops.extend(modules_to_save_ops(graph, effective_modules_to_save(self.task_type, self.modules_to_save), owner))
        return RewritePlan(method=self.method, adapter_name=adapter_name, ops=tuple(ops))

    def _scale_op(self, node: LayerNode, feedforward: bool) -> IA3Scale:
        return IA3Scale(
            path=node.path,
            in_features=int(node.in_features or 0),
            out_features=int(node.out_features or 0),
            is_feedforward=feedforward,
            init="ones" if self.init_ia3_weights else "random",
        )


def is_feedforward(path: str, feedforward_modules: Union[str, Sequence[str], Any]) -> bool:
    """Whether layer ``path`` is feed-forward: full regex match for a string, plain
    suffix match for a list (HF PEFT's rule, so both libraries give the vector the same
    shape)."""
    if not feedforward_modules:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, path) is not None
    return any(path.endswith(entry) for entry in feedforward_modules)
