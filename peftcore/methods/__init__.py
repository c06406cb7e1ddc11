"""Built-in PEFT methods. Importing this package registers them."""

from __future__ import annotations

from peftcore.methods.bitfit import BitFitConfig
from peftcore.methods.lora import LoraConfig
from peftcore.methods.prompt_tuning import PromptTuningConfig, ResidualPromptTuningConfig
from peftcore.methods.unipelt import UniPELTConfig

__all__ = ["BitFitConfig", "LoraConfig", "PromptTuningConfig", "ResidualPromptTuningConfig", "UniPELTConfig"]
