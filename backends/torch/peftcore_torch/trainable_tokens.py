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

from typing import Any, ClassVar, Iterator, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.errors import AdapterError, PlanError
from peftcore.methods.trainable_tokens import TrainTokens
from peftcore_torch.layers import AdapterLayer
from peftcore_torch.walk import replace_module, wrap_layer


class BufferDict(nn.Module):
    """Adapter name -> a frozen tensor, kept as (non-persistent) buffers so it follows
    the module's device and dtype moves."""

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=False)

    def __getitem__(self, key: str) -> torch.Tensor:
        return cast(torch.Tensor, self._buffers[key])

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self) -> list[str]:
        return list(self._buffers)


class TokenRows(nn.Module):
    """HF PEFT's ``token_adapter``: the wrapped table (``base_layer``), the adapters' rows
    and the table's rows they started from, so names read as HF's
    (``emb.token_adapter.trainable_tokens_delta.default``)."""

    def __init__(self, base_layer: nn.Module, shared: Optional[TokenRows] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.trainable_tokens_delta: nn.ParameterDict = shared.trainable_tokens_delta if shared else nn.ParameterDict()
        self.trainable_tokens_original: BufferDict = shared.trainable_tokens_original if shared else BufferDict()

    def _get_name(self) -> str:
        return "TrainableTokensLayer"


class TrainableTokens(AdapterLayer):
    """Rows ``token_indices[name]`` of the wrapped table, trained as
    ``token_adapter.trainable_tokens_delta[name]``. As in HF PEFT, one adapter at a time
    is active here: the active list holds only adapters this layer has."""

    adapter_tensor_names: ClassVar[tuple] = ("trainable_tokens_delta",)
    other_param_names: ClassVar[tuple] = ("token_indices", "trainable_tokens_original")
    #: the model-level switch lists only the adapters this layer holds (HF's wrapper)
    single_active: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        nn.Module.__init__(self)  # the table sits under token_adapter, not on this module
        self.token_adapter = TokenRows(base_layer)
        self.token_indices: dict[str, list[int]] = {}
        self.init_adapter_state()

    @property
    def base_layer(self) -> nn.Module:  # type: ignore[override]
        return self.token_adapter.base_layer

    def _get_name(self) -> str:
        return "TrainableTokensWrapper"

    @property
    def trainable_tokens_delta(self) -> nn.ParameterDict:
        """Each adapter's rows (kept in ``token_adapter``, named here as on HF's layer)."""
        return self.token_adapter.trainable_tokens_delta

    @property
    def trainable_tokens_original(self) -> BufferDict:
        """Each adapter's rows of the table as they were when it was added (HF's buffer)."""
        return self.token_adapter.trainable_tokens_original

    def adapter_store(self, attribute: str) -> Any:
        if attribute == "trainable_tokens_delta":
            return self.token_adapter.trainable_tokens_delta
        return getattr(self, attribute)

    def set_adapter(self, adapter_names: Any) -> None:
        """Activate the named adapters this layer holds: the layer-level call, which may
        name several with disjoint rows (the model-level one allows one, as HF PEFT)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        layer: Any = self
        for name in self.adapter_names():
            layer.set_trainable(name, name in names)
        self.active_adapters = [name for name in names if self.has_adapter(name)]

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
        original = weight.detach().index_select(0, index).clone()
        return {
            "trainable_tokens_delta": nn.Parameter(rows),
            "token_indices": list(op.token_indices),
            "trainable_tokens_original": original,
        }

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
        rows = self.token_adapter.trainable_tokens_delta[adapter_name].detach().float()
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
            rows = self.token_adapter.trainable_tokens_delta[name]
            table = table.index_copy(0, self._index(name, table.device), rows.to(table.dtype))
        return table

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        running = self.adapters_to_run()
        return lookup(self.base_layer, x, self.table(running) if running else None, args, kwargs)


class TiedTokens(TrainableTokens):
    """A layer whose weight is the input embedding's (a tied output head). As in HF PEFT
    its ``token_adapter`` shares the embedding layer's (``source``) rows and indices, so
    it holds none of its own: they are exported, loaded and trained there. The source's
    merge writes the shared table, so this layer merges nothing itself."""

    other_param_names: ClassVar[tuple] = ()  # the indices are the source's dict

    def __init__(self, base_layer: nn.Module, source: TrainableTokens) -> None:
        nn.Module.__init__(self)
        self.token_adapter = TokenRows(base_layer, shared=source.token_adapter)
        self._source = [source]  # a list: not registered as a submodule here
        self.token_indices = source.token_indices
        self.saved_adapters: set[str] = set()
        self.init_adapter_state()

    @property
    def source(self) -> TrainableTokens:
        return self._source[0]

    def tensor_names(self, adapter_name: str) -> list[str]:
        """The shared rows, for an adapter whose file stores them under this layer too
        (HF's ``TrainableTokensConfig``); none otherwise."""
        return list(self.adapter_tensor_names) if adapter_name in self.saved_adapters else []

    def forget_adapter(self, adapter_name: str) -> None:
        self.saved_adapters.discard(adapter_name)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def add(self, adapter_name: str, op: Any) -> None:
        if self.source.token_indices.get(adapter_name) != list(op.token_indices):
            raise PlanError(f"layer {op.path!r} is tied to {op.tied_to!r}, which has no adapter {adapter_name!r} with these rows")
        if op.tied_saved:
            self.saved_adapters.add(adapter_name)

    def merge(self, adapter_names: list[str]) -> None:
        return None

    def unmerge(self) -> None:
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        running = [a for a in self.adapters_to_run() if a not in self.source.merged_adapters]
        return lookup(self.base_layer, x, self.table(running) if running else None, args, kwargs)


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
    tied = TiedTokens(current, source)
    replace_module(model, layers, op.path, tied)
    tied.add(adapter_name, op)
