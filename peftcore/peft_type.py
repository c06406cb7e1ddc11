"""Hugging Face PEFT's enums: method types (``PeftType``, for the methods peftcore has),
``PromptTuningInit`` and ``PromptEncoderReparameterizationType``."""

from __future__ import annotations

import enum

__all__ = ["PeftType", "PromptEncoderReparameterizationType", "PromptTuningInit"]


class StrValueEnum(str, enum.Enum):
    """An enum of strings whose members print as their value (``str(PeftType.LORA) == "LORA"``),
    as HF PEFT's enums do."""

    def __str__(self) -> str:
        return str(self.value)


class PeftType(StrValueEnum):
    """A method's ``peft_type``, as HF PEFT names it (``config.peft_type``).

    Members compare equal to their strings (``PeftType.LORA == "LORA"``) and are written
    to ``adapter_config.json`` as those strings. A config class of a method without a
    member here (a third-party one) keeps a plain string ``peft_type``.
    """

    LORA = "LORA"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    BITFIT = "BITFIT"
    RESIDUAL_PROMPT_TUNING = "RESIDUAL_PROMPT_TUNING"
    UNIPELT = "UNIPELT"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"


class PromptTuningInit(StrValueEnum):
    """``PromptTuningConfig.prompt_tuning_init`` values, as HF PEFT names them."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


class PromptEncoderReparameterizationType(StrValueEnum):
    """``PromptEncoderConfig.encoder_reparameterization_type`` values (P-tuning)."""

    MLP = "MLP"
    LSTM = "LSTM"


def as_peft_type(value: str) -> str:
    """``value`` as a :class:`PeftType` member when it names one, else unchanged."""
    try:
        return PeftType(value)
    except ValueError:
        return value
