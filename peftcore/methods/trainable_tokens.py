"""Trainable tokens: train only chosen rows of an embedding table (HF PEFT's layout).

LoraConfig's ``trainable_token_indices`` (and HF PEFT's own ``TrainableTokensConfig``
method) keeps a trainable copy of the chosen rows, ``trainable_tokens_delta`` of shape
``(len(token_indices), dim)``; the forward looks tokens up in the table with those rows
replaced. Despite its name the tensor holds the rows' new *values*, not a difference,
as in HF PEFT. New special tokens are the common use: resize the embeddings, then train
the new rows alone.

Where the output head shares the input embedding's weight (tied embeddings), the head
is adapted too and reads the embedding's rows (:attr:`TrainTokens.tied_to`), as HF PEFT
ties them: one tensor, saved once under the embedding.

Merging writes the rows into the table: :meth:`TrainTokens.delta` is the trained rows
minus the table's, so it needs the base table. Adapters merged together must choose
disjoint rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import numpy as np

from peftcore.errors import ConfigError, PlanError
from peftcore.graph import LayerNode, ModelGraph
from peftcore.plan import PlanOp, TensorSpec, register_op

#: The key prefix of the rows in HF PEFT's LoRA files (its ``TrainableTokensWrapper``
#: keeps the layer as ``token_adapter``); its ``TrainableTokensConfig`` files have none.
LORA_KEY_PREFIX = "token_adapter."


@register_op
@dataclasses.dataclass(frozen=True)
class TrainTokens(PlanOp):
    """Train rows ``token_indices`` of the table of the layer at ``path``: an embedding
    (``num_embeddings`` rows of ``embedding_dim``) or a linear output head whose weight
    is ``(vocabulary, dim)``. ``init`` True starts the rows at the table's values (a
    no-op until trained), False at random. With ``tied_to`` the op reads the rows of the
    op on that path (a head tied to the input embedding) and owns no tensor; HF PEFT's
    ``TrainableTokensConfig`` files still store the shared rows under the head's key too
    (``tied_saved``)."""

    op: ClassVar[str] = "trainable_tokens"
    layer_kind: str = "embedding"
    token_indices: tuple = ()
    num_embeddings: int = 0
    embedding_dim: int = 0
    init: bool = True
    tied_to: str = ""
    tied_saved: bool = False
    hf_prefix: str = LORA_KEY_PREFIX

    def __post_init__(self) -> None:
        super().__post_init__()
        where = f"trainable_tokens op on {self.path!r}"
        if self.layer_kind not in ("embedding", "linear"):
            raise PlanError(f"{where}: layer_kind must be 'embedding' or 'linear', got {self.layer_kind!r}")
        indices = tuple(self.token_indices)
        if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise PlanError(f"{where}: token_indices must be a non-empty list of integers, got {self.token_indices!r}")
        object.__setattr__(self, "token_indices", indices)
        if min(self.num_embeddings, self.embedding_dim) <= 0:
            raise PlanError(f"{where}: num_embeddings and embedding_dim must be positive")
        outside = [i for i in indices if not 0 <= i < self.num_embeddings]
        if outside:
            raise PlanError(f"{where}: token indices {outside} are outside the table's {self.num_embeddings} rows")
        if len(set(indices)) != len(indices):
            raise PlanError(f"{where}: token indices repeat: {list(indices)}")

    @property
    def merge_target(self) -> Optional[str]:  # type: ignore[override]
        """The table; a tied op merges nothing (its table is the one it is tied to)."""
        return None if self.tied_to else "weight"

    def tensor_specs(self) -> dict[str, TensorSpec]:
        if self.tied_to and not self.tied_saved:
            return {}
        shape = (len(self.token_indices), self.embedding_dim)
        return {"trainable_tokens_delta": TensorSpec(shape, f"{self.hf_prefix}trainable_tokens_delta")}

    def delta(self, tensors: Mapping[str, Any], base: Any = None) -> Any:
        """The trained rows minus the table's (zero elsewhere); None without ``base``."""
        if base is None or self.tied_to:
            return None
        rows = np.asarray(tensors["trainable_tokens_delta"])
        change = np.zeros(np.shape(base), dtype=rows.dtype)
        index = list(self.token_indices)
        change[index] = rows - np.asarray(base, dtype=rows.dtype)[index]
        return change

    def misfit(self, graph: ModelGraph) -> Optional[str]:
        if self.path not in graph:
            return f"the model has no layer {self.path!r}"
        node = graph.get(self.path)
        if node.kind != self.layer_kind:
            return f"layer {self.path!r} is a {node.kind}, the adapter expects a {self.layer_kind}"
        shape = node.params.get("weight")
        if shape != (self.num_embeddings, self.embedding_dim):
            return f"layer {self.path!r} has a table of shape {shape}, the adapter was trained for {(self.num_embeddings, self.embedding_dim)}"
        if self.tied_to and node.shares_weight_with != self.tied_to:
            return f"layer {self.path!r} does not share its weight with {self.tied_to!r}, the adapter expects it to"
        return None


