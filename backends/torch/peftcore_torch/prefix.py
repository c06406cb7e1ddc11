"""Prefix tuning inside torch attention modules (UniPELT's ``prefix`` op, and prefix
tuning's ``prefix_encoder`` op, whose keys and values an :class:`AttentionPrefix` takes
from a shared table through :meth:`AttentionPrefix.add_source`).

How a prefix enters attention: trained keys and values, ``(num_virtual_tokens, width)``
per adapter, are concatenated in front of the real keys and values right before the
attention is computed, after any rotary embedding and key/value cache update (so the
prefix carries no position and is never cached), and the attention mask gets as many
leading "visible" columns. Every query sees the prefix; padding and causality still
apply to real tokens. A gated prefix has both its keys and values multiplied by the
gate, which is computed from the attention module's input (captured by a forward
pre-hook), as in the UniPELT paper.

The prefixes of one attention module live in an :class:`AttentionPrefix` registered as
its child ``prefix`` (so the module's own layers, which LoRA may adapt, stay visible
and canonical tensor names are ``<attention>.prefix.keys`` and so on). The attention
reaches it in one of two ways:

* **transformers models** (BERT, GPT-2, Llama and the others that dispatch through
  ``ALL_ATTENTION_FUNCTIONS``): the module's ``config`` is replaced by a read-through
  view whose ``_attn_implementation`` names :func:`routed_attention`, registered with
  transformers' ``AttentionInterface``. That function extends keys, values and mask,
  then calls the model's real implementation (``eager`` or ``sdpa``; other
  implementations are refused with a clear error). Mask creation, which reads the
  model's own config, is untouched. This relies only on the documented
  ``AttentionInterface`` contract, not on any model's forward code. T5 (and other
  relative-position models) hand the attention function a ``position_bias`` as wide
  as the keys; it gets as many leading columns as the prefix: the model's own
  relative bias for a prefix sitting at positions ``0..n-1`` in front of the real
  tokens, when a ``position_bias_source`` (an attention with ``compute_bias``, T5's
  first layer) is set (HF PEFT's semantics, where the prefix is a key/value cache
  ahead of the input), else zeros.
* **other modules** opt in by setting the class attribute
  ``peftcore_prefix_support = True`` and calling :func:`extend_key_values` on their
  ``(batch, heads, seq, head_dim)`` keys and values before attending.

Unloading restores the module's config and removes the hook; the ``prefix`` child is
set to ``None``, which torch skips in ``named_modules`` and ``state_dict``.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Optional

import torch
from torch import nn

from peftcore.errors import AdapterError, PlanError
from peftcore.methods.unipelt_ops import AddPrefix
from peftcore_torch.gates import GatedLayer, broadcast_gate
from peftcore_torch.layers import AdapterLayer

PREFIX_CHILD = "prefix"
ROUTED_IMPLEMENTATION = "peftcore_prefix"
SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")


class AttentionPrefix(GatedLayer):
    """The prefixes (and their gates) of one attention module, by adapter."""

    adapter_tensor_names = ("prefix_keys", "prefix_values", "gate_weight", "gate_bias")
    canonical_names = {"prefix_keys": "keys", "prefix_values": "values", "gate_weight": "gate.weight", "gate_bias": "gate.bias"}
    #: the attention module (a transformers one, or any with ``extend_key_values`` calls), not a child
    attention: Any

    def __init__(self, attention: nn.Module) -> None:
        super().__init__(nn.Identity())
        self.prefix_keys = nn.ParameterDict()
        self.prefix_values = nn.ParameterDict()
        self.init_gates()
        #: prefix tuning's adapters: their keys and values come from a shared table
        #: (``source.key_values(adapter, key_entry)``), not from this holder
        self.sources: dict[str, tuple[Any, int]] = {}
        object.__setattr__(self, "attention", attention)  # not a child: the attention module owns us
        self._input: Optional[torch.Tensor] = None
        self._hook = attention.register_forward_pre_hook(self._capture_input, with_kwargs=True)
        #: an attention with T5's ``compute_bias(query_len, key_len, device, past_seen_tokens)``,
        #: which gives the prefix's columns of ``position_bias`` (zeros without one); not a child
        self.position_bias_source: Optional[nn.Module] = None
        if is_transformers_attention(attention):
            self.attention.config = RoutedConfig(self.attention.config)

    def _capture_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self._input = hidden if isinstance(hidden, torch.Tensor) else None

    def new_tensor(self, *shape: int) -> nn.Parameter:
        reference = next(self.attention.parameters())
        return nn.Parameter(torch.empty(shape, device=reference.device, dtype=reference.dtype))

    def add(self, adapter_name: str, op: AddPrefix) -> None:
        if self.has_adapter(adapter_name):
            raise AdapterError(f"attention {op.path!r} already has a prefix for adapter {adapter_name!r}")
        keys, values = self.new_tensor(op.num_virtual_tokens, op.width), self.new_tensor(op.num_virtual_tokens, op.width)
        with torch.no_grad():
            keys.normal_(0.0, op.init_std)
            values.normal_(0.0, op.init_std)
        self.prefix_keys[adapter_name] = keys
        self.prefix_values[adapter_name] = values

    def adapter_names(self) -> list[str]:
        own = list(self.prefix_keys.keys())
        return own + [name for name in self.sources if name not in own]

    def add_source(self, adapter_name: str, source: Any, key_entry: int) -> None:
        """Take ``adapter_name``'s keys and values from table entry ``key_entry`` of ``source``."""
        if self.has_adapter(adapter_name):
            raise AdapterError(f"attention {self.attention.__class__.__name__} already has a prefix for adapter {adapter_name!r}")
        self.sources[adapter_name] = (source, key_entry)

    def key_values(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's prefix keys and values, each ``(num_virtual_tokens, width)``."""
        if adapter_name in self.sources:
            source, index = self.sources[adapter_name]
            return source.key_values(adapter_name, index)
        return self.prefix_keys[adapter_name], self.prefix_values[adapter_name]

    def delete(self, adapter_name: str) -> None:
        super().delete(adapter_name)
        self.sources.pop(adapter_name, None)

    def extend(
        self, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor], query_len: int, causal: bool, additive: bool
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Keys, values and mask with the running adapters' prefixes in front."""
        hidden, self._input = self._input, None
        names = self.adapters_to_run()
        if not names:
            return key, value, mask
        batch, heads, key_len, head_dim = key.shape
        prefix_keys: list[torch.Tensor] = []
        prefix_values: list[torch.Tensor] = []
        for name in names:
            keys, values = self.key_values(name)
            if keys.shape[1] != heads * head_dim:
                raise AdapterError(f"the prefix of adapter {name!r} is {keys.shape[1]} wide, the attention's keys are "
                                   f"{heads} heads x {head_dim}")
            gate = None
            if name in self.gate_weight:
                if hidden is None:
                    raise AdapterError(f"the prefix gate of adapter {name!r} did not see the attention's input")
                gate = self.gate(name, hidden)
            for stored, out in ((keys, prefix_keys), (values, prefix_values)):
                tokens = stored.to(key.dtype).reshape(-1, heads, head_dim).transpose(0, 1).unsqueeze(0)
                tokens = tokens.expand(batch, -1, -1, -1)
                out.append(tokens * broadcast_gate(gate, tokens) if gate is not None else tokens)
        key = torch.cat([*prefix_keys, key], dim=2)
        value = torch.cat([*prefix_values, value], dim=2)
        prefix_len = key.shape[2] - key_len
        return key, value, extend_mask(mask, prefix_len, query_len, key_len, causal, additive, key)

    def use_position_bias_of(self, source: nn.Module) -> None:
        """Take the prefix's ``position_bias`` columns from ``source.compute_bias``."""
        object.__setattr__(self, "position_bias_source", source)  # a plain reference: no module cycle

    def extend_position_bias(self, bias: torch.Tensor, prefix_len: int) -> torch.Tensor:
        """``bias`` (``(batch or 1, heads, queries, keys)``, keys already cached counted) with
        ``prefix_len`` columns in front; the queries are the last ones before the keys' end."""
        query_len, key_len = bias.shape[-2], bias.shape[-1]
        source = self.position_bias_source
        if source is None:
            columns = bias.new_zeros((*bias.shape[:-1], prefix_len))
        else:
            total = prefix_len + key_len
            full = source.compute_bias(query_len, total, device=bias.device, past_seen_tokens=total - query_len)  # type: ignore[operator]
            columns = full[..., :prefix_len].to(bias.dtype).expand(*bias.shape[:-1], prefix_len)
        return torch.cat([columns, bias], dim=-1)

    def merge(self, adapter_names: list[str]) -> None:
        self.refuse_merge(adapter_names, "a prefix adds attention inputs; it is not a weight change")

    def unwrap(self, merge: bool) -> Any:
        """Detach from the attention module (config and hook restored); leaves ``None`` behind."""
        if merge:
            self.merge([a for a in self.active_adapters if self.has_adapter(a)])
        self._hook.remove()
        config = getattr(self.attention, "config", None)
        if isinstance(config, RoutedConfig):
            self.attention.config = config.peftcore_real_config
        return None


def extend_mask(
    mask: Optional[torch.Tensor], prefix_len: int, query_len: int, key_len: int, causal: bool, additive: bool, like: torch.Tensor
) -> Optional[torch.Tensor]:
    """``mask`` (bool: True attends; float: added to scores) with ``prefix_len`` visible
    columns in front. A missing mask stays missing unless the attention is ``causal``
    (then the implied causal mask is built: query ``i`` sits at ``key_len - query_len + i``)."""
    if mask is None:
        if not causal or query_len == 1:
            return None
        positions = torch.arange(key_len, device=like.device)
        allowed = positions[None, :] <= torch.arange(query_len, device=like.device)[:, None] + (key_len - query_len)
        mask = allowed[None, None]
        if additive:
            mask = torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(~mask, torch.finfo(like.dtype).min)
    pad_shape = (*mask.shape[:-1], prefix_len)
    if mask.dtype == torch.bool:
        pad = torch.ones(pad_shape, dtype=torch.bool, device=mask.device)
    else:
        pad = torch.zeros(pad_shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def extend_key_values(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
    causal: bool = False, additive: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Put ``module``'s prefixes in front of ``key`` and ``value`` (``(batch, heads, seq,
    head_dim)``) and widen ``mask``; unchanged when the module has no running prefix."""
    holder = prefix_holder(module)
    if holder is None:
        return key, value, mask
    return holder.extend(key, value, mask, query.shape[2], causal, additive)


def prefix_holder(module: Optional[nn.Module]) -> Optional[AttentionPrefix]:
    """The :class:`AttentionPrefix` attached to ``module``, if any."""
    holder = getattr(module, "_modules", {}).get(PREFIX_CHILD) if module is not None else None
    return holder if isinstance(holder, AttentionPrefix) else None


class RoutedConfig:
    """A read-through view of a transformers config that routes attention to
    :func:`routed_attention`; every other attribute, read or written, is the real config's."""

    def __init__(self, real: Any) -> None:
        object.__setattr__(self, "peftcore_real_config", real)

    def __getattr__(self, name: str) -> Any:
        if name == "peftcore_real_config":  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.peftcore_real_config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.peftcore_real_config, name, value)

    @property
    def _attn_implementation(self) -> str:
        return ROUTED_IMPLEMENTATION


