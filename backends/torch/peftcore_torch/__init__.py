"""peftcore's PyTorch backend.

Importing this package does not import torch; :mod:`peftcore_torch.plugin` is the
pluggy plugin (entry point ``torch`` in the ``peftcore`` group). The adapter layer
classes live in :mod:`peftcore_torch.layers`, :mod:`peftcore_torch.lora` and
:mod:`peftcore_torch.modules_to_save`.
"""

from __future__ import annotations

from typing import Any

_AUTO = (
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
)


def __getattr__(name: str) -> Any:
    """HF PEFT's ``AutoPeftModel*`` classes (:mod:`peftcore_torch.auto`), its base-state
    functions (:mod:`peftcore_torch.base_state`), ``prepare_model_for_kbit_training``
    (:mod:`peftcore_torch.training_prep`) and :func:`enable_trainer_integration`,
    imported on first use."""
    if name in _AUTO:
        from peftcore_torch import auto

        return getattr(auto, name)
    if name in ("get_base_model_state_dict", "set_base_model_state_dict", "get_submodules", "load_peft_weights"):
        from peftcore_torch import base_state

        return getattr(base_state, name)
    if name in ("prepare_model_for_kbit_training", "prepare_model_for_gradient_checkpointing"):
        from peftcore_torch import training_prep

        return getattr(training_prep, name)
    if name == "enable_trainer_integration":
        from peftcore_torch.trainer_integration import enable_trainer_integration

        return enable_trainer_integration
    raise AttributeError(f"module 'peftcore_torch' has no attribute {name!r}")

