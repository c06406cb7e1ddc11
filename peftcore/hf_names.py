"""Hugging Face PEFT's public names, importable from ``peftcore`` with HF's meaning.

``peftcore/__init__.py`` imports the framework-free names eagerly and hands any other name
to :func:`resolve` on first access (a module ``__getattr__``), so ``import peftcore``
still loads no framework:

- :data:`TORCH_NAMES`: HF PEFT's torch-only classes and functions (``PeftModelForCausalLM``,
  ``AutoPeftModel*``, ``get_model_status``, ...) live in the torch backend and are imported
  from it when first used;
- :data:`REGISTRY_CONFIGS`: config classes of methods a plugin provides (IA3 from the
  ``peftcore-ia3`` example plugin), found through the method registry;
- ``PEFT_TYPE_TO_CONFIG_MAPPING``: every registered method's config class by peft type;
- :data:`NOT_IMPLEMENTED`: names of HF features peftcore does not have. Importing one is
  an ``ImportError`` naming the feature and saying it is not implemented (an
  ``ImportError`` also from ``getattr``/``hasattr``, which is what ``from peftcore import
  X`` turns into).

Any other name is an ``AttributeError``, as for a module without ``__getattr__``.
"""

from __future__ import annotations

import abc
import importlib
from types import MappingProxyType
from typing import Any, Mapping

from peftcore.errors import UnknownMethodError
from peftcore.methods.p_tuning import PromptEncoderConfig
from peftcore.methods.prefix_tuning import PrefixTuningConfig
from peftcore.methods.prompt_tuning import PromptTuningConfig
from peftcore.registry import PeftRegistry

__all__ = ["NOT_IMPLEMENTED", "PromptLearningConfig", "REGISTRY_CONFIGS", "TORCH_NAMES", "lazy_names", "resolve"]


class PromptLearningConfig(abc.ABC):  # noqa: B024 (no abstract method: a type to test against)
    """HF PEFT's base type of the prompt-learning configs: ``isinstance(config,
    PromptLearningConfig)`` holds for prompt tuning (residual prompt tuning included),
    P-tuning and prefix tuning configs, as in HF PEFT. Build one of those; this type is
    for ``isinstance`` checks only."""

    def __new__(cls, *args: Any, **kwargs: Any) -> PromptLearningConfig:
        raise TypeError(
            "PromptLearningConfig is the type of the prompt-learning configs; build a PromptTuningConfig, "
            "PromptEncoderConfig or PrefixTuningConfig"
        )


for _config_cls in (PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig):
    PromptLearningConfig.register(_config_cls)

_TORCH_MODULES: dict[str, tuple[str, ...]] = {
    "peftcore_torch.auto": (
        "AutoPeftModel",
        "AutoPeftModelForCausalLM",
        "AutoPeftModelForFeatureExtraction",
        "AutoPeftModelForQuestionAnswering",
        "AutoPeftModelForSeq2SeqLM",
        "AutoPeftModelForSequenceClassification",
        "AutoPeftModelForTokenClassification",
    ),
    "peftcore_torch.task_models": (
        "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
        "PeftModelForCausalLM",
        "PeftModelForFeatureExtraction",
        "PeftModelForQuestionAnswering",
        "PeftModelForSeq2SeqLM",
        "PeftModelForSequenceClassification",
        "PeftModelForTokenClassification",
    ),
    "peftcore_torch.status": ("get_layer_status", "get_model_status"),
    "peftcore_torch.base_state": ("get_base_model_state_dict", "load_peft_weights", "set_base_model_state_dict"),
    "peftcore_torch.hf_utils": ("cast_mixed_precision_params", "shift_tokens_right"),
    "peftcore_torch.prompt_modules": ("PrefixEncoder", "PromptEmbedding", "PromptEncoder"),
    "peftcore_torch.training_prep": ("prepare_model_for_kbit_training",),
}

#: HF name -> the torch backend module that defines it.
TORCH_NAMES: Mapping[str, str] = MappingProxyType(
    {name: module for module, names in _TORCH_MODULES.items() for name in names}
)

#: HF config class name -> the peft type of the plugin method that provides it.
REGISTRY_CONFIGS: Mapping[str, str] = MappingProxyType({"IA3Config": "IA3"})

