"""Prefix tuning for torch: one table of key/value prefixes feeding every attention layer.

The table (``prompt_embeddings``, HF PEFT's layout, see
:mod:`peftcore.methods.prefix_tuning`) or its MLP reparameterisation lives in a
:class:`PrefixEncoder`, a child ``prefix_encoder`` of the first attention module. Each
attention module reaches its slice through the same :class:`~peftcore_torch.prefix.AttentionPrefix`
that UniPELT's prefix uses (one implementation of "keys and values in front"), which
asks the encoder for its keys and values instead of holding its own.

As in HF PEFT, where the prefix is a key/value cache in front of the input, the real
tokens' positions start after the prefix: a forward pre-hook on a transformers-style
model shifts ``position_ids`` by the prefix length (filling them in when the call has
none).

Encoder-decoder models (T5, BART): the prefix goes into the decoder's self-attention
only, where HF PEFT's cache would put it; it never enters our key/value cache, so cached
generation is unchanged. The decoder's positions start after the prefix as in HF PEFT:
a pre-hook on the decoder's learned position embedding (BART's ``embed_positions``)
shifts its positions, and T5's relative position bias gets the prefix's columns from the
decoder's first self-attention (see :meth:`AttentionPrefix.extend_position_bias`).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import nn

from peftcore.errors import AdapterError, PlanError
from peftcore.methods.prefix_tuning import ENCODER_CHILD, AddPrefixEncoder
from peftcore_torch.layers import AdapterLayer
from peftcore_torch.prefix import attention_prefix
from peftcore_torch.prompt_inputs import _cache_length, find_cache, is_encoder_decoder

_PROJECTION = ("proj_embedding", "proj_down_weight", "proj_down_bias", "proj_up_weight", "proj_up_bias")


class PrefixEncoder(AdapterLayer):
    """Each adapter's table of prefixes, ``(num_virtual_tokens, num_layers * 2 * width)``,
    stored or computed by HF's MLP (``embedding -> Linear -> tanh -> Linear``)."""

    adapter_tensor_names = ("prompt_embeddings", *_PROJECTION)
    canonical_names = {
        "proj_embedding": "embedding.weight",
        "proj_down_weight": "transform.0.weight",
        "proj_down_bias": "transform.0.bias",
        "proj_up_weight": "transform.2.weight",
        "proj_up_bias": "transform.2.bias",
    }
    proj_embedding: nn.ParameterDict
    proj_down_weight: nn.ParameterDict
    proj_down_bias: nn.ParameterDict
    proj_up_weight: nn.ParameterDict
    proj_up_bias: nn.ParameterDict

    def __init__(self, reference: torch.Tensor) -> None:
        super().__init__(nn.Identity())
        self.prompt_embeddings = nn.ParameterDict()
        for name in _PROJECTION:
            setattr(self, name, nn.ParameterDict())
        self.widths: dict[str, int] = {}
        self._reference = (reference.device, reference.dtype)
        self.position_hook: Optional[PrefixPositionHook | DecoderPositionHook] = None

    def new_tensor(self, *shape: int) -> nn.Parameter:
        device, dtype = self._reference
        return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))

    def adapter_names(self) -> list[str]:
        own = list(self.prompt_embeddings.keys())
        return own + [name for name in self.proj_embedding.keys() if name not in own]

    def add(self, adapter_name: str, op: AddPrefixEncoder) -> None:
        if self.has_adapter(adapter_name):
            raise AdapterError(f"the model already has a prefix-tuning adapter named {adapter_name!r}")
        n, d, h = op.num_virtual_tokens, op.width, op.projection_hidden
        with torch.no_grad():
            if not h:
                table = self.new_tensor(n, op.table_width)
                if op.zero_init:
                    table.zero_()
                else:
                    nn.init.normal_(table)  # HF PEFT's table is a default nn.Embedding
                self.prompt_embeddings[adapter_name] = table
            else:
                embedding = self.new_tensor(n, d)
                nn.init.normal_(embedding)
                self.proj_embedding[adapter_name] = embedding
                for prefix, (rows, cols) in (("proj_down", (h, d)), ("proj_up", (op.table_width, h))):
                    weight, bias = self.new_tensor(rows, cols), self.new_tensor(rows)
                    bound = 1.0 / cols**0.5  # nn.Linear's default initialisation
                    nn.init.kaiming_uniform_(weight, a=5**0.5)
                    bias.uniform_(-bound, bound)
                    if op.zero_init and prefix == "proj_up":  # HF's "zero": the MLP's output starts at 0
                        weight.zero_()
                        bias.zero_()
                    getattr(self, f"{prefix}_weight")[adapter_name] = weight
                    getattr(self, f"{prefix}_bias")[adapter_name] = bias
        self.widths[adapter_name] = d

    def delete(self, adapter_name: str) -> None:
        super().delete(adapter_name)
        self.widths.pop(adapter_name, None)

    def table(self, adapter_name: str) -> torch.Tensor:
        """The adapter's table of prefixes (computed through the MLP when it has one)."""
        if adapter_name in self.prompt_embeddings:
            return self.prompt_embeddings[adapter_name]
        hidden = torch.tanh(
            torch.nn.functional.linear(
                self.proj_embedding[adapter_name], self.proj_down_weight[adapter_name], self.proj_down_bias[adapter_name]
            )
        )
        return torch.nn.functional.linear(hidden, self.proj_up_weight[adapter_name], self.proj_up_bias[adapter_name])

    def key_values(self, adapter_name: str, key_entry: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix keys in table entry ``key_entry`` (``2 * layer`` unless the plan says
        otherwise) and the values in the next, each ``(num_virtual_tokens, width)``."""
        d = self.widths[adapter_name]
        table = self.table(adapter_name)
        start = key_entry * d
        return table[:, start : start + d], table[:, start + d : start + 2 * d]

    def num_virtual_tokens(self) -> int:
        """Key/value positions the running adapters put in front of each layer's keys."""
        return sum(
            (self.prompt_embeddings[a] if a in self.prompt_embeddings else self.proj_embedding[a]).shape[0]
            for a in self.adapters_to_run()
        )

    def export(self, adapter_name: str) -> dict[str, torch.Tensor]:
        tensors = super().export(adapter_name)
        if adapter_name not in self.prompt_embeddings:  # HF PEFT saves the MLP's output as the table
            with torch.no_grad():
                tensors["prompt_embeddings"] = self.table(adapter_name).detach()
        return tensors

    def merge(self, adapter_names: list[str]) -> None:
        if any(self.has_adapter(a) for a in adapter_names):
            raise AdapterError("a prefix-tuning adapter adds attention inputs; it has no weights to merge into the base")

    def unwrap(self, merge: bool) -> Any:
        if merge:
            self.merge([a for a in self.active_adapters if self.has_adapter(a)])
        if self.position_hook is not None:
            self.position_hook.remove()
            self.position_hook = None
        return None


class DecoderPositionHook:
    """Shift the positions an encoder-decoder model's decoder embeds (BART's learned
    ``embed_positions(input_ids, cache_length, position_ids)``) by the prefix length."""

    def __init__(self, embedding: nn.Module, encoder: PrefixEncoder) -> None:
        self.encoder = encoder
        self.signature = inspect.signature(embedding.forward)
        self._handle = embedding.register_forward_pre_hook(self._before, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        n = self.encoder.num_virtual_tokens()
        try:
            arguments = dict(self.signature.bind_partial(*args, **kwargs).arguments) if n else None
        except TypeError:
            return None
        if arguments is None:
            return None
        positions = arguments.get("position_ids")
        if isinstance(positions, torch.Tensor):
            arguments["position_ids"] = positions + n
        else:
            arguments["cache_length"] = int(arguments.get("cache_length") or 0) + n
        return (), arguments


class PrefixPositionHook:
    """Shift a transformers-style model's positions by the prefix length (HF PEFT's
    positions: the prefix is a cache of ``n`` positions in front of the input)."""

    def __init__(self, model: nn.Module, encoder: PrefixEncoder) -> None:
        self.encoder = encoder
        self.signature = inspect.signature(model.forward)
        self.var_keyword = next(
            (p.name for p in self.signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
        )
        self._handle = model.register_forward_pre_hook(self._before, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        n = self.encoder.num_virtual_tokens()
        if not n:
            return None
        try:
            arguments = dict(self.signature.bind_partial(*args, **kwargs).arguments)
        except TypeError:
            return None
        if self.var_keyword is not None:
            arguments.update(arguments.pop(self.var_keyword, None) or {})
        positions = arguments.get("position_ids")
        if isinstance(positions, torch.Tensor):
            arguments["position_ids"] = positions + n
            return (), arguments
        reference = arguments.get("input_ids")
        if reference is None:
            reference = arguments.get("inputs_embeds")
        if not isinstance(reference, torch.Tensor) or reference.dim() < 2:
            return None
        batch, length = reference.shape[0], reference.shape[1]
        start = _cache_length(find_cache(arguments)) + n
        arguments["position_ids"] = torch.arange(start, start + length, device=reference.device).expand(batch, length)
        return (), arguments


def build_prefix_encoder(model: nn.Module, modules: dict, op: AddPrefixEncoder, adapter_name: str) -> None:
    first = modules.get(op.path)
    if first is None or isinstance(first, AdapterLayer):
        raise PlanError(f"torch backend attaches prefix tuning to an attention module; {op.path!r} is not one")
    holders = [attention_prefix(modules, path) for path in op.attention_paths]
    encoder = modules.get(f"{op.path}.{ENCODER_CHILD}")
    if encoder is None:
        if getattr(first, ENCODER_CHILD, None) is not None:
            raise PlanError(f"attention {op.path!r} already has an attribute {ENCODER_CHILD!r}")
        encoder = PrefixEncoder(next(first.parameters()))
        first.add_module(ENCODER_CHILD, encoder)
        modules[f"{op.path}.{ENCODER_CHILD}"] = encoder
        encoder.position_hook = _position_hook(model, encoder)
    assert isinstance(encoder, PrefixEncoder)
    encoder.add(adapter_name, op)
    bias_source = next((h.attention for h in holders if getattr(h.attention, "has_relative_attention_bias", False)), None)
    for index, holder in enumerate(holders):
        holder.add_source(adapter_name, encoder, op.key_entry(index))
        if bias_source is not None and callable(getattr(bias_source, "compute_bias", None)):
            holder.use_position_bias_of(bias_source)


def _position_hook(model: nn.Module, encoder: PrefixEncoder) -> Optional[PrefixPositionHook | DecoderPositionHook]:
    """The hook that puts the model's real tokens after the prefix, where it has positions to shift."""
    if not is_encoder_decoder(model):
        if "position_ids" in inspect.signature(model.forward).parameters:
            return PrefixPositionHook(model, encoder)
        return None
    get_decoder = getattr(model, "get_decoder", None)
    embedding = getattr(get_decoder(), "embed_positions", None) if callable(get_decoder) else None
    if isinstance(embedding, nn.Module) and "position_ids" in inspect.signature(embedding.forward).parameters:
        return DecoderPositionHook(embedding, encoder)
    return None
