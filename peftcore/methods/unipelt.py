"""UniPELT (Mao et al., ACL 2022): gated LoRA + prefix tuning + bottleneck adapter.

In every transformer block the plan puts, depending on ``variant``:

- ``L``: a LoRA on the query and value projections (``scaling=1``: the gate replaces
  ``alpha / r``),
- ``P``: ``num_virtual_tokens`` trained key/value vectors prepended in the attention,
- ``A``: a bottleneck adapter on the output of the feed-forward block,

each scaled by its own gate ``sigmoid(W x + b)`` of that submodule's input ``x``,
averaged over the sequence (one value per example). The paper trains the prefix
through an MLP reparameterisation; here the prefix vectors are trained directly.

Which modules of a block play which role is read from the ModelGraph: blocks are the
layers named ``<...>.<pattern>.<index>`` (``layers_pattern``, default ``layers``, ``h``,
``layer``, ``block``, ``blocks``), and the roles are paths relative to a block, taken
from :data:`BLOCK_LAYOUTS` by model type (BERT, RoBERTa, GPT-2, Llama, Mistral, Qwen2)
or from the config's ``attention_module`` / ``lora_modules`` / ``key_module`` /
``ffn_output_module``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Union

from peftcore.config import PeftConfig, check, check_type, config_class
from peftcore.errors import AdapterError, ConfigError, TargetNotFoundError, closest
from peftcore.graph import LayerNode, ModelGraph
from peftcore.methods.common import (
    effective_modules_to_save,
    modules_to_save_ops,
    validate_layers_pattern,
    validate_layers_to_transform,
    validate_modules_to_save,
)
from peftcore.methods.lora import AddLora
from peftcore.methods.unipelt_ops import ADAPTER_ACTIVATIONS, AddBottleneckAdapter, AddGate, AddPrefix
from peftcore.peft_type import PeftType
from peftcore.plan import FreezeBase, PlanOp, RewritePlan
from peftcore.targeting import DEFAULT_LAYERS_PATTERNS

_INITS = {True: "kaiming", "kaiming": "kaiming", "gaussian": "gaussian", False: "random"}


@dataclass(frozen=True)
class BlockLayout:
    """Where UniPELT's submodules go in one transformer block (paths relative to it).

    ``key_split`` is how many tensors the key projection's output holds side by side
    (3 for GPT-2's fused query/key/value ``c_attn``), so the key width is its output
    size divided by it.
    """

    attention: str
    lora: tuple
    key: str
    ffn_output: str
    key_split: int = 1


_BERT = BlockLayout("attention.self", ("attention.self.query", "attention.self.value"), "attention.self.key", "output.dense")
_LLAMA = BlockLayout("self_attn", ("self_attn.q_proj", "self_attn.v_proj"), "self_attn.k_proj", "mlp.down_proj")

#: Per-model-type defaults. GPT-2 fuses query, key and value into ``c_attn``, so its
#: LoRA adapts that one projection (as HF PEFT's default LoRA targets do).
BLOCK_LAYOUTS: dict[str, BlockLayout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "gpt2": BlockLayout("attn", ("attn.c_attn",), "attn.c_attn", "mlp.c_proj", key_split=3),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}


@config_class
class UniPELTConfig(PeftConfig):
    """Configure UniPELT.

    - ``variant``: which gated submodules to add, letters of ``"APL"`` (Adapter, Prefix,
      LoRA) as in the paper: ``"APL"`` (all three), ``"AP"``, ``"L"``...
    - ``r``, ``lora_dropout``, ``init_lora_weights``: the LoRA's rank, dropout and
      initialisation (as :class:`~peftcore.LoraConfig`; there is no alpha, the gate scales).
    - ``num_virtual_tokens``: prefix length; ``prefix_init_std``: the prefix's initial spread.
    - ``bottleneck_size``, ``adapter_activation``: the adapter's inner size and activation.
    - ``layers_to_transform``, ``layers_pattern``: which blocks get UniPELT (all by default).
    - ``attention_module``, ``lora_modules``, ``key_module``, ``ffn_output_module``: paths
      relative to a block that override the model type's :class:`BlockLayout`.
    - ``modules_to_save``: modules trained in full, as in LoRA (``task_type`` adds heads).
    """

    method: ClassVar[str] = "unipelt"
    peft_type: ClassVar[str] = PeftType.UNIPELT
    plan_ops: ClassVar[tuple] = ("freeze_base", "lora", "gate", "prefix", "bottleneck_adapter", "modules_to_save")

    variant: str = "APL"
    r: int = 8
    lora_dropout: float = 0.0
    init_lora_weights: Union[bool, str] = True
    num_virtual_tokens: int = 10
    prefix_init_std: float = 0.02
    bottleneck_size: int = 48
    adapter_activation: str = "relu"
    layers_to_transform: Union[int, list, None] = None
    layers_pattern: Union[str, list, None] = None
    attention_module: Optional[str] = None
    lora_modules: Optional[list] = None
    key_module: Optional[str] = None
    ffn_output_module: Optional[str] = None
    modules_to_save: Optional[list] = None

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        check_type(name, "variant", self.variant, (str,))
        check(
            bool(self.variant) and set(self.variant) <= set("APL") and len(set(self.variant)) == len(self.variant),
            f"{name}.variant must be letters of 'APL' (Adapter, Prefix, LoRA), each at most once, got {self.variant!r}",
        )
        for field_name in ("r", "num_virtual_tokens", "bottleneck_size"):
            value = getattr(self, field_name)
            check_type(name, field_name, value, (int,))
            check(value > 0, f"{name}.{field_name} must be a positive integer, got {value}")
        check_type(name, "lora_dropout", self.lora_dropout, (int, float))
        check(0.0 <= self.lora_dropout < 1.0, f"{name}.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check_type(name, "prefix_init_std", self.prefix_init_std, (int, float))
        check(self.prefix_init_std > 0, f"{name}.prefix_init_std must be positive, got {self.prefix_init_std}")
        if self.init_lora_weights not in _INITS or not isinstance(self.init_lora_weights, (bool, str)):
            raise ConfigError(f"{name}.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        check(
            self.adapter_activation in ADAPTER_ACTIVATIONS,
            f"{name}.adapter_activation must be one of {ADAPTER_ACTIVATIONS}, got {self.adapter_activation!r}",
        )
        validate_layers_to_transform(name, self.layers_to_transform)
        validate_layers_pattern(name, self.layers_pattern)
        for field_name in ("attention_module", "key_module", "ffn_output_module"):
            check_type(name, field_name, getattr(self, field_name), (str,), allow_none=True)
        if self.lora_modules is not None:
            check(
                isinstance(self.lora_modules, (list, tuple)) and bool(self.lora_modules)
                and all(isinstance(m, str) and m for m in self.lora_modules),
                f"{name}.lora_modules must be a non-empty list of paths relative to a block, got {self.lora_modules!r}",
            )
            self.lora_modules = list(self.lora_modules)
        validate_modules_to_save(name, self.modules_to_save)

    # -- planning -------------------------------------------------------------------
    def layout(self, graph: ModelGraph) -> BlockLayout:
        """The block layout for ``graph``: the model type's default with this config's overrides."""
        default = BLOCK_LAYOUTS.get(graph.model_type)
        overrides = {
            "attention": self.attention_module,
            "lora": tuple(self.lora_modules) if self.lora_modules else None,
            "key": self.key_module,
            "ffn_output": self.ffn_output_module,
        }
        needed = {"attention": "P", "lora": "L", "key": "P", "ffn_output": "A"}
        values: dict[str, Any] = {}
        for role, value in overrides.items():
            if value is None and default is not None:
                value = getattr(default, role)
            if value is None and needed[role] in self.variant:
                raise ConfigError(
                    f"{type(self).__name__}: there is no default UniPELT layout for model type "
                    f"{graph.model_type or 'unknown'!r}; set attention_module, lora_modules, key_module and "
                    f"ffn_output_module (paths relative to a transformer block, e.g. 'self_attn.q_proj')"
                )
            values[role] = value if value is not None else ("" if role != "lora" else ())
        split = default.key_split if default is not None and self.key_module is None else 1
        return BlockLayout(key_split=split, **values)

    def plan(self, graph: ModelGraph, adapter_name: str = "default") -> RewritePlan:
        layout = self.layout(graph)
        ops: list[PlanOp] = [FreezeBase()]
        for block in self.blocks(graph):
            ops.extend(self._block_ops(graph, block, layout))
        saved = effective_modules_to_save(self.task_type, self.modules_to_save)
        ops.extend(modules_to_save_ops(graph, saved, type(self).__name__))
        return RewritePlan(method=self.method, adapter_name=adapter_name, ops=tuple(ops))

    def blocks(self, graph: ModelGraph) -> list[str]:
        """Paths of the transformer blocks to adapt, in model order."""
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else list(self.layers_pattern or DEFAULT_LAYERS_PATTERNS)
        regex = re.compile(rf"(?:.*\.)?(?:{'|'.join(re.escape(p) for p in patterns)})\.(\d+)")
        wanted = self.layers_to_transform
        indices = {wanted} if isinstance(wanted, int) else set(wanted) if wanted is not None else None
        found = []
        for node in graph:
            match = regex.fullmatch(node.path)
            if match and (indices is None or int(match.group(1)) in indices):
                found.append(node.path)
        if not found:
            what = f"with index in {sorted(indices)} " if indices is not None else ""
            raise TargetNotFoundError(
                f"{type(self).__name__}: found no transformer block {what}(a layer named '<...>.<pattern>.<index>' "
                f"with pattern in {patterns}); set layers_pattern to the name of the model's block list"
            )
        return found

    def _block_ops(self, graph: ModelGraph, block: str, layout: BlockLayout) -> list[PlanOp]:
        ops: list[PlanOp] = []
        if "L" in self.variant:
            for rel in layout.lora:
                node = self._linear(graph, block, rel, "lora_modules")
                ops.append(self._lora_op(node))
                ops.append(AddGate(path=node.path, target="lora", in_features=int(node.in_features or 0)))
        if "P" in self.variant:
            attention = self._node(graph, block, layout.attention, "attention_module")
            key = self._linear(graph, block, layout.key, "key_module")
            width, rest = divmod(int(key.out_features or 0), layout.key_split)
            if rest or width <= 0:
                raise ConfigError(f"{type(self).__name__}: key projection {key.path!r} outputs {key.out_features} features, "
                                  f"which do not split into {layout.key_split} equal parts")
            ops.append(AddPrefix(path=attention.path, num_virtual_tokens=self.num_virtual_tokens, width=width,
                                 key_path=key.path, key_split=layout.key_split, init_std=float(self.prefix_init_std)))
            ops.append(AddGate(path=attention.path, target="prefix", in_features=int(key.in_features or 0)))
        if "A" in self.variant:
            node = self._linear(graph, block, layout.ffn_output, "ffn_output_module")
            features = int(node.out_features or 0)
            ops.append(AddBottleneckAdapter(path=node.path, features=features, bottleneck=self.bottleneck_size,
                                            activation=self.adapter_activation))
            ops.append(AddGate(path=node.path, target="adapter", in_features=features))
        return ops

    def _node(self, graph: ModelGraph, block: str, rel: str, field_name: str) -> LayerNode:
        path = f"{block}.{rel}"
        if path not in graph:
            inside = [n.path[len(block) + 1:] for n in graph if n.path.startswith(block + ".")]
            hints = closest(rel, inside)
            hint = f"; closest paths in the block: {', '.join(hints)}" if hints else ""
            raise TargetNotFoundError(
                f"{type(self).__name__}: block {block!r} has no module {rel!r} (set {field_name} to its path "
                f"relative to the block){hint}"
            )
        return graph.get(path)

    def _linear(self, graph: ModelGraph, block: str, rel: str, field_name: str) -> LayerNode:
        node = self._node(graph, block, rel, field_name)
        if node.kind != "linear":
            raise TargetNotFoundError(
                f"{type(self).__name__}: {node.path!r} is a {node.type_name or node.kind}, not a linear layer "
                f"(check {field_name})"
            )
        return node

    def _lora_op(self, node: LayerNode) -> AddLora:
        return AddLora(
            path=node.path,
            in_features=int(node.in_features or 0),
            out_features=int(node.out_features or 0),
            r=self.r,
            lora_alpha=float(self.r),
            scaling=1.0,
            dropout=float(self.lora_dropout),
            init=_INITS[self.init_lora_weights],
        )


def gate_values(peft_model: Any, adapter_name: Optional[str] = None) -> dict[str, Any]:
    """The gate values of the last forward pass, as numpy arrays of shape ``(batch,)``.

    Keys are the gates' canonical names (``<path>.lora_gate``, ``<attention>.prefix.gate``,
    ``<path>.adapter.gate``). ``adapter_name`` defaults to the first active adapter.
    Raises :class:`AdapterError` when the adapter has no gates or no forward pass has
    run since it was built.
    """
    name = adapter_name or peft_model.active_adapter
    plan = peft_model.plans.get(name)
    if plan is None:
        raise AdapterError(f"no adapter named {name!r}")
    expected = [f"{op.path}.{op.stem}" for op in plan.ops if isinstance(op, AddGate)]
    if not expected:
        raise AdapterError(f"adapter {name!r} ({plan.method}) has no gates")
    values: Mapping[str, Any] = peft_model.gate_values(name)
    found = {key: values[key] for key in expected if key in values}
    if not found:
        raise AdapterError(f"adapter {name!r} has not run a forward pass yet; its gates have no values")
    return found
