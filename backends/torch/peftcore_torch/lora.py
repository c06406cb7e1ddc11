"""LoRA layers for torch: ``nn.Linear``, transformers' ``Conv1D`` and ``nn.Embedding``.

A is ``(r, in_features)`` and B ``(out_features, r)`` for every base type (canonical
layout); only the merge transposes for ``Conv1D``, whose weight is ``(in, out)``, and
for ``nn.Embedding``, whose table is ``(num_embeddings, dim)``.

Forward, fastest first: one active adapter on a plain frozen ``nn.Linear``/``Conv1D``
runs as a single fused autograd node, or folded into a temporary weight for long
inference batches (:mod:`peftcore_torch.lora_kernels`). That case is recognised first,
from the layer's own dicts, because decoding calls each layer once per token and the
checks cost as much as the adapter's arithmetic there; anything else (several active
adapters, hooks on the base layer, mixed dtypes, autocast) calls the base layer and
adds each update. Dropout with ``p = 0`` is skipped, not called. A mixed-adapter batch
routes each row to its own adapter (:mod:`peftcore_torch.row_routing`).

Merging is unchanged: :class:`~peftcore_torch.layers.AdapterLayer` keeps the original
weight while merged and restores it, so merge/unmerge cycles leave it bit-identical.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Iterator, MutableMapping, Optional, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peftcore.errors import AdapterError
from peftcore.methods.lora import MAGNITUDE, AddLora
from peftcore.methods.lora_init import BaseWeightInit, MagnitudeInit
from peftcore_torch.call_cache import call_entries
from peftcore_torch.dora import DoraParts, MagnitudeDict
from peftcore_torch.dora_kernels import fused_dora_linear
from peftcore_torch.layers import AdapterLayer
from peftcore_torch.lora_kernels import (
    PreparedLoraLinear,
    can_fuse,
    folding_pays,
    fused_lora_linear,
    has_hooks,
    merged_weight,
)
from peftcore_torch.row_routing import (
    RoutesRows,
    StackedRowFactors,
    add_row_updates,
    contiguous_groups,
    routed_folded_linear,
)
from peftcore_torch.walk import is_conv1d


def _runs_as_identity(dropout: nn.Module) -> bool:
    if isinstance(dropout, nn.Identity):
        return True
    return isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training)


class LoraFactor(nn.Linear):
    """One LoRA factor as Hugging Face PEFT holds it: a bias-free ``nn.Linear`` whose
    ``weight`` is the factor, so ``layer.lora_A["default"].weight`` is the A matrix."""

    def __init__(self, weight: nn.Parameter) -> None:
        # nn.Linear's own __init__ would allocate and initialise a weight only to drop it
        # (a third of the time of injecting LoRA into a large model); set its state directly
        nn.Module.__init__(self)
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self.weight = weight
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class FactorWeights(MutableMapping):
    """The adapter-name -> factor weight view of a :class:`FactorDict`: the dict-like
    store the generic adapter code reads and writes tensors through."""

    def __init__(self, factors: FactorDict) -> None:
        self.factors = factors

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.factors.weight(key)

    def __setitem__(self, key: str, value: nn.Parameter) -> None:
        if key in self.factors:
            cast(LoraFactor, self.factors[key]).weight = value
        else:
            self.factors[key] = value

    def __delitem__(self, key: str) -> None:
        del self.factors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.factors.keys())

    def __len__(self) -> int:
        return len(self.factors)


class FactorDict(nn.ModuleDict):
    """Adapter name to LoRA factor module (:class:`LoraFactor`), as HF PEFT's ``lora_A``
    and ``lora_B``: state-dict keys are ``lora_A.<adapter>.weight``. Assigning a
    parameter wraps it in a factor module; :meth:`weight` gives the weight itself."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, LoraFactor(value) if isinstance(value, nn.Parameter) else value)

    def weight(self, key: str) -> torch.Tensor:
        """The factor weight of adapter ``key``."""
        factor = self._modules[key]
        # the parameter itself, not Module.__getattr__'s walk (read per adapter per layer in mixed batches)
        weight = factor._parameters.get("weight") if factor is not None else None
        return weight if weight is not None else cast(LoraFactor, factor).weight

    @property
    def weights(self) -> FactorWeights:
        return FactorWeights(self)


