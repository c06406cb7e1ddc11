"""Built-in PEFT methods: one module per method, its config (the planner) and its plan ops.

Importing a method's module registers its op types (:func:`peftcore.plan.register_op`);
the method registry (:mod:`peftcore.registry`) registers :data:`BUILTIN_METHODS`.
"""

from __future__ import annotations

from peftcore.methods.bitfit import BitFitConfig
from peftcore.methods.lora import LoraConfig
from peftcore.methods.lora_conv import AddLoraConv
from peftcore.methods.p_tuning import PromptEncoderConfig
from peftcore.methods.prefix_tuning import PrefixTuningConfig
from peftcore.methods.prompt_tuning import PromptTuningConfig, ResidualPromptTuningConfig
from peftcore.methods.trainable_tokens_config import TrainableTokensConfig
from peftcore.methods.unipelt import UniPELTConfig

#: The built-in config classes; each names its method in its ``method`` class attribute.
BUILTIN_METHODS = (
    LoraConfig,
    BitFitConfig,
    PromptTuningConfig,
    ResidualPromptTuningConfig,
    UniPELTConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    TrainableTokensConfig,
)

__all__ = [
    "AddLoraConv",
    "BUILTIN_METHODS",
    "BitFitConfig",
    "LoraConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "ResidualPromptTuningConfig",
    "TrainableTokensConfig",
    "UniPELTConfig",
]
