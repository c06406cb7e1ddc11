"""Two of Hugging Face PEFT's torch helpers: ``cast_mixed_precision_params`` and
``shift_tokens_right``, with HF's arguments and meaning."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["cast_mixed_precision_params", "shift_tokens_right"]


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen parameters of ``model`` to ``dtype`` (float16 or bfloat16) and the
    trainable ones to float32, in place: half-precision storage for the base model, full
    precision for what the optimiser updates (for automatic mixed-precision training)."""
    for param in model.parameters():
        param.data = param.data.to(torch.float32 if param.requires_grad else dtype)


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """``input_ids`` moved one position right, ``decoder_start_token_id`` in front and
    label padding (-100) replaced by ``pad_token_id``: decoder inputs from labels."""
    if pad_token_id is None:
        raise ValueError("shift_tokens_right needs pad_token_id (the model config's pad_token_id)")
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)
