"""Mixed-adapter batches: each row of a batch runs through the adapter it names.

``PeftModel(..., adapter_names=[...])`` routes one :class:`RowRouting` to every adapter
layer for the length of the call (:func:`peftcore.model_ops.set_batch_adapters`). The
routing lives in a :class:`contextvars.ContextVar`, never on the layers, so calls in
other threads (or asyncio tasks) each see their own batch and never each other's. Rows
naming ``"__base__"`` (or an adapter the layer does not hold) get the base output. A
LoRA layer takes one of three routes:

* inference with enough tokens per adapter, when each adapter's rows are consecutive or
  the layer's output is no wider than its input: one product per adapter with the
  adapter folded into a temporary weight (:func:`routed_folded_linear`); consecutive
  rows are read and written in place, others gathered and copied back;
* inference otherwise: the base output once, then every row's update in place from the
  adapters' factors stacked and picked per row, two batched products
  (:class:`StackedRowFactors`): x read once, the output updated once;
* under autograd, with dropout, or mixed dtypes: for each adapter, gather its rows,
  compute its update, scatter-add it (:func:`add_row_updates`).

``python benchmarks/bench_mixed.py`` times the alternatives on one layer (BENCHMARKS.md):
on interleaved rows, stacking and grouping cost the same; folding (which must then
gather rows and copy results back) is cheaper where the output is narrow, dearer where
it is wide; on rows sorted by adapter, folding costs almost nothing.
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable, Optional, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.errors import AdapterError, BackendError
from peftcore.model_ops import BASE_ROW
from peftcore_torch.tracing import compiling

RowDelta = Callable[[str, torch.Tensor], torch.Tensor]

#: The routing of the mixed-adapter call running in this thread/task, with the ids of
#: the layers that route its rows; None outside such a call.
_CALL_ROUTING: contextvars.ContextVar[Optional[tuple["RowRouting", set[int]]]] = contextvars.ContextVar(
    "peftcore_torch_row_routing", default=None
)


def refuse_when_compiling() -> None:
    """A mixed-adapter batch is routed per call, outside any graph: refuse one that
    ``torch.compile`` is tracing."""
    if compiling():
        raise AdapterError(
            "a mixed-adapter batch (adapter_names=...) cannot run inside torch.compile: its rows are routed "
            "per call; call the uncompiled model for mixed batches, or one adapter at a time compiled"
        )


def route_layer(layer: nn.Module, routing: Optional["RowRouting"]) -> None:
    """Make ``layer`` route the rows of the current call by ``routing`` (None: end the
    call's routing). Only this thread's (or task's) context changes."""
    if routing is None:
        if _CALL_ROUTING.get() is not None:
            _CALL_ROUTING.set(None)
        return
    current = _CALL_ROUTING.get()
    if current is None or current[0] is not routing:
        current = (routing, set())
        _CALL_ROUTING.set(current)
    current[1].add(id(layer))


def routing_for(layer: nn.Module) -> Optional["RowRouting"]:
    """The routing ``layer`` follows in the current call, or None. Under ``torch.compile``
    always None: a compiled graph cannot follow per-call routing, so the shell refuses a
    mixed batch there (:func:`refuse_when_compiling`) and layers need not look."""
    if compiling():
        return None
    current = _CALL_ROUTING.get()
    if current is None or id(layer) not in current[1]:
        return None
    return current[0]


class RoutesRows:
    """For adapter layers that can route a mixed batch's rows: ``routes_rows()`` says
    whether this layer's forward does (a subclass with its own forward may not), and the
    call's routing is kept in a context variable, never on the layer."""

    def routes_rows(self) -> bool:
        raise NotImplementedError

    def set_batch_adapters(self, routing: Optional[RowRouting]) -> None:
        """Route each row of the next forward passes to its own adapter (None: stop)."""
        if routing is not None:
            refuse_when_compiling()
        if routing is not None and not self.routes_rows():
            raise BackendError(f"{type(self).__name__} cannot run a batch whose rows use different adapters")
        route_layer(cast(nn.Module, self), routing)

    @property
    def batch_routing(self) -> Optional[RowRouting]:
        """The routing of the mixed-adapter call running in this thread, if this layer
        takes part."""
        return routing_for(cast(nn.Module, self))


class RowRouting:
    """Which rows of a batch each adapter runs on, with index tensors cached per device."""

    def __init__(self, adapter_names: Sequence[str]) -> None:
        self.names = list(adapter_names)
        self.rows: dict[str, tuple[int, ...]] = {}
        for name in dict.fromkeys(self.names):
            if name != BASE_ROW:
                self.rows[name] = tuple(row for row, other in enumerate(self.names) if other == name)
        self._indices: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.names)

    def index(self, values: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``values`` (row numbers, slots) as an index tensor on ``device``, made once per
        routing: every layer of the call asks for the same ones."""
        key = (values, device)
        if key not in self._indices:
            self._indices[key] = torch.tensor(values, dtype=torch.long, device=device)
        return self._indices[key]

    def groups_for(self, held: Any, batch_size: int) -> dict[str, tuple[int, ...]]:
        """``{adapter: rows}`` for the adapters in ``held``; checks the batch size."""
        if batch_size != len(self.names):
            raise AdapterError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(self.names)} and {batch_size} respectively (one adapter name per row)."
            )
        held_names = held.keys()  # a keys view: membership without a Python call per name
        if self.rows.keys() <= held_names:
            return self.rows  # every routed adapter held, the usual case (callers only read it)
        return {name: rows for name, rows in self.rows.items() if name in held_names}

    def rows_outside(self, groups: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        """The rows no adapter of ``groups`` runs on (they get the base output)."""
        return tuple(row for row, name in enumerate(self.names) if name not in groups)


def _span(rows: tuple[int, ...]) -> Optional[slice]:
    """``rows`` as a slice when they are consecutive (then no gather is needed)."""
    return slice(rows[0], rows[-1] + 1) if rows and rows[-1] - rows[0] == len(rows) - 1 else None


def add_row_updates(
    result: torch.Tensor,
    x: torch.Tensor,
    routing: RowRouting,
    groups: dict[str, tuple[int, ...]],
    delta: RowDelta,
    in_place: bool,
) -> torch.Tensor:
    """``result`` plus, for each adapter in ``groups``, ``delta(adapter, x[rows])`` on its
    rows; added into ``result`` itself when ``in_place`` (never under autograd)."""
    in_place = in_place and not torch.is_grad_enabled()
    for name, rows in groups.items():
        index = routing.index(rows, x.device)
        update = delta(name, x.index_select(0, index)).to(result.dtype)
        result = result.index_add_(0, index, update) if in_place else result.index_add(0, index, update)
    return result


class StackedRowFactors:
    """The adapters' factors stacked for batched products over a mixed batch (inference
    only): each adapter's A (scaling folded in) and B^T, ranks zero-padded to the
    largest, plus an all-zero slot for rows without an adapter. Built once per call, and
    with ``for_decoding`` kept for every decoding step of a ``generate``
    (:mod:`peftcore_torch.call_cache`): the call's adapters cannot change while it runs
    (the model's lock). Only stacks kept for decoding copy B^T contiguous, the layout a
    one-token product wants; others are a transposed view of B's stack, cheaper to build.

    Two ways to apply them, both reading ``x`` once and updating the output once:

    * by adapter, when every adapter has the same number of rows and a row has one token
      (a decoding step): rows gathered adapter by adapter, two batched products over the
      adapters, the updates added back into their rows; each adapter's factors are read
      once, however many rows use it;
    * by row otherwise: each row's factors picked, two batched products over the rows,
      the update added in place. The rows' copies are kept for the call only where the
      decoding steps take this route too: copies kept through a prompt's every layer
      (100 MB at row 7's shape) grew the heap, which the allocator handed back at the
      call's end and took again, page by page, at the next call (22,000 page faults a
      ``generate``). Where every row has its own adapter, in row order, the stacks are
      the rows' factors already and nothing is copied.
    """

    __slots__ = ("adapter_a", "adapter_b_t", "slots", "order", "group_size", "_rows", "dtype", "device")

    def __init__(
        self, routing: RowRouting, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]], for_decoding: bool
    ) -> None:
        rank = max(a.shape[0] for a, _, _ in factors.values())
        first_a, first_b, _ = next(iter(factors.values()))
        self.dtype, self.device = first_a.dtype, first_a.device
        names = list(factors)
        with torch.no_grad():
            a_parts = [F.pad(a, (0, 0, 0, rank - a.shape[0])) if a.shape[0] < rank else a for a, _, _ in factors.values()]
            b_parts = [F.pad(b, (0, rank - b.shape[1])) if b.shape[1] < rank else b for _, b, _ in factors.values()]
            self.adapter_a = torch.stack([*a_parts, first_a.new_zeros(rank, first_a.shape[1])])
            b_parts.append(first_b.new_zeros(first_b.shape[0], rank))
            # B^T copied contiguous runs a one-token step's product 2-4x faster; for products over
            # several tokens B's own layout is as fast, and stacks 4-6x faster (BENCHMARKS.md)
            self.adapter_b_t = (
                torch.stack([b.t() for b in b_parts]) if for_decoding else torch.stack(b_parts).transpose(1, 2)
            )
            scalings = [scaling for _, _, scaling in factors.values()]
            if any(scaling != 1.0 for scaling in scalings):
                scale = torch.tensor([*scalings, 0.0], dtype=self.dtype, device=self.device)
                self.adapter_a.mul_(scale.view(-1, 1, 1))
        slot = {name: i for i, name in enumerate(names)}
        self.slots = routing.index(tuple(slot.get(name, len(names)) for name in routing.names), self.device)
        sizes = {len(routing.rows[name]) for name in names}
        self.group_size = sizes.pop() if len(sizes) == 1 else 0
        self.order = (
            routing.index(tuple(row for name in names for row in routing.rows[name]), self.device)
            if self.group_size > 1 else None
        )
        # every row its own adapter, in row order: the stacks are already the rows' factors
        self._rows: Optional[tuple[torch.Tensor, torch.Tensor]] = (
            (self.adapter_a[: len(names)], self.adapter_b_t[: len(names)]) if routing.names == names else None
        )

    def fits(self, x: torch.Tensor, result: torch.Tensor) -> bool:
        """Whether these factors serve input ``x`` and its base output ``result``."""
        return (
            x.dtype is self.dtype is result.dtype and x.device == self.device and result.is_contiguous()
            and x.dim() >= 2 and not torch.is_grad_enabled()
        )

    def add_updates(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Add every row's update into ``result`` in place."""
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        rows_out = result.view(result.shape[0], -1, result.shape[-1])
        if self.order is not None and x3.shape[1] == 1:
            adapters = self.adapter_a.shape[0] - 1
            gathered = x3.index_select(0, self.order).view(adapters, self.group_size, x3.shape[-1])
            hidden = torch.bmm(gathered, self.adapter_a[:adapters].transpose(1, 2))
            update = torch.bmm(hidden, self.adapter_b_t[:adapters])
            rows_out.index_add_(0, self.order, update.view(-1, 1, update.shape[-1]))
            return result
        if self._rows is not None:
            rows_a, rows_b_t = self._rows
        else:
            with torch.no_grad():
                rows_a = self.adapter_a.index_select(0, self.slots)
                stacked_b = self.adapter_b_t if self.adapter_b_t.is_contiguous() else self.adapter_b_t.transpose(1, 2)
                rows_b = stacked_b.index_select(0, self.slots)  # picked in the stack's own layout
                rows_b_t = rows_b if stacked_b is self.adapter_b_t else rows_b.transpose(1, 2)
            if self.order is None:  # the decoding steps take this route too: keep the copies for them
                self._rows = rows_a, rows_b_t
        hidden_t = torch.bmm(rows_a, x3.transpose(1, 2))  # (batch, r, tokens): BLAS's faster layout
        rows_out.baddbmm_(hidden_t.transpose(1, 2), rows_b_t)
        return result


def contiguous_groups(routing: RowRouting, groups: dict[str, tuple[int, ...]]) -> bool:
    """Whether each adapter's rows, and the remaining base rows, are consecutive rows."""
    rest = routing.rows_outside(groups)
    return all(_span(rows) is not None for rows in groups.values()) and (not rest or _span(rest) is not None)


def routed_folded_linear(
    x: torch.Tensor,
    base: nn.Module,
    weight_in_out: bool,
    routing: RowRouting,
    groups: dict[str, tuple[int, ...]],
    folded_weight: Callable[[str], torch.Tensor],
) -> torch.Tensor:
    """A linear layer whose rows each use their adapter folded into a temporary weight
    (``folded_weight(adapter)``), the other rows the base weight: one product per group
    of rows. A group of consecutive rows is read and written in place; any other is
    gathered, and its product copied into its rows. For inference only."""
    from peftcore_torch.lora_kernels import base_product

    weight, bias = cast(torch.Tensor, base.weight), cast(Optional[torch.Tensor], base.bias)
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    out_features = int(weight.shape[1] if weight_in_out else weight.shape[0])
    out = x3.new_empty(x3.shape[0], x3.shape[1], out_features)
    parts = [(rows, folded_weight(name)) for name, rows in groups.items()]
    rest = routing.rows_outside(groups)
    if rest:
        parts.append((rest, weight))
    for rows, w in parts:
        span = _span(rows)
        if span is not None:
            target = out[span].view(-1, out_features)
            base_product(x3[span].reshape(-1, x3.shape[-1]), w, bias, weight_in_out, out=target)
            continue
        index = routing.index(rows, x.device)
        product = base_product(x3.index_select(0, index).reshape(-1, x3.shape[-1]), w, bias, weight_in_out)
        out.index_copy_(0, index, product.view(len(rows), x3.shape[1], out_features))
    return out.view(*x.shape[:-1], out_features)
