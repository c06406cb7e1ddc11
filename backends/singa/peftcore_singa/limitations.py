"""What the SINGA backend cannot build, and why (shown by ``peftcore backends``).

SINGA's core has no attention layer: ``singa.layer`` offers no ``MultiHeadAttention``
(or any attention), so a SINGA model's attention, where it has one, is the user's own
code, with no keys and values a backend could find and extend. Methods that put
virtual tokens *inside* attention (prefix tuning, UniPELT's prefix part) therefore have
nothing to attach to. The prompt-family methods that work at the input embedding (prompt
tuning, residual prompt tuning, XPrompt, P-tuning with its MLP or LSTM encoder) are built,
with one block of prompt rows: SINGA has no encoder-decoder model class, so HF's
encoder-decoder layout (``num_transformer_submodules=2``) is refused, and listed too.

This module imports neither singa nor the layer modules.
"""

from __future__ import annotations

from typing import Iterable

from peftcore.config import PeftConfig
from peftcore.errors import PlanError
from peftcore.registry import PeftRegistry

_NO_ATTENTION = "SINGA's core has no attention layer (singa.layer has no MultiHeadAttention)"
_ONE_SUBMODULE = (
    "prompts need num_transformer_submodules=1: SINGA has no encoder-decoder model class, so HF's "
    "encoder-decoder layout (num_transformer_submodules=2, task_type SEQ_2_SEQ_LM) is refused"
)

#: Methods the SINGA backend cannot build, or builds only in some forms, by registry name,
#: with the reason (``peftcore backends`` prints both kinds).
LIMITATIONS: dict[str, str] = {
    "prompt_tuning": _ONE_SUBMODULE,
    "residual_prompt_tuning": _ONE_SUBMODULE,
    "p_tuning": _ONE_SUBMODULE,
    "prefix_tuning": (
        f"{_NO_ATTENTION}, so there are no attention keys and values to put the prefix in front of; "
        "use the torch backend"
    ),
    "lora": (
        "LoRA takes Linear, Gemm, Linear3D and Embedding layers; Conv2d takes none yet: the core's LoRA op has "
        "no convolution form on main (the LoRA-variants work defines it), so a conv target is refused by kind"
    ),
    "unipelt": (
        f"{_NO_ATTENTION}, and UniPELT's prefix part (one of its three gated parts) prefixes attention keys "
        "and values; use the torch backend"
    ),
}


def refuse_unbuildable(config: PeftConfig, built_ops: Iterable[str]) -> None:
    """Raise :class:`PlanError` with the plain reason when ``config``'s method is one SINGA
    cannot build (unless a plugin has since added builders for every op it needs)."""
    reason = LIMITATIONS.get(config.method)
    if reason is None:
        return
    lacking = sorted(set(PeftRegistry.ops_of(config.method)) - set(built_ops))
    if lacking:
        raise PlanError(f"singa backend cannot build {config.method} ({type(config).__name__}): {reason}")
