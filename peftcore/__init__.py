"""peftcore: backend-agnostic parameter-efficient fine-tuning.

The core is pure Python: configs, the method registry, the model IR
(:class:`ModelGraph`) and the rewrite IR (:class:`RewritePlan`). Backends (PyTorch,
Apache SINGA, third-party packages) are pluggy plugins found through the ``peftcore``
entry-point group; importing this package loads none of them.
"""

from __future__ import annotations

from peftcore.api import PeftModel, get_peft_model, inject_adapter_in_model
from peftcore.config import PeftConfig, config_class
from peftcore.errors import (
    AdapterError,
    BackendError,
    ConfigError,
    PeftCoreError,
    PeftWarning,
    PlanError,
    TargetNotFoundError,
    UnknownFieldError,
    UnknownMethodError,
    UnsupportedLayerError,
)
from peftcore.graph import LayerNode, ModelGraph
from peftcore.hf_compat import get_peft_config, get_peft_model_state_dict, set_peft_model_state_dict
from peftcore.hf_names import PromptLearningConfig, lazy_names, resolve
from peftcore.hookspecs import BackendInfo, hookimpl
from peftcore.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from peftcore.methods import BitFitConfig, LoraConfig, PromptTuningConfig, ResidualPromptTuningConfig
from peftcore.methods.p_tuning import PromptEncoderConfig
from peftcore.methods.prefix_tuning import PrefixTuningConfig
from peftcore.methods.trainable_tokens_config import TrainableTokensConfig
from peftcore.methods.unipelt import UniPELTConfig, gate_values
from peftcore.peft_type import PeftType, PromptEncoderReparameterizationType, PromptTuningInit
from peftcore.plan import PlanOp, RewritePlan, register_op
from peftcore.plugins import get_plugin_manager
from peftcore.registry import PeftRegistry, register_method
from peftcore.task_type import TaskType
from peftcore.xprompt import XPromptConfig, XPromptResult, xprompt_prune

__version__ = "0.1.0"

#: Hugging Face PEFT's names for peftcore's errors.
PeftError = PeftCoreError
NoMatchingPeftModuleError = TargetNotFoundError

# The plugin layer feeds the method registry, which never imports it: a name the
# built-in methods do not answer loads the installed plugins' methods (once).
PeftRegistry.set_plugin_source(lambda: get_plugin_manager().registered_methods())

__all__ = [
    "AdapterError",
    "BackendError",
    "BackendInfo",
    "BitFitConfig",
    "ConfigError",
    "LayerNode",
    "NoMatchingPeftModuleError",
    "LoraConfig",
    "ModelGraph",
    "PeftConfig",
    "PeftCoreError",
    "PeftError",
    "PeftModel",
    "PeftType",
    "PeftWarning",
    "PromptEncoderReparameterizationType",
    "PromptTuningInit",
    "PeftRegistry",
    "PlanError",
    "PlanOp",
    "PrefixTuningConfig",
    "PromptLearningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "ResidualPromptTuningConfig",
    "RewritePlan",
    "TargetNotFoundError",
    "TaskType",
    "TrainableTokensConfig",
    "UnknownFieldError",
    "UnknownMethodError",
    "UnsupportedLayerError",
    "XPromptConfig",
    "XPromptResult",
    "UniPELTConfig",
    "config_class",
    "gate_values",
    "get_peft_config",
    "get_peft_model",
    "inject_adapter_in_model",
    "get_peft_model_state_dict",
    "hookimpl",
    "hotswap_adapter",
    "prepare_model_for_compiled_hotswap",
    "register_method",
    "register_op",
    "set_peft_model_state_dict",
    "xprompt_prune",
]


def __getattr__(name: str) -> object:
    """Hugging Face PEFT's other public names, resolved on first use (torch-side ones from
    the torch backend); an HF feature peftcore lacks is an ImportError that names it (see
    :mod:`peftcore.hf_names`)."""
    value = resolve(name)
    if name != "PEFT_TYPE_TO_CONFIG_MAPPING":  # that one follows the registry as plugins load
        globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *lazy_names()})