class LoraLayer(MagnitudeInit, BaseWeightInit, RoutesRows, DoraParts, AdapterLayer):
    """What every LoRA layer shares (HF PEFT's ``LoraLayer``): per-adapter factors
    ``lora_A``/``lora_B``, dropout, ``scaling`` and rank ``r``; a DoRA adapter's
    magnitude in ``lora_magnitude_vector`` (:mod:`peftcore_torch.dora`)."""

    adapter_tensor_names: ClassVar[tuple] = ("lora_A", "lora_B", MAGNITUDE)
    #: HF PEFT's names of the other per-adapter attributes
    other_param_names: ClassVar[tuple] = ("r", "scaling", "lora_dropout", "use_dora")
    lora_A: Any
    lora_B: Any

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.init_factor_stores()
        self.init_dora_stores()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}

    def adapter_store(self, attribute: str) -> Any:
        store = getattr(self, attribute)
        return store.weights if isinstance(store, (FactorDict, MagnitudeDict)) else store

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """HF PEFT's name for :meth:`delta_weight`: the adapter's change to the base
        weight, in that weight's own layout."""
        return self.delta_weight(adapter_name)

    def init_factor_stores(self) -> None:
        self.lora_A = FactorDict()
        self.lora_B = FactorDict()

    def new_adapter(self, adapter_name: str, op: AddLora) -> dict[str, Any]:
        a = self.new_tensor(op.r, op.in_features)
        b = self.new_tensor(op.out_features, op.r)
        _initialise(a, b, op)
        a_name, b_name = self.adapter_tensor_names[:2]
        values: dict[str, Any] = {
            a_name: a,
            b_name: b,
            "lora_dropout": nn.Dropout(op.dropout) if op.dropout > 0 else nn.Identity(),
            "scaling": op.scaling,
            "r": op.r,
            # switched on by MagnitudeInit.add once the magnitude has its value: until then the adapter is
            # plain LoRA, whose change a PiSSA/OLoRA init takes out of the base weight
            "use_dora": False,
        }
        if op.use_dora:  # its value needs the final factors and base weight: see MagnitudeInit
            magnitude = self.new_tensor(op.out_features)
            nn.init.zeros_(magnitude)
            values[MAGNITUDE] = magnitude
        return values

    def canonical_delta(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B @ A`` as ``(out, in)``, computed in float32 for low-precision
        weights; a DoRA adapter's whole change to the weight (:mod:`peftcore_torch.dora`)."""
        if self.use_dora.get(adapter_name, False):
            return self.dora_canonical_delta(adapter_name)
        a, b = (self.adapter_store(name)[adapter_name] for name in self.adapter_tensor_names[:2])
        compute = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        return (b.to(compute) @ a.to(compute)) * self.scaling[adapter_name]

    # -- mixed-adapter batches --------------------------------------------------------
    def routes_rows(self) -> bool:
        """Whether this layer's forward routes rows to their adapters (a subclass with
        its own forward does not, unless it says so)."""
        return type(self).forward in (LoraLinear.forward, LoraEmbedding.forward)

    def _row_groups(self, x: torch.Tensor) -> Optional[dict[str, tuple[int, ...]]]:
        """``{adapter: rows}`` for a mixed-adapter batch, None when not routing rows.
        A disabled layer routes no row to any adapter."""
        if self.batch_routing is None:
            return None
        if self.merged_adapters:
            raise AdapterError(f"adapters {self.merged_adapters} are merged; unmerge them before a mixed-adapter batch")
        batch_size = int(x.shape[0]) if x.dim() > 0 else 1
        return {} if self.disabled else self.batch_routing.groups_for(self.lora_A, batch_size)

    @staticmethod
    def _uniform(groups: dict[str, tuple[int, ...]], x: torch.Tensor) -> Optional[list[str]]:
        """The one adapter every row runs, as a list, or None when rows differ."""
        if len(groups) == 1 and len(next(iter(groups.values()))) == x.shape[0]:
            return list(groups)
        return None

    def _scaled(self, hidden: torch.Tensor, adapter_name: str) -> torch.Tensor:
        scaling = self.scaling[adapter_name]
        return hidden * scaling if scaling != 1.0 else hidden


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear`` or transformers' ``Conv1D``."""

    def _get_name(self) -> str:
        return "lora.Linear"  # how HF PEFT prints it, so printed models read the same

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self._plain_base = self.fan_in_fan_out or type(base_layer) is nn.Linear

    def features(self) -> tuple[int, int]:
        weight = self.base_weight()
        if self.fan_in_fan_out:
            return int(weight.shape[0]), int(weight.shape[1])
        return int(weight.shape[1]), int(weight.shape[0])

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.canonical_delta(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def canonical_weight_of(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def canonical_base_weight(self) -> np.ndarray:
        weight = self.primitives.to_numpy(self.base_weight())
        return weight.T if self.fan_in_fan_out else weight

    def init_normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """torch's RNG, so ``torch.manual_seed`` fixes the orthogonal init."""
        return torch.randn(shape, dtype=torch.float64).numpy()

    def update(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's change to the output for input ``x``: ``s * dropout(x) A^T B^T``."""
        dropout = self.lora_dropout[adapter_name]
        return self.lora_product(adapter_name, x if _runs_as_identity(dropout) else dropout(x))

    def lora_product(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``s * x A^T B^T`` (no dropout)."""
        a = self.lora_A.weight(adapter_name)
        x = x.to(a.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        # (r, tokens) intermediate: the operand layouts BLAS runs fastest (see lora_kernels)
        hidden_t = self._scaled(a @ x2.t(), adapter_name)
        update = hidden_t.t() @ self.lora_B.weight(adapter_name).t()
        return update.view(*x.shape[:-1], update.shape[-1])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and not kwargs:
            entries = call_entries()
            if entries is not None:  # a decoding step of generate: what the first step prepared
                prepared = entries.get(self)
                if prepared is None:  # False: this call takes another route
                    prepared = entries[self] = self._prepare_inference(x) or False
                if isinstance(prepared, PreparedLoraLinear) and prepared.fits(x):
                    return prepared(x)
        single = self._single_active_factor(args, kwargs)
        if single is not None:  # the common case, decided from plain attributes before anything else
            fused = self._fused_forward(x, *single)
            if fused is not None:
                return fused
        groups = self._row_groups(x)
        running = self.adapters_to_run() if groups is None else self._uniform(groups, x)
        if running is None:  # rows use different adapters
            return self._forward_mixed(x, groups, *args, **kwargs)  # type: ignore[arg-type]
        if len(running) == 1 and not args and not kwargs and single is None:
            fused = self._fused_forward(x, running[0], cast(LoraFactor, self.lora_A[running[0]]))
            if fused is not None:
                return fused
        base_out = result = self.base_layer(x, *args, **kwargs)
        for name in running:
            if self.use_dora.get(name, False):
                result = result + self._dora_change(name, x, base_out)
            else:
                result = result + self.update(name, x).to(result.dtype)
        return result

    def _dora_change(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """A DoRA adapter's change to the output: ``(scale - 1) W x' + scale * s x' A^T B^T``
        with ``x'`` the input after dropout; ``W x`` is the base output less its bias when
        nothing is merged and no dropout runs (no second base product)."""
        dropout = self.lora_dropout[name]
        identity = _runs_as_identity(dropout)
        dropped = x if identity else dropout(x)
        lora = self.lora_product(name, dropped)
        scale = self.dora_scale(name).to(lora.dtype)
        if identity and not self.merged_adapters:
            bias = getattr(self.base_layer, "bias", None)
            weighted = base_out - bias if isinstance(bias, torch.Tensor) else base_out
        else:
            weighted = F.linear(dropped.to(lora.dtype), self.dora_base_weight().to(lora.dtype))
        return ((scale - 1) * weighted.to(lora.dtype) + scale * lora).to(base_out.dtype)

    def _forward_mixed(
        self, x: torch.Tensor, groups: dict[str, tuple[int, ...]], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        routing = self.batch_routing
        assert routing is not None
        if self._can_fold_rows(x, groups, args, kwargs):
            base, in_out, weight = self.base_layer, self.fan_in_fan_out, self.base_weight()

            def folded(name: str) -> torch.Tensor:
                return merged_weight(weight, self.lora_A.weight(name), self.lora_B.weight(name), self.scaling[name], in_out)

            return routed_folded_linear(x, base, in_out, routing, groups, folded)
        result = self.base_layer(x, *args, **kwargs)
        # the output of a plain unhooked base layer is a fresh tensor nobody else holds
        in_place = self._plain_base and not has_hooks(self.base_layer)
        stacked = self._stacked_row_factors(x, result, groups) if in_place else None
        if stacked is not None:
            return stacked.add_updates(result, x)
        return add_row_updates(result, x, routing, groups, self.update, in_place)

    def _stacked_row_factors(
        self, x: torch.Tensor, result: torch.Tensor, groups: dict[str, tuple[int, ...]]
    ) -> Optional[StackedRowFactors]:
        """The rows' factors stacked for this call, or None where stacking cannot serve;
        kept for the later decoding steps of a ``generate`` call."""
        entries = call_entries()
        key = (self, "rows")
        cached = entries.get(key) if entries is not None else None
        if cached is not None and cached.fits(x, result):
            return cast(StackedRowFactors, cached)
        factors = self._stackable_factors(x, result, groups)
        if factors is None:
            return None
        routing = self.batch_routing
        assert routing is not None
        stacked = StackedRowFactors(routing, factors, for_decoding=entries is not None)
        if entries is not None:
            entries[key] = stacked
        return stacked

    def _stackable_factors(
        self, x: torch.Tensor, result: torch.Tensor, groups: dict[str, tuple[int, ...]]
    ) -> Optional[dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
        """``{adapter: (A, B, scaling)}`` for the adapters of ``groups`` where they can be
        stacked: inference, no dropout, every factor in the input's dtype and device.
        One pass with local lookups: at 64 adapters a layer, an attribute lookup per
        factor per check cost as much as stacking the factors (BENCHMARKS.md)."""
        if torch.is_grad_enabled() or not groups or x.dim() < 2 or not result.is_contiguous():
            return None
        dtype, device = x.dtype, x.device
        if result.dtype != dtype or result.device != device:
            return None
        weight_a, weight_b, dropouts, scaling = self.lora_A.weight, self.lora_B.weight, self.lora_dropout, self.scaling
        factors = {}
        for name in groups:
            a, b = weight_a(name), weight_b(name)
            if a.dtype != dtype or b.dtype != dtype or a.device != device or not _runs_as_identity(dropouts[name]):
                return None
            factors[name] = (a, b, scaling[name])
        return factors

    def _can_fold_rows(self, x: torch.Tensor, groups: dict[str, tuple[int, ...]], args: tuple, kwargs: dict) -> bool:
        """Inference with plain factors and enough tokens per adapter to pay for folding,
        where folding wins: each adapter's rows consecutive, or (rows interleaved, so
        gathered and copied back) an output no wider than the input."""
        routing = self.batch_routing
        if args or kwargs or torch.is_grad_enabled() or not groups or routing is None:
            return False
        if x.dim() < 2 or x.numel() == 0:
            return False
        weight = self.base_weight()
        if not folding_pays(x.numel() // int(x.shape[-1]), weight):  # not even all the tokens (a decoding step)
            return False
        tokens_per_row = x.numel() // (int(x.shape[0]) * int(x.shape[-1]))
        smallest_group = min(len(rows) for rows in groups.values())
        if not folding_pays(smallest_group * tokens_per_row, weight):
            return False
        in_features, out_features = self.features()
        if out_features > in_features and not contiguous_groups(routing, groups):
            return False
        base = self.base_layer
        return all(
            _runs_as_identity(self.lora_dropout[name])
            and can_fuse(base, self._plain_base, x, self.lora_A.weight(name), self.lora_B.weight(name))
            for name in groups
        )

    def _prepare_inference(self, x: torch.Tensor) -> Optional[PreparedLoraLinear]:
        """The operands of the plain one-adapter inference product for inputs like ``x``
        (no autograd), or None when this call takes another route (several adapters,
        DoRA, dropout, a hooked or non-plain base...)."""
        single = self._single_active_factor((), {})
        if single is None or torch.is_grad_enabled():
            return None
        name, factor_a = single
        operands = self._fusable_operands(x, name, factor_a)
        if operands is None or self.use_dora.get(name, False) or not _runs_as_identity(operands[3]):
            return None
        a, b, base, _ = operands
        bias = cast(Optional[torch.Tensor], base.bias)
        return PreparedLoraLinear(cast(torch.Tensor, base.weight), bias, a, b, self.scaling[name], self.fan_in_fan_out)

    def _single_active_factor(self, args: tuple, kwargs: dict) -> Optional[tuple[str, LoraFactor]]:
        """``(name, A factor)`` when exactly one adapter runs on every row: one active,
        present adapter, nothing merged or disabled, no mixed batch, no extra arguments.
        Reads the module's own dicts directly: decoding calls this once per layer per token."""
        active = self.active_adapters
        if len(active) != 1 or self.disabled or self.merged_adapters or args or kwargs:
            return None
        factor = cast(nn.Module, self._modules["lora_A"])._modules.get(active[0])
        if factor is None or self.batch_routing is not None:
            return None
        return active[0], cast(LoraFactor, factor)

    def _fusable_operands(
        self, x: torch.Tensor, name: str, factor_a: LoraFactor
    ) -> Optional[tuple[torch.Tensor, torch.Tensor, nn.Module, nn.Module]]:
        """``(A, B, base layer, dropout)`` of adapter ``name`` when :func:`can_fuse` allows
        the one-node product for ``x``, else None. Reads the module's own dicts directly:
        decoding calls this once per layer per token."""
        modules = cast(dict[str, nn.Module], self._modules)
        a = factor_a.weight
        b = cast(LoraFactor, modules["lora_B"]._modules[name]).weight
        base = modules["base_layer"]
        if not can_fuse(base, self._plain_base, x, a, b):
            return None
        return a, b, base, cast(nn.Module, modules["lora_dropout"]._modules[name])

    def _fused_forward(self, x: torch.Tensor, name: str, factor_a: LoraFactor) -> Optional[torch.Tensor]:
        operands = self._fusable_operands(x, name, factor_a)
        if operands is None:
            return None
        a, b, base, dropout = operands
        identity = _runs_as_identity(dropout)
        weight, bias = cast(torch.Tensor, base.weight), cast(Optional[torch.Tensor], base.bias)
        if self.use_dora.get(name, False):
            if not identity or self.merged_adapters:
                return None  # W x' (dropout) or the unmerged W x is needed apart: the general path
            # y = bias + scale * (x W^T + s x A^T B^T): one node under autograd (dora_kernels)
            magnitude = self.lora_magnitude_vector.weights[name]
            trains = any(t is not None and t.requires_grad for t in (x, bias, a, b, magnitude))
            if torch.is_grad_enabled() and trains and magnitude.dtype == x.dtype:
                inv_norm = self.dora_inv_norm(name).to(x.dtype)
                return fused_dora_linear(x, weight, bias, a, b, magnitude, inv_norm, self.scaling[name], self.fan_in_fan_out)
            scale = self.dora_scale(name).to(x.dtype)
            combined = fused_lora_linear(x, None, weight, None, a, b, self.scaling[name], self.fan_in_fan_out)
            if not combined.requires_grad:
                combined = combined.mul_(scale)
                return combined.add_(bias) if bias is not None else combined
            return torch.addcmul(bias, combined, scale) if bias is not None else combined * scale
        lora_input = None if identity else dropout(x)
        return fused_lora_linear(x, lora_input, weight, bias, a, b, self.scaling[name], self.fan_in_fan_out)


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: A is looked up like a table, then projected by B.

    The factors are kept as HF PEFT keeps them for embeddings, in parameter dicts named
    ``lora_embedding_A``/``lora_embedding_B``; their canonical names stay ``lora_A``/``lora_B``.
    """

    adapter_tensor_names = ("lora_embedding_A", "lora_embedding_B", MAGNITUDE)
    canonical_names = {"lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"}
    base_layer: nn.Embedding

    def _get_name(self) -> str:
        return "lora.Embedding"

    def init_factor_stores(self) -> None:
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    @property
    def lora_A(self) -> nn.ParameterDict:
        return self.lora_embedding_A

    @property
    def lora_B(self) -> nn.ParameterDict:
        return self.lora_embedding_B

    def features(self) -> tuple[int, int]:
        return int(self.base_layer.num_embeddings), int(self.base_layer.embedding_dim)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.canonical_delta(adapter_name).T

    def canonical_weight_of(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    def update(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's change to the output for token ids ``x``."""
        looked_up = self._lookup(x, self.lora_embedding_A[adapter_name].T)
        return F.linear(self._scaled(looked_up, adapter_name), self.lora_embedding_B[adapter_name])

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Rows of ``table`` for token ids ``x``, with the base embedding's options."""
        base = self.base_layer
        return F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base_out = result = self.base_layer(x, *args, **kwargs)
        groups = self._row_groups(x)
        running = self.adapters_to_run() if groups is None else self._uniform(groups, x)
        if running is None:  # rows use different adapters; a lookup is cheap, so always out of place
            return add_row_updates(result, x, self.batch_routing, groups, self.update, False)  # type: ignore[arg-type]
        for name in running:
            update = self.update(name, x)
            if self.use_dora.get(name, False):  # (scale - 1) W x + scale * update, W x the base lookup
                scale = self.dora_scale(name).to(update.dtype)
                weighted = self._lookup(x, self.dora_base_weight().T) if self.merged_adapters else base_out
                update = (scale - 1) * weighted.to(update.dtype) + scale * update
            result = result + update.to(result.dtype)
        return result


def _initialise(a: torch.Tensor, b: torch.Tensor, op: AddLora) -> None:
    if op.layer_kind == "embedding" and op.init != "random":  # A zero, B unit normal (see AddLora)
        with torch.no_grad():
            nn.init.zeros_(a)
            nn.init.normal_(b)
        return
    init_linear_factors(a, b, op.init, op.r)


def init_linear_factors(a: torch.Tensor, b: torch.Tensor, init: str, r: int) -> None:
    """HF PEFT's initial factors of a linear LoRA: A Kaiming-uniform (``"gaussian"``:
    normal with std 1/r), B zero (``"random"``: Kaiming-uniform too)."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init == "random":
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)