def routed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], **kwargs: Any) -> Any:
    """The attention function transformers calls for a module with a prefix."""
    implementation = _real_implementation(module)
    if implementation == "eager":
        attend = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if attend is None:
            raise AdapterError(f"cannot find the eager attention of {type(module).__name__}; load the model with attn_implementation='sdpa'")
        causal = False  # eager attention masks only through the mask it is given
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attend = ALL_ATTENTION_FUNCTIONS["sdpa"]
        flag = kwargs.get("is_causal")
        causal = bool(flag if flag is not None else getattr(module, "is_causal", True))
    key_len = key.shape[2]
    key, value, attention_mask = extend_key_values(
        module, query, key, value, attention_mask, causal=causal, additive=implementation == "eager"
    )
    bias = kwargs.get("position_bias")
    holder = prefix_holder(module)
    if isinstance(bias, torch.Tensor) and holder is not None and key.shape[2] > key_len:
        kwargs["position_bias"] = holder.extend_position_bias(bias, key.shape[2] - key_len)
    return attend(module, query, key, value, attention_mask, **kwargs)


def _real_implementation(module: nn.Module) -> str:
    config: Any = module.config  # a transformers config, or ours around it
    real = config.peftcore_real_config if isinstance(config, RoutedConfig) else config
    implementation = real._attn_implementation or "eager"
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        raise AdapterError(
            f"UniPELT prefixes support attn_implementation {SUPPORTED_IMPLEMENTATIONS}; {type(module).__name__} uses "
            f"{implementation!r} (load the model with attn_implementation='sdpa' or 'eager')"
        )
    return str(implementation)


