"""The plan ops UniPELT adds: an attention prefix, a bottleneck adapter and a gate.

UniPELT (Mao et al., ACL 2022) composes three submodules per transformer layer, each
scaled by its own learned gate. The plan expresses that as ops a backend builds one by
one: the ordinary ``lora`` op (with ``scaling=1``, the gate replaces ``alpha / r``),
``prefix`` on an attention module, ``bottleneck_adapter`` on the feed-forward block's
output layer, and a ``gate`` op attached to each of those.

Canonical tensor names (relative to the op's ``path``):

- ``prefix``: ``prefix.keys`` and ``prefix.values``, each ``(num_virtual_tokens, width)``
  where ``width`` is the key (and value) projection's output size, all heads side by side;
- ``bottleneck_adapter``: ``adapter.down.weight`` ``(bottleneck, features)``,
  ``adapter.down.bias``, ``adapter.up.weight`` ``(features, bottleneck)``, ``adapter.up.bias``;
- ``gate``: ``<stem>.weight`` ``(1, in_features)`` and ``<stem>.bias`` ``(1,)``, with the
  stem ``lora_gate``, ``prefix.gate`` or ``adapter.gate`` for the submodule it gates.

None of these ops can be merged into base weights: their effect depends on the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from peftcore.errors import PlanError
from peftcore.graph import ModelGraph
from peftcore.plan import PlanOp, TensorSpec, register_op

#: What a gate can scale, and the stem of its tensor names.
GATE_STEMS = {"lora": "lora_gate", "prefix": "prefix.gate", "adapter": "adapter.gate"}

#: Activations the bottleneck adapter may use between its two projections.
ADAPTER_ACTIVATIONS = ("relu", "gelu", "tanh", "silu")


@register_op
@dataclass(frozen=True)
class AddGate(PlanOp):
    """Scale the ``target`` submodule that this plan put at ``path`` by a learned gate.

    The gate is ``sigmoid(x @ weight.T + bias)`` on the submodule's input ``x``, averaged
    over the sequence: one value in (0, 1) per example. ``target`` is ``"lora"`` (the
    low-rank update of the linear layer at ``path``), ``"prefix"`` (the prefix keys and
    values of the attention module at ``path``) or ``"adapter"`` (the bottleneck
    adapter's output at ``path``). ``in_features`` is the width of ``x``.
    """

    op: ClassVar[str] = "gate"
    mergeable: ClassVar[bool] = False
    target: str = "lora"
    in_features: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target not in GATE_STEMS:
            raise PlanError(f"gate op on {self.path!r}: target must be one of {sorted(GATE_STEMS)}, got {self.target!r}")
        if self.in_features <= 0:
            raise PlanError(f"gate op on {self.path!r}: in_features must be positive, got {self.in_features}")

    @property
    def stem(self) -> str:
        """The gate tensors' name without ``.weight`` / ``.bias``."""
        return GATE_STEMS[self.target]

    def tensor_specs(self) -> dict[str, TensorSpec]:
        return {
            f"{self.stem}.weight": TensorSpec((1, self.in_features), f"{self.stem}.weight"),
            f"{self.stem}.bias": TensorSpec((1,), f"{self.stem}.bias"),
        }

    def misfit(self, graph: ModelGraph) -> Optional[str]:
        if self.target == "prefix":
            return None  # the prefix op on the same path checks the attention module
        node = graph.get(self.path)
        width = node.in_features if self.target == "lora" else node.out_features
        if node.kind != "linear" or width != self.in_features:
            return f"layer {self.path!r} does not give the {self.target} gate the {self.in_features} input features it was planned for"
        return None


@register_op
@dataclass(frozen=True)
class AddPrefix(PlanOp):
    """Prepend ``num_virtual_tokens`` trained key/value vectors to the attention at ``path``.

    ``width`` is the size of one token's keys (and of its values) over all key/value
    heads, laid out as the attention's key projection outputs it. Every query attends
    to the prefix, whatever the attention mask and causality say about real tokens.
    ``key_path`` is the key projection the width was read from and ``key_split`` how
    many tensors its output holds side by side (3 for a fused query/key/value
    projection); loading checks the model's key projection still gives this width.
    """

    op: ClassVar[str] = "prefix"
    mergeable: ClassVar[bool] = False
    num_virtual_tokens: int = 10
    width: int = 0
    key_path: str = ""
    key_split: int = 1
    init_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.num_virtual_tokens, self.width, self.key_split) <= 0:
            raise PlanError(f"prefix op on {self.path!r}: num_virtual_tokens, width and key_split must be positive")
        if not self.init_std > 0:
            raise PlanError(f"prefix op on {self.path!r}: init_std must be positive, got {self.init_std}")

    def tensor_specs(self) -> dict[str, TensorSpec]:
        shape = (self.num_virtual_tokens, self.width)
        return {"prefix.keys": TensorSpec(shape, "prefix.keys"), "prefix.values": TensorSpec(shape, "prefix.values")}

    def misfit(self, graph: ModelGraph) -> Optional[str]:
        if not self.key_path:
            return None
        if self.key_path not in graph:
            return f"the prefix of {self.path!r} was planned with key projection {self.key_path!r}, which this model lacks"
        node = graph.get(self.key_path)
        if node.kind != "linear" or node.out_features != self.width * self.key_split:
            return f"key projection {self.key_path!r} does not produce keys of width {self.width} (the adapter's prefix width)"
        return None


@register_op
@dataclass(frozen=True)
class AddBottleneckAdapter(PlanOp):
    """Add ``up(act(down(y)))`` to the output ``y`` of the linear layer at ``path``.

    ``features`` is the layer's output size; ``bottleneck`` the adapter's inner size.
    The up projection starts at zero, so the adapter starts as the identity.
    """

    op: ClassVar[str] = "bottleneck_adapter"
    mergeable: ClassVar[bool] = False
    features: int = 0
    bottleneck: int = 48
    activation: str = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.features <= 0 or self.bottleneck <= 0:
            raise PlanError(f"bottleneck_adapter op on {self.path!r}: features and bottleneck must be positive")
        if self.activation not in ADAPTER_ACTIVATIONS:
            raise PlanError(
                f"bottleneck_adapter op on {self.path!r}: activation must be one of {ADAPTER_ACTIVATIONS}, got {self.activation!r}"
            )

    def tensor_specs(self) -> dict[str, TensorSpec]:
        d, b = self.features, self.bottleneck
        shapes = {"adapter.down.weight": (b, d), "adapter.down.bias": (b,), "adapter.up.weight": (d, b), "adapter.up.bias": (d,)}
        return {name: TensorSpec(shape, name) for name, shape in shapes.items()}

    def misfit(self, graph: ModelGraph) -> Optional[str]:
        node = graph.get(self.path)
        if node.kind != "linear" or node.out_features != self.features:
            return f"layer {self.path!r} does not output the {self.features} features the adapter was planned for"
        return None