_MISSING: dict[str, tuple[str, ...]] = {
    "AdaLoRA": ("AdaLoraConfig", "AdaLoraModel"),
    "AdaMSS": ("AdamssConfig", "AdamssModel"),
    "adaption prompt (LLaMA-Adapter)": ("AdaptionPromptConfig", "AdaptionPromptModel"),
    "Arrow (LoRA expert routing)": ("ArrowConfig", "create_arrow_model"),
    "BD-LoRA": ("BdLoraConfig",),
    "BEFT": ("BeftConfig", "BeftModel"),
    "BOFT": ("BOFTConfig", "BOFTModel"),
    "C3A": ("C3AConfig", "C3AModel"),
    "Cartridges (KV-prefix initialisation)": (
        "CartridgeConfig",
        "CartridgeEncoder",
        "compose_cartridge_adapters",
        "initialize_kv_prefix_from_past_key_values",
        "initialize_kv_prefix_from_text",
        "prompt_embeddings_from_past_key_values",
    ),
    "CPT (context-aware prompt tuning)": ("CPTConfig", "CPTEmbedding"),
    "DeFT": ("DeftConfig", "DeftModel"),
    "DeLoRA": ("DeloraConfig", "DeloraModel"),
    "EVA (LoRA initialisation)": ("EvaConfig", "get_eva_state_dict", "initialize_lora_eva_weights"),
    "FourierFT": ("FourierFTConfig", "FourierFTModel"),
    "FRoD": ("FrodConfig", "FrodModel"),
    "GLoRA": ("GloraConfig", "GloraModel"),
    "GraLoRA": ("GraloraConfig", "GraloraModel"),
    "HiRA": ("HiraConfig", "HiraModel"),
    "HRA": ("HRAConfig", "HRAModel"),
    "KaSA": ("KasaConfig",),
    "KappaTune (target selection by condition number)": ("find_kappa_target_modules",),
    "Lily": ("LilyConfig", "LilyModel"),
    "LN tuning": ("LNTuningConfig", "LNTuningModel"),
    "LoftQ (LoRA initialisation)": ("LoftQConfig", "replace_lora_weights_loftq"),
    "LoHa": ("LoHaConfig", "LoHaModel"),
    "LoKr": ("LoKrConfig", "LoKrModel"),
    "LoRA-GA (LoRA initialisation)": ("LoraGAConfig", "preprocess_loraga"),
    "LoRA's runtime config (ephemeral GPU offload)": ("LoraRuntimeConfig",),
    "conversion of other adapters to LoRA": ("convert_to_lora", "save_as_lora"),
    "MiSS": ("MissConfig", "MissModel"),
    "MonteCLoRA": ("MontecloraConfig",),
    "multitask prompt tuning": ("MultitaskPromptTuningConfig", "MultitaskPromptTuningInit"),
    "OFT": ("OFTConfig", "OFTModel"),
    "OSF": ("OSFConfig", "OSFModel"),
    "Peanut": ("PeanutConfig", "PeanutModel"),
    "mixed-method models (PeftMixedModel; a peftcore PeftModel holds adapters of several methods itself)": (
        "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
        "PeftMixedModel",
    ),
    "Poly": ("PolyConfig", "PolyModel"),
    "PSOFT": ("PsoftConfig", "PsoftModel"),
    "PVeRA": ("PveraConfig", "PveraModel"),
    "RandLoRA": ("RandLoraConfig", "RandLoraModel"),
    "RoAd": ("RoadConfig", "RoadModel"),
    "Shadow": ("ShadowConfig", "ShadowModel"),
    "SHiRA": ("ShiraConfig", "ShiraModel"),
    "SuperTuning": ("SupertuningConfig", "SupertuningModel"),
    "TinyLoRA": ("TinyLoraConfig", "TinyLoraModel"),
    "UniLoRA": ("UniLoraConfig", "UniLoraModel"),
    "VB-LoRA": ("VBLoRAConfig", "VBLoRAModel"),
    "VeLoRA": ("VeloraConfig",),
    "VeRA": ("VeraConfig", "VeraModel"),
    "WaveFT": ("WaveFTConfig", "WaveFTModel"),
    "X-LoRA": ("XLoraConfig", "XLoraModel"),
    "HF's per-method tuner classes (peftcore has one tuner shell for every method: a PeftModel's "
    "base_model)": ("IA3Model", "LoraModel", "PEFT_TYPE_TO_TUNER_MAPPING", "TrainableTokensModel"),
    "prefix tuning on Bloom's legacy (pre-Cache) key/value layout": (
        "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
        "bloom_model_postprocess_past_key_value",
    ),
}

#: HF PEFT name -> the HF feature it belongs to, which peftcore does not implement.
NOT_IMPLEMENTED: Mapping[str, str] = MappingProxyType(
    {name: feature for feature, names in _MISSING.items() for name in names}
)


def lazy_names() -> list[str]:
    """The names :func:`resolve` can return (for ``dir(peftcore)``)."""
    return sorted([*TORCH_NAMES, *REGISTRY_CONFIGS, "PEFT_TYPE_TO_CONFIG_MAPPING"])


def _config_mapping() -> dict[str, type]:
    """HF's ``PEFT_TYPE_TO_CONFIG_MAPPING``: peft type -> config class, for every method
    registered (plugins' included)."""
    mapping: dict[str, type] = {}
    for name in PeftRegistry.names():
        config_cls = PeftRegistry.get(name)
        mapping[config_cls.peft_type] = config_cls
    return mapping


def resolve(name: str) -> Any:
    """The object ``peftcore.<name>`` means (see the module docstring)."""
    if name in TORCH_NAMES:
        try:
            module = importlib.import_module(TORCH_NAMES[name])
        except ImportError as exc:
            raise ImportError(
                f"peftcore.{name} is Hugging Face PEFT's torch API; it needs peftcore's torch backend "
                f"(peftcore-torch) and torch: {exc}",
                name=name,
            ) from exc
        return getattr(module, name)
    if name in REGISTRY_CONFIGS:
        try:
            return PeftRegistry.get(REGISTRY_CONFIGS[name])
        except UnknownMethodError as exc:
            raise ImportError(
                f"peftcore.{name}: the {REGISTRY_CONFIGS[name]} method comes from a plugin that is not installed "
                f"(the example plugin examples/peftcore-ia3): {exc}",
                name=name,
            ) from exc
    if name == "PEFT_TYPE_TO_CONFIG_MAPPING":
        return _config_mapping()
    if name in NOT_IMPLEMENTED:
        raise ImportError(
            f"cannot import name {name!r} from 'peftcore': it belongs to Hugging Face PEFT's "
            f"{NOT_IMPLEMENTED[name]}, which peftcore does not implement",
            name=name,
        )
    raise AttributeError(f"module 'peftcore' has no attribute {name!r}")
