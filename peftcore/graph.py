"""The model IR: a framework-neutral description of a model's layers.

A backend's ``describe`` hook turns a native model into a :class:`ModelGraph`. The core
plans against it and never sees the framework. Shapes are canonical (the torch/HF
layout): a linear weight is ``(out_features, in_features)`` whatever the framework
stores; an embedding table is ``(num_embeddings, embedding_dim)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from peftcore.errors import PlanError

#: The layer kinds the IR knows. ``container`` is a module that only holds others.
LAYER_KINDS = ("linear", "embedding", "conv", "norm", "container", "other")


#: Layer class names that are normalisation layers whatever their framework (models'
#: own ``LlamaRMSNorm``, ``T5LayerNorm``...).
NORM_NAME_SUFFIXES = ("RMSNorm", "LayerNorm")


def kind_of(layer: Any, extra_kinds: Mapping[Any, str], native: Sequence[tuple[str, Callable[[Any], bool]]]) -> str:
    """The IR kind of a framework layer: a plugin's extra layer classes first
    (``extra_kinds``), then the backend's own tests in order (``(kind, test)``), then a
    class named like a norm layer; ``"other"`` when nothing matches."""
    for cls, kind in extra_kinds.items():
        if isinstance(layer, cls):
            return kind
    for kind, test in native:
        if test(layer):
            return kind
    if type(layer).__name__.endswith(NORM_NAME_SUFFIXES):
        return "norm"
    return "other"


#: The fields only a convolution's node fills.
_CONV_FIELDS = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


@dataclass(frozen=True)
class LayerNode:
    """One named layer of a model, as a backend describes it.

    ``path`` is the dotted name the framework gives the layer (torch's module path,
    SINGA's ``_layers`` path). ``params`` maps each directly owned parameter's short
    name (``weight``, ``bias``) to its canonical shape.

    A ``conv`` layer gives its channels as ``in_features``/``out_features`` and its
    geometry: ``kernel_size``, ``stride`` and ``dilation`` (one size per spatial axis),
    ``padding`` (one size per axis, a start and an end per axis, or ``"same"``/``"valid"``),
    ``groups`` and ``padding_mode`` (torch's names: ``"zeros"``, ``"reflect"``, ...).

    ``transposed`` marks a module whose stacked (3-D) expert weights are stored
    ``(experts, in, out)`` rather than ``(experts, out, in)`` (transformers'
    ``is_transposed`` experts: GPT-OSS's).
    ``shares_weight_with`` is the path of an earlier layer whose ``weight`` this layer's
    is (an output head tied to the input embedding), or empty.
    """

    path: str
    kind: str
    type_name: str = ""
    in_features: Optional[int] = None
    out_features: Optional[int] = None
    num_embeddings: Optional[int] = None
    embedding_dim: Optional[int] = None
    has_bias: bool = False
    dtype: str = "float32"
    params: Mapping[str, tuple] = field(default_factory=dict)
    kernel_size: Optional[tuple] = None
    stride: Optional[tuple] = None
    padding: Any = None
    dilation: Optional[tuple] = None
    groups: Optional[int] = None
    padding_mode: Optional[str] = None
    transposed: bool = False
    shares_weight_with: str = ""

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise PlanError(f"layer {self.path!r} has unknown kind {self.kind!r}; expected one of {LAYER_KINDS}")
        object.__setattr__(self, "params", {k: tuple(int(d) for d in v) for k, v in self.params.items()})
        for name in ("kernel_size", "stride", "padding", "dilation"):  # JSON gives lists
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @property
    def name(self) -> str:
        """The last component of the path (``q_proj`` for ``model.layers.0.self_attn.q_proj``)."""
        return self.path.rsplit(".", 1)[-1]

    @property
    def num_params(self) -> int:
        """Number of scalars in the parameters this layer owns directly."""
        total = 0
        for shape in self.params.values():
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["params"] = {k: list(v) for k, v in self.params.items()}
        for name in _CONV_FIELDS:  # only a conv layer's are written
            if data[name] is None:
                del data[name]
            elif isinstance(data[name], tuple):
                data[name] = list(data[name])
        for optional in ("transposed", "shares_weight_with"):  # written only when set
            if not data[optional]:
                del data[optional]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerNode:
        return cls(**{**data, "params": {k: tuple(v) for k, v in data.get("params", {}).items()}})


@dataclass(frozen=True)
class ModelGraph:
    """An ordered list of layers plus a little model-level information.

    ``output_head`` is the path of the layer that produces the model's outputs (an LM
    head or classifier), which ``target_modules="all-linear"`` leaves alone.
    ``input_embedding`` is the path of the embedding layer that turns input token ids
    into vectors, where prompt tuning prepends its virtual tokens.
    ``unreached`` holds the backend's notes on layers it saw but could not describe (and
    how to make them reachable); a target that matches nothing shows them.
    ``model_config`` holds the model's size settings as named in its framework's config
    (transformers': ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``, ...), integers only; Hugging Face PEFT fills a saved prompt
    config's sizes from them.
    """

    layers: tuple[LayerNode, ...]
    backend: str = ""
    model_type: str = ""
    output_head: Optional[str] = None
    input_embedding: Optional[str] = None
    unreached: tuple[str, ...] = ()
    model_config: Mapping[str, int] = field(default_factory=dict)
    #: The layers by path (filled from ``layers``; not a constructor argument).
    _by_path: dict[str, LayerNode] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "unreached", tuple(self.unreached))
        seen: set[str] = set()
        for node in self.layers:
            if node.path in seen:
                raise PlanError(f"model graph lists layer {node.path!r} twice")
            seen.add(node.path)
        object.__setattr__(self, "_by_path", {n.path: n for n in self.layers})

    def __iter__(self) -> Iterator[LayerNode]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, path: object) -> bool:
        return path in self._by_path

    def get(self, path: str) -> LayerNode:
        """Return the layer at ``path`` or raise :class:`PlanError` naming it."""
        try:
            return self._by_path[path]
        except KeyError:
            raise PlanError(f"the model has no layer {path!r}") from None

    def of_kind(self, *kinds: str) -> list[LayerNode]:
        return [n for n in self.layers if n.kind in kinds]

    def subtree_params(self, path: str) -> dict[str, tuple]:
        """Shapes of every parameter at or under layer ``path``, keyed relative to it."""
        shapes: dict[str, tuple] = {}
        for node in self.layers:
            if node.path == path or node.path.startswith(path + "."):
                rel = node.path[len(path) + 1 :]
                for param, shape in node.params.items():
                    shapes[f"{rel}.{param}" if rel else param] = tuple(shape)
        return shapes

    @property
    def paths(self) -> list[str]:
        return [n.path for n in self.layers]

    @property
    def num_params(self) -> int:
        return sum(n.num_params for n in self.layers)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "backend": self.backend,
            "model_type": self.model_type,
            "output_head": self.output_head,
            "input_embedding": self.input_embedding,
            "layers": [n.to_dict() for n in self.layers],
        }
        if self.unreached:
            data["unreached"] = list(self.unreached)
        if self.model_config:
            data["model_config"] = dict(self.model_config)
        return data

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelGraph:
        return cls(
            layers=tuple(LayerNode.from_dict(n) for n in data["layers"]),
            backend=data.get("backend", ""),
            model_type=data.get("model_type", ""),
            output_head=data.get("output_head"),
            input_embedding=data.get("input_embedding"),
            unreached=tuple(str(note) for note in data.get("unreached", ())),
            model_config=dict(data.get("model_config") or {}),
        )