def _table_op(node: LayerNode, indices: Sequence[int], init: bool, tied_to: str, hf_prefix: str, owner: str) -> TrainTokens:
    """The op of one table (:func:`trainable_token_ops`); LoRA's files keep a tied head's rows once."""
    shape = node.params.get("weight")
    if node.kind not in ("embedding", "linear") or shape is None or len(shape) != 2:
        raise ConfigError(
            f"{owner}: trainable tokens need an embedding (or a linear output head); {node.path!r} is a {node.kind}"
        )
    try:
        return TrainTokens(
            path=node.path, layer_kind=node.kind, token_indices=tuple(indices), num_embeddings=int(shape[0]),
            embedding_dim=int(shape[1]), init=init, tied_to=tied_to, tied_saved=bool(tied_to) and hf_prefix != LORA_KEY_PREFIX,
            hf_prefix=hf_prefix,
        )
    except PlanError as error:
        raise ConfigError(f"{owner}: {error}") from None


def check_token_indices(owner: str, field: str, value: Any) -> None:
    """A :class:`ConfigError` unless ``value`` is a list of token ids (non-negative ints)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{owner}.{field} must be a non-empty list of token indices, got {value!r}")
    bad = [i for i in value if not isinstance(i, int) or isinstance(i, bool) or i < 0]
    if bad:
        raise ConfigError(f"{owner}.{field} must hold non-negative integer token indices, got {bad}")


def validate_trainable_token_indices(owner: str, value: Any) -> None:
    """Check LoraConfig's ``trainable_token_indices``: a list of indices (for the input
    embedding) or a dict of module name -> list of indices."""
    if value is None:
        return
    if isinstance(value, dict):
        if not value:
            raise ConfigError(f"{owner}.trainable_token_indices is an empty dict; name a module and its token indices")
        for name, indices in value.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{owner}.trainable_token_indices keys must be module names, got {name!r}")
            check_token_indices(owner, f"trainable_token_indices[{name!r}]", indices)
        return
    check_token_indices(owner, "trainable_token_indices", value)


def _matching(graph: ModelGraph, name: str) -> list[LayerNode]:
    return [node for node in graph if node.path == name or node.path.endswith("." + name)]


def trainable_token_ops(
    graph: ModelGraph,
    indices: Union[Sequence[int], Mapping[str, Sequence[int]]],
    owner: str,
    *,
    init: bool = True,
    hf_prefix: str = LORA_KEY_PREFIX,
    modules_to_save: Optional[Sequence[str]] = None,
) -> list[TrainTokens]:
    """The ops of ``indices``: a list is for the input embedding, a dict names modules
    (exact path or dotted suffix). A layer that shares the input embedding's weight gets
    a tied op when the embedding is adapted (unless the dict gives it other indices)."""
    if isinstance(indices, Mapping):
        targets = dict(indices)
    else:
        if graph.input_embedding is None:
            raise ConfigError(
                f"{owner}: the model reports no input embedding for trainable_token_indices; give a dict of "
                "module name -> token indices instead"
            )
        targets = {graph.input_embedding: list(indices)}
    for name in targets:
        if modules_to_save and name in modules_to_save:
            raise ConfigError(
                f"{owner}: the embedding layer {name!r} is already trained fully (modules_to_save); name it in "
                "modules_to_save or in trainable_token_indices, not both"
            )
    chosen: dict[str, tuple[LayerNode, list[int]]] = {}
    for name, rows in targets.items():
        found = _matching(graph, name)
        if not found:
            raise ConfigError(f"{owner}.trainable_token_indices names {name!r}, which matches no layer of the model")
        for node in found:
            chosen[node.path] = (node, list(rows))
    embedding = graph.input_embedding
    ops: list[TrainTokens] = []
    for node, rows in chosen.values():
        source = node.shares_weight_with
        tied = bool(source) and source == embedding and source in chosen and chosen[source][1] == rows
        if not tied:
            ops.append(_table_op(node, rows, init, "", hf_prefix, owner))
    if embedding in chosen:
        rows = chosen[embedding][1]
        for node in graph:
            if node.shares_weight_with == embedding and (node.path not in chosen or chosen[node.path][1] == rows):
                ops.append(_table_op(node, rows, init, embedding, hf_prefix, owner))
    return ops