def is_transformers_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers attention that computes attention through
    ``ALL_ATTENTION_FUNCTIONS`` (the one seam :func:`routed_attention` uses). Modules that
    compute it themselves (GPT-Neo, DeBERTa) hold a ``config`` too, so its forward's code
    is asked for the name: a prefix that such a module would ignore is refused instead."""
    if not type(module).__module__.startswith("transformers."):
        return False
    if not hasattr(getattr(module, "config", None), "_attn_implementation"):
        return False
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def build_prefix(model: nn.Module, modules: dict, op: AddPrefix, adapter_name: str) -> None:
    attention_prefix(modules, op.path).add(adapter_name, op)


def attention_prefix(modules: dict, path: str) -> AttentionPrefix:
    """The :class:`AttentionPrefix` of the attention module at ``path``, attached if needed."""
    attention = modules.get(path)
    if attention is None or isinstance(attention, AdapterLayer):
        kind = type(attention).__name__ if attention is not None else "missing"
        raise PlanError(f"torch backend puts a prefix on an attention module; {path!r} is {kind}")
    holder = prefix_holder(attention)
    if holder is None:
        _check_attention(path, attention)
        holder = AttentionPrefix(attention)
        attention.add_module(PREFIX_CHILD, holder)
        modules[f"{path}.{PREFIX_CHILD}"] = holder
    return holder


def _check_attention(path: str, attention: nn.Module) -> None:
    if getattr(attention, PREFIX_CHILD, None) is not None:
        raise PlanError(f"attention {path!r} already has an attribute {PREFIX_CHILD!r}; a prefix cannot be attached")
    if is_transformers_attention(attention):
        from transformers import AttentionInterface

        AttentionInterface.register(ROUTED_IMPLEMENTATION, routed_attention)
        try:
            _real_implementation(attention)
        except AdapterError as exc:
            raise PlanError(f"attention {path!r}: {exc}") from None
        if getattr(attention, "reorder_and_upcast_attn", False):
            raise PlanError(f"attention {path!r} uses GPT-2's reorder_and_upcast_attn, which bypasses the attention "
                            f"interface a prefix enters through; set it to False")
    elif not getattr(type(attention), "peftcore_prefix_support", False):
        raise PlanError(
            f"torch backend cannot put a prefix on {path!r} ({type(attention).__name__}): it supports transformers "
            f"attention modules, and modules that set peftcore_prefix_support = True and call "
            f"peftcore_torch.prefix.extend_key_values"
        )
