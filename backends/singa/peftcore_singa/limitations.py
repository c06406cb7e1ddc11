"""What the SINGA backend cannot build, and why (shown by ``peftcore backends``).

SINGA's core has no attention layer: ``singa.layer`` offers no ``MultiHeadAttention``
(or any attention), so a SINGA model's attention, where it has one, is the user's own
code, with no keys and values a backend could find and extend. Methods that put
virtual tokens *inside* attention (prefix tuning, UniPELT's prefix part) therefore have
nothing to attach to. The prompt-family methods that work at the input embedding (prompt
tuning, residual prompt tuning, XPrompt, P-tuning with its MLP or LSTM encoder) are built,
with one block of prompt rows: SINGA has no encoder-decoder model class, so HF's
encoder-decoder layout (``num_transformer_submodules=2``) is refused, and listed too.

This module imports nothing: it is data the runtime's ``info()`` declares.
"""

from __future__ import annotations

_NO_ATTENTION = "SINGA's core has no attention layer (singa.layer has no MultiHeadAttention)"
_ONE_SUBMODULE = (
    "prompts need num_transformer_submodules=1: SINGA has no encoder-decoder model class, so HF's "
    "encoder-decoder layout (num_transformer_submodules=2, task_type SEQ_2_SEQ_LM) is refused"
)

_TORCH_ONLY_LORA_FIELDS = (
    "LoRA's target_parameters and trainable_token_indices are refused (no builder for their param_lora and "
    "trainable_tokens ops): LoRA on a bare parameter swaps weight + delta into the owning module for its "
    "forward, and trainable tokens look tokens up in a table with rows replaced; SINGA's layers read their "
    "parameters inside their own operators, and neither is written for them yet; use the torch backend"
)

#: Methods the SINGA backend cannot build, or builds only in some forms, by registry name,
#: with the reason (``peftcore backends`` prints both kinds). The core refuses a method
#: listed here whose ops the backend lacks builders for, with this reason, before
#: anything is planned or queued (``Backend.refuse_unbuildable``).
LIMITATIONS: dict[str, str] = {
    "prompt_tuning": _ONE_SUBMODULE,
    "residual_prompt_tuning": _ONE_SUBMODULE,
    "p_tuning": _ONE_SUBMODULE,
    "prefix_tuning": (
        f"{_NO_ATTENTION}, so there are no attention keys and values to put the prefix in front of; "
        "use the torch backend"
    ),
    # LoRA itself is built (Linear, Gemm, Linear3D, Embedding, Conv2d): only these two fields are not
    "lora": _TORCH_ONLY_LORA_FIELDS,
    "trainable_tokens": (
        "no builder for the trainable_tokens op: looking tokens up in a table with rows replaced is not "
        "written for SINGA's Embedding yet; use the torch backend"
    ),
    "unipelt": (
        f"{_NO_ATTENTION}, and UniPELT's prefix part (one of its three gated parts) prefixes attention keys "
        "and values; use the torch backend"
    ),
}

