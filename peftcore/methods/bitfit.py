"""BitFit (Ben Zaken et al., 2022): train only bias terms.

Each selected layer gets one ``bitfit_bias`` op. The adapter holds the layer's full
trained bias (a copy of the base bias at the start, or zeros for a layer that had no
bias and was given one with ``add_missing_biases``), so the model's output at
initialisation is exactly the base model's and the saved file holds only biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Union

from peftcore.config import PeftConfig, check_type, config_class
from peftcore.errors import AdapterError, PlanError, TargetNotFoundError
from peftcore.graph import LAYER_KINDS, LayerNode, ModelGraph
from peftcore.methods.common import (
    effective_modules_to_save,
    modules_to_save_ops,
    validate_layers_pattern,
    validate_layers_to_transform,
    validate_modules_to_save,
)
from peftcore.peft_type import PeftType
from peftcore.plan import FreezeBase, PlanOp, RewritePlan, TensorSpec, register_op
from peftcore.targeting import ALL_LINEAR, TargetMatcher, Targets, layer_index, select_layers, validate_targets

#: Layer kinds that may carry a bias BitFit trains; only linears are given a new one.
BIAS_KINDS = ("linear", "norm", "conv")


@register_op
@dataclass(frozen=True)
class TrainBias(PlanOp):
    """Train the bias of layer ``path`` (``size`` values) as this adapter's own copy.

    ``added`` says the base layer has no bias: the adapter's starts at zero and merging
    gives the layer one.
    """

    op: ClassVar[str] = "bitfit_bias"
    merge_target: ClassVar[Optional[str]] = "bias"
    layer_kind: str = "linear"
    size: int = 0
    added: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_kind not in BIAS_KINDS:
            raise PlanError(f"bitfit_bias op on {self.path!r}: layer_kind must be one of {BIAS_KINDS}, got {self.layer_kind!r}")
        if self.size <= 0:
            raise PlanError(f"bitfit_bias op on {self.path!r}: size must be positive, got {self.size}")
        if self.added and self.layer_kind != "linear":
            raise PlanError(f"bitfit_bias op on {self.path!r}: only a linear layer can be given a new bias")

    def tensor_specs(self) -> dict[str, TensorSpec]:
        return {"bias": TensorSpec((self.size,), "bias")}

    def delta(self, tensors: Mapping[str, Any], base: Any = None) -> Any:
        """The trained bias minus the base one (``base``; a layer given a new bias had
        none). Without ``base``, the trained bias itself: what merging this adapter alone
        writes into the layer."""
        trained = tensors["bias"]
        return trained - base.reshape(trained.shape).astype(trained.dtype) if base is not None else trained

    def check_bias(self, bias_shape: Optional[tuple]) -> None:
        """An :class:`AdapterError` unless the layer's bias (its shape, None when it has
        none) is what this op expects: present with ``size`` values, or absent when ``added``."""
        if self.added != (bias_shape is None):
            state = "has no bias" if bias_shape is None else "already has a bias"
            raise AdapterError(f"layer {self.path!r} {state}, which the plan's bitfit_bias op did not expect")
        if bias_shape is not None and math.prod(bias_shape) != self.size:
            raise AdapterError(f"layer {self.path!r} has a bias of shape {tuple(bias_shape)}, the plan expects ({self.size},)")

    def misfit(self, graph: ModelGraph) -> Optional[str]:
        node = graph.get(self.path)
        if node.kind != self.layer_kind:
            return f"layer {self.path!r} is a {node.kind}, the adapter expects a {self.layer_kind}"
        if self.added:
            if node.has_bias:
                return f"layer {self.path!r} has a bias, the adapter was trained on one without"
            if node.out_features != self.size:
                return f"layer {self.path!r} has {node.out_features} outputs, the adapter's bias has {self.size}"
            return None
        shape = node.params.get("bias")
        if shape is None:
            return f"layer {self.path!r} has no bias, the adapter trained one of size {self.size}"
        if tuple(shape) != (self.size,):
            return f"layer {self.path!r} has a bias of shape {tuple(shape)}, the adapter's is ({self.size},)"
        return None


@config_class
class BitFitConfig(PeftConfig):
    """Configure BitFit: only bias terms are trained.

    - ``target_modules``: which layers' biases to train, with LoRA's matching rules (list
      of names or dotted suffixes, regex string, ``"all-linear"``). ``None`` (default)
      trains every bias of the model. The paper's subset for BERT is
      ``["query", "intermediate.dense"]``.
    - ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``: narrow the targets.
    - ``add_missing_biases``: give targeted linear layers that have no bias (Llama- or
      T5-style) a new zero-initialised one; with ``target_modules=None`` that is every
      linear layer except the output head. Off by default: such layers are skipped.
    - ``modules_to_save``: modules trained in full (``task_type="SEQ_CLS"`` adds the
      classifier head, as in HF PEFT).
    """

    method: ClassVar[str] = "bitfit"
    peft_type: ClassVar[str] = PeftType.BITFIT
    plan_ops: ClassVar[tuple] = ("freeze_base", "bitfit_bias", "modules_to_save")

    target_modules: Targets = None
    exclude_modules: Targets = None
    add_missing_biases: bool = False
    layers_to_transform: Union[int, list, None] = None
    layers_pattern: Union[str, list, None] = None
    modules_to_save: Optional[list] = None

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        self.target_modules = validate_targets(name, "target_modules", self.target_modules)
        self.exclude_modules = validate_targets(name, "exclude_modules", self.exclude_modules)
        check_type(name, "add_missing_biases", self.add_missing_biases, (bool,))
        validate_layers_to_transform(name, self.layers_to_transform)
        validate_layers_pattern(name, self.layers_pattern)
        validate_modules_to_save(name, self.modules_to_save)

    def plan(self, graph: ModelGraph, adapter_name: str = "default") -> RewritePlan:
        saved = effective_modules_to_save(self.task_type, self.modules_to_save) or []
        save_ops = modules_to_save_ops(graph, saved, type(self).__name__)
        inside_saved = [op.path for op in save_ops]
        ops: list[PlanOp] = [FreezeBase()]
        for node in self._selected(graph):
            # a module trained in full already trains its bias
            if any(node.path == p or node.path.startswith(p + ".") for p in inside_saved):
                continue
            ops.append(_bias_op(node))
        if len(ops) == 1:
            raise TargetNotFoundError(
                f"{type(self).__name__}: no selected layer has a bias to train; "
                "set add_missing_biases=True to give linear layers one"
            )
        ops.extend(save_ops)
        return RewritePlan(method=self.method, adapter_name=adapter_name, ops=tuple(ops))

    def _selected(self, graph: ModelGraph) -> list[LayerNode]:
        """Targeted layers that have a bias, or can be given one."""
        if self.target_modules is None:
            excluded = TargetMatcher(self.exclude_modules)
            nodes = [n for n in graph if not excluded(n.path)]
            if self.layers_to_transform is not None:
                wanted = {self.layers_to_transform} if isinstance(self.layers_to_transform, int) else set(self.layers_to_transform)
                nodes = [n for n in nodes if layer_index(n.path, self.layers_pattern) in wanted]
        else:
            nodes = select_layers(
                graph,
                self.target_modules,
                owner=type(self).__name__,
                supported_kinds=LAYER_KINDS,
                exclude_modules=self.exclude_modules,
                layers_to_transform=self.layers_to_transform,
                layers_pattern=self.layers_pattern,
            )
        return [n for n in nodes if self._has_or_gets_bias(n, graph)]

    def _has_or_gets_bias(self, node: LayerNode, graph: ModelGraph) -> bool:
        if "bias" in node.params:
            return node.kind in BIAS_KINDS
        if not self.add_missing_biases or node.kind != "linear" or not node.out_features:
            return False
        # "every linear" never means the output head; naming it explicitly does
        return self.target_modules not in (None, ALL_LINEAR) or node.path != graph.output_head


def _bias_op(node: LayerNode) -> TrainBias:
    if "bias" in node.params:
        shape = node.params["bias"]
        if len(shape) != 1:
            raise PlanError(f"layer {node.path!r} has a bias of shape {shape}; BitFit trains 1-d biases")
        return TrainBias(path=node.path, layer_kind=node.kind, size=int(shape[0]))
    return TrainBias(path=node.path, layer_kind="linear", size=int(node.out_features or 0), added=True)
