"""Keep a frozen output layer's product one matrix product when it scores a slice.

During ``generate``, transformers' causal language models score only the last position:
``lm_head(hidden_states[:, -1:, :])``. At the prompt step that slice is not contiguous.
torch's ``F.linear`` on a 3-D input folds the leading dimensions into one matrix
product only when they can be viewed as one without a copy, or when the weight
requires gradients (then it copies the input). Wrapping a model in adapters freezes its
weights, so on the adapted model the slice runs as a batched product over the weight
expanded to every row instead: each row reads the whole vocabulary matrix. At 64 rows
of the benchmarks' GPT-2 shape that one product took about 60 ms instead of 9 ms, a
tenth of a whole ``generate`` call (BENCHMARKS.md, row 7).

:func:`fold_sliced_inputs` puts back what the unfrozen model does: a forward pre-hook on
the model's output embeddings copies such an input into a contiguous tensor (one
``(batch, 1, hidden)`` copy) before the product. Nothing else changes: contiguous inputs
pass untouched, and the product computes the same values.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def contiguous_input(module: nn.Module, args: tuple[Any, ...]) -> Optional[tuple[Any, ...]]:
    """The pre-hook: a 3-D or larger input whose leading dimensions cannot be folded
    without a copy is replaced by a contiguous copy; anything else is left as it is."""
    if not args:
        return None
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() >= 3 and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def fold_sliced_inputs(model: nn.Module) -> Optional[RemovableHandle]:
    """Hook ``model``'s output embeddings (transformers' ``get_output_embeddings()``) with
    :func:`contiguous_input`; the handle removes it. None where the model has no output
    embeddings or they are hooked already."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        return None
    if any(hook is contiguous_input for hook in head._forward_pre_hooks.values()):
        return None
    return head.register_forward_pre_hook(contiguous_input)
