"""Trainable tokens for torch: chosen rows of an ``nn.Embedding`` (or a tied ``nn.Linear``
head) trained alone (see :mod:`peftcore.methods.trainable_tokens`).

:class:`TrainableTokens` keeps each adapter's rows in ``trainable_tokens_delta`` (HF
PEFT's name) and its indices in ``token_indices``; the forward looks up a copy of the
table with the rows put in (``index_copy``), so the gradient reaches only those rows.
A head tied to the input embedding is a :class:`TiedTokens` that reads the embedding
layer's rows and holds none of its own. Merging is the core's: the delta is the rows
minus the table's, and unmerge restores the saved table bit for bit.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.errors import AdapterError, PlanError
from peftcore.methods.trainable_tokens import TrainTokens
from peftcore_torch.layers import AdapterLayer
from peftcore_torch.walk import replace_module, wrap_layer


class TrainableTokens(AdapterLayer):
    """Rows ``token_indices[name]`` of the wrapped table, trained as ``trainable_tokens_delta[name]``."""

    adapter_tensor_names: ClassVar[tuple] = ("trainable_tokens_delta",)
    other_param_names: ClassVar[tuple] = ("token_indices",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = {}

    def _get_name(self) -> str:
        return "TrainableTokensLayer"

    def features(self) -> tuple[int, int]:
        rows, dim = self.base_weight().shape
        return int(rows), int(dim)

    def new_adapter(self, adapter_name: str, op: TrainTokens) -> dict[str, Any]:
        self.check_table(op)
        weight = self.base_weight()
        index = torch.tensor(op.token_indices, device=weight.device)
        with torch.no_grad():
            if op.init:
                rows = weight.index_select(0, index).clone()
            else:
                rows = torch.randn((len(op.token_indices), weight.shape[1]), dtype=weight.dtype, device=weight.device)
        return {"trainable_tokens_delta": nn.Parameter(rows), "token_indices": list(op.token_indices)}

    def check_table(self, op: TrainTokens) -> None:
        if self.features() != (op.num_embeddings, op.embedding_dim):
            raise PlanError(
                f"layer {op.path!r} has a table of shape {self.features()}, the adapter expects "
                f"{(op.num_embeddings, op.embedding_dim)}"
            )

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's rows minus the table's, zero elsewhere (float32)."""
        weight = self.base_weight()
        index = self._index(adapter_name, weight.device)
        change = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        rows = self.trainable_tokens_delta[adapter_name].detach().float()
        change.index_copy_(0, index, rows - weight.detach().index_select(0, index).float())
        return change

    def merge(self, adapter_names: list[str]) -> None:
        self.check_disjoint([*self.merged_adapters, *adapter_names])
        super().merge(adapter_names)

    def _index(self, adapter_name: str, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.token_indices[adapter_name], device=device)

    def check_disjoint(self, adapter_names: list[str]) -> None:
        """HF PEFT's rule: adapters used together must choose disjoint rows."""
        seen: set[int] = set()
        for name in dict.fromkeys(adapter_names):
            if name not in self.token_indices:
                continue
            rows = set(self.token_indices[name])
            if seen & rows:
                raise AdapterError(
                    f"Token indices of adapter {name} overlap those of another adapter used with it "
                    f"({sorted(seen & rows)}); only disjoint token indices can be used together"
                )
            seen |= rows

    def table(self, running: list[str]) -> torch.Tensor:
        """The base table with the running adapters' rows put in."""
        self.check_disjoint(running)
        table = self.base_weight()
        for name in running:
            rows = self.trainable_tokens_delta[name]
            table = table.index_copy(0, self._index(name, table.device), rows.to(table.dtype))
        return table

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        running = self.adapters_to_run()
        return lookup(self.base_layer, x, self.table(running) if running else None, args, kwargs)


class TiedTokens(AdapterLayer):
    """A layer whose weight is the input embedding's (a tied output head): it runs with
    the embedding layer's rows (``source``) and holds none of its own. The source's merge
    writes the shared table, so this layer merges nothing itself."""

    adapter_tensor_names: ClassVar[tuple] = ("trainable_tokens_delta",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._source: list[TrainableTokens] = []  # a list: not a submodule (it is registered where it sits)

    def _get_name(self) -> str:
        return "TrainableTokensLayer"

    @property
    def source(self) -> TrainableTokens:
        if not self._source:
            raise AdapterError("this tied trainable-tokens layer is not tied to an embedding layer")
        return self._source[0]

    def adapter_store(self, attribute: str) -> Any:
        return self.source.adapter_store(attribute) if self._source else {}

    def tensor_names(self, adapter_name: str) -> list[str]:
        return []  # the rows are the source's: exported, loaded and trained there

    def forget_adapter(self, adapter_name: str) -> None:
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def features(self) -> tuple[int, int]:
        rows, dim = self.base_weight().shape
        return int(rows), int(dim)

    def add(self, adapter_name: str, op: Any) -> None:
        source = self.source
        if not source.has_adapter(adapter_name) or source.token_indices[adapter_name] != list(op.token_indices):
            raise PlanError(f"layer {op.path!r} is tied to {op.tied_to!r}, which has no adapter {adapter_name!r} with these rows")

    def merge(self, adapter_names: list[str]) -> None:
        return None  # the source merges the shared table

    def unmerge(self) -> None:
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        running = [] if self.disabled else self.source.adapters_to_run()
        return lookup(self.base_layer, x, self.source.table(running) if running else None, args, kwargs)


def lookup(base: nn.Module, x: torch.Tensor, table: Optional[torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor:
    """``base``'s forward with ``table`` as its weight (the base forward itself for None)."""
    if table is None:
        return cast(torch.Tensor, base(x, *args, **kwargs))
    if isinstance(base, nn.Embedding):
        result = F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        scale = getattr(base, "embed_scale", None)  # scaled word embeddings (Gemma) multiply in their forward
        if isinstance(scale, torch.Tensor):
            return result * scale.to(result.dtype)
        return result * scale if isinstance(scale, (int, float)) else result
    if isinstance(base, nn.Linear):
        return F.linear(x, table, base.bias)
    raise PlanError(f"trainable tokens wrap an nn.Embedding or nn.Linear, not {type(base).__name__}")


def build_trainable_tokens(model: nn.Module, layers: dict, op: TrainTokens, adapter_name: str) -> None:
    """Wrap the table at ``op.path`` (tied to the layer at ``op.tied_to`` if set) and add the rows."""
    if not op.tied_to:
        wrap_layer(model, layers, op.path, TrainableTokens).add(adapter_name, op)
        return
    source = layers.get(op.tied_to)
    if not isinstance(source, TrainableTokens):
        raise PlanError(f"layer {op.path!r} is tied to {op.tied_to!r}, which has no trainable tokens")
    current = layers.get(op.path)
    if isinstance(current, TiedTokens):
        current.add(adapter_name, op)
        return
    if current is None or isinstance(current, AdapterLayer):
        kind = type(current).__name__ if current is not None else "missing"
        raise PlanError(f"layer {op.path!r} ({kind}) cannot be tied to the trainable tokens of {op.tied_to!r}")
    tied = TiedTokens(current)
    tied._source.append(source)
    replace_module(model, layers, op.path, tied)
    tied.add(adapter_name, op)
