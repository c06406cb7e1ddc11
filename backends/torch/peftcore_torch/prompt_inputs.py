"""Lengthen a transformers-style model's inputs for the virtual tokens of prompt tuning.

A forward pre-hook on the top-level model rewrites the call's arguments so that every
per-position input covers the ``n`` virtual tokens in front of the sequence:

- ``input_ids`` get ``n`` placeholder ids in front (never the pad id, so a classifier
  that finds the last real token by the pad id still finds it); the prompted embedding
  layer replaces their vectors by the prompt. ``inputs_embeds`` get the prompt itself.
- ``attention_mask`` gets ``n`` ones, token-level ``labels`` get ``n`` times -100 (the
  loss ignores virtual positions), ``token_type_ids`` get zeros, ``position_ids`` give
  the virtual tokens ``0..n-1`` and shift the rest by ``n``; ``cache_position`` covers
  all ``n + length`` positions.
- In a later generation step (a non-empty cache), the prompt is already in the cache.
  Generation keeps its attention mask, cache positions and position ids without the
  prompt, so they are shifted to include it. The hook recognises a cache it filled by a
  tag it puts on the cache object; for an untagged cache it goes by the mask and cache
  positions being ``n`` short.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import nn

#: Arguments whose presence in ``forward`` marks a model whose inputs the hook manages.
MANAGED_ARGUMENTS = ("input_ids", "inputs_embeds")
#: Attribute set on a cache object whose first ``value`` positions hold the prompt.
CACHE_TAG = "peftcore_virtual_tokens"
#: Names under which transformers passes (and returns) the key/value cache: ``cache`` from
#: transformers 5.x on, ``past_key_values`` before (and still accepted, deprecated, there).
CACHE_NAMES = ("cache", "past_key_values")


def find_cache(container: Any) -> Any:
    """The key/value cache in a call's arguments or a model output, under either name.

    The entries are read as stored (``dict.get``, the instance's own attributes): on
    transformers 5.x a model output answers the old name ``past_key_values`` through a
    property that logs a deprecation, which asking must not trigger."""
    for name in CACHE_NAMES:
        if isinstance(container, dict):
            value = dict.get(container, name)
        else:
            value = vars(container).get(name) if hasattr(container, "__dict__") else getattr(container, name, None)
        if value is not None:
            return value
    return None


def takes_token_inputs(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes transformers-style ``input_ids``/``inputs_embeds``."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(name in parameters for name in MANAGED_ARGUMENTS)


class PromptInputHook:
    """The pre-hook (and its reset hook) that one prompted embedding layer installs."""

    def __init__(self, model: nn.Module, layer: Any) -> None:
        self.layer = layer
        self.signature = inspect.signature(model.forward)
        self.var_keyword = next(
            (p.name for p in self.signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
        )
        pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        self.placeholder_id = 1 if pad_id == 0 else 0
        self._prepended = 0  # virtual tokens put in front during the call under way
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        self.layer.pending_prefix = 0
        prepended, self._prepended = self._prepended, 0
        cache = find_cache(output)
        if prepended and cache is not None:
            try:
                setattr(cache, CACHE_TAG, prepended)
            except (AttributeError, TypeError):
                pass  # a legacy tuple cache: later steps go by the mask and cache positions

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        n = self.layer.num_virtual_tokens()
        if n == 0:
            return None
        try:
            bound = self.signature.bind_partial(*args, **kwargs)
        except TypeError:
            return None  # let the model report its own argument error
        arguments = dict(bound.arguments)
        if self.var_keyword is not None:
            arguments.update(arguments.pop(self.var_keyword, None) or {})
        ids, embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
        reference = ids if ids is not None else embeds
        if not isinstance(reference, torch.Tensor) or reference.dim() < 2:
            return None
        batch, length = reference.shape[0], reference.shape[1]
        if arguments.get("token_type_ids") is not None and any(
            a in self.layer.drop_token_types for a in self.layer.adapters_to_run()
        ):
            arguments["token_type_ids"] = None  # as HF PEFT's model for the adapter's task type
        past = find_cache(arguments)
        cached = _cache_length(past)
        if cached == 0:
            self._prepend(arguments, n, batch, length)
            self._prepended = n
            if past is not None:
                try:
                    setattr(past, CACHE_TAG, n)
                except (AttributeError, TypeError):
                    pass
        else:
            self._shift_generation_step(arguments, getattr(past, CACHE_TAG, None), n, batch, length, cached)
        return (), arguments

    def _prepend(self, arguments: dict, n: int, batch: int, length: int) -> None:
        ids, embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
        if ids is not None:
            placeholders = torch.full((batch, n), self.placeholder_id, dtype=ids.dtype, device=ids.device)
            arguments["input_ids"] = torch.cat([placeholders, ids], dim=1)
            self.layer.pending_prefix = n
        else:
            assert embeds is not None  # _before saw input_ids or inputs_embeds
            arguments["inputs_embeds"] = torch.cat([self.layer.prompt_batch(batch, embeds.dtype), embeds], dim=1)
        mask = arguments.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            arguments["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        labels = arguments.get("labels")
        if (
            isinstance(labels, torch.Tensor)
            and labels.dim() >= 2
            and labels.shape[1] == length
            and not labels.is_floating_point()
        ):
            ignored = labels.new_full((batch, n, *labels.shape[2:]), -100)
            arguments["labels"] = torch.cat([ignored, labels], dim=1)
        token_types = arguments.get("token_type_ids")
        if isinstance(token_types, torch.Tensor) and token_types.dim() == 2:
            arguments["token_type_ids"] = torch.cat([token_types.new_zeros(batch, n), token_types], dim=1)
        positions = arguments.get("position_ids")
        if isinstance(positions, torch.Tensor):
            virtual = torch.arange(n, dtype=positions.dtype, device=positions.device).expand(*positions.shape[:-1], n)
            arguments["position_ids"] = torch.cat([virtual, positions + n], dim=-1)
        cache_position = arguments.get("cache_position")
        if isinstance(cache_position, torch.Tensor):
            start = int(cache_position[0]) if cache_position.numel() else 0
            arguments["cache_position"] = torch.arange(
                start, start + n + length, dtype=cache_position.dtype, device=cache_position.device
            )

    def _shift_generation_step(
        self, arguments: dict, tagged: Optional[int], n: int, batch: int, length: int, cached: int
    ) -> None:
        n = tagged or n
        mask = arguments.get("attention_mask")
        shifted = bool(tagged)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == cached + length - n:
            arguments["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
            shifted = True
        cache_position = arguments.get("cache_position")
        if isinstance(cache_position, torch.Tensor) and cache_position.numel() and int(cache_position[0]) == cached - n:
            arguments["cache_position"] = cache_position + n
            shifted = True
        positions = arguments.get("position_ids")
        if isinstance(positions, torch.Tensor) and shifted:
            arguments["position_ids"] = positions + n


def _cache_length(past: Any) -> int:
    """Positions already in a transformers cache (0 for none or an empty one)."""
    if past is None:
        return 0
    get_length = getattr(past, "get_seq_length", None)
    if callable(get_length):
        return int(get_length())
    try:  # the legacy tuple of (key, value) per layer
        return int(past[0][0].shape[-2])
    except (IndexError, TypeError, AttributeError):
        return 0


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers encoder-decoder model (T5, BART...)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False)) and callable(
        getattr(model, "get_encoder", None)
    )


class EncoderPromptHook:
    """Prompt tuning on an encoder-decoder model, as HF PEFT does it: the virtual tokens go
    in front of the encoder's input only (the decoder, its labels and its mask are
    untouched), and the attention mask over the encoder's output covers them.

    - A pre-hook on the encoder embeds ``input_ids`` itself and passes ``inputs_embeds``
      with the prompt in front, and gives an attention mask as long as the input ``n``
      ones in front. It serves the model's own forward and ``generate``, which runs the
      encoder on its own.
    - A pre-hook on the model extends the attention mask it hands the decoder's
      cross-attention: when the encoder runs in this call, a mask as long as the input;
      when ``encoder_outputs`` are given (generation steps), a mask ``n`` shorter than them.
    """

    def __init__(self, model: nn.Module, layer: Any) -> None:
        self.layer = layer
        encoder = model.get_encoder()  # type: ignore[operator]
        self.model_signature = inspect.signature(model.forward)
        self.encoder_signature = inspect.signature(encoder.forward)
        self._handles = [
            encoder.register_forward_pre_hook(self._before_encoder, with_kwargs=True),
            model.register_forward_pre_hook(self._before_model, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @staticmethod
    def _bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> Optional[dict]:
        try:
            arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
        except TypeError:
            return None  # let the module report its own argument error
        for parameter in signature.parameters.values():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(parameter.name, None) or {})
        return arguments

    def _before_encoder(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        n = self.layer.num_virtual_tokens()
        arguments = self._bind(self.encoder_signature, args, kwargs) if n else None
        if arguments is None:
            return None
        ids, embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            embeds = self.layer.base_layer(ids)
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
            return None
        batch, length = embeds.shape[0], embeds.shape[1]
        arguments["input_ids"] = None
        arguments["inputs_embeds"] = torch.cat([self.layer.prompt_batch(batch, embeds.dtype), embeds], dim=1)
        mask = arguments.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == length:
            arguments["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        return (), arguments

    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        n = self.layer.num_virtual_tokens()
        arguments = self._bind(self.model_signature, args, kwargs) if n else None
        if arguments is None:
            return None
        mask = arguments.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return None
        encoded = arguments.get("encoder_outputs")
        if encoded is not None:
            hidden = encoded[0] if isinstance(encoded, (tuple, list)) else getattr(encoded, "last_hidden_state", None)
            if not isinstance(hidden, torch.Tensor) or mask.shape[1] != hidden.shape[1] - n:
                return None
        else:
            reference = arguments.get("input_ids")
            if reference is None:
                reference = arguments.get("inputs_embeds")
            if not isinstance(reference, torch.Tensor) or reference.dim() < 2 or mask.shape[1] != reference.shape[1]:
                return None
        arguments["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        return (), arguments
