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
        self.position_hook: Optional[PrefixPositionHook] = None

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

    def key_values(self, adapter_name: str, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer_index``'s prefix keys and values, each ``(num_virtual_tokens, width)``."""
        d = self.widths[adapter_name]
        table = self.table(adapter_name)
        start = 2 * layer_index * d
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
        if not is_encoder_decoder(model) and "position_ids" in inspect.signature(model.forward).parameters:
            encoder.position_hook = PrefixPositionHook(model, encoder)
    assert isinstance(encoder, PrefixEncoder)
    encoder.add(adapter_name, op)
    for index, holder in enumerate(holders):
        holder.add_source(adapter_name, encoder, index)
