"""A module named ``peft`` that maps Hugging Face PEFT's public names onto peftcore.

It holds no PEFT logic: every name either points at a peftcore (or ``peftcore_torch``,
``peftcore_ia3``) object, or, for what peftcore does not have, at an empty placeholder
class, so that HF's test modules import and the cases of methods peftcore lacks fail
(they are deselected anyway, see ``select_cases``). A few
test helpers HF's test files import from ``peft`` (``infer_device``, version checks) get
small stand-ins here, since they are about the test machine, not about PEFT.

:func:`install` puts the module in front of the import system, replacing an imported
HF PEFT.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any, Optional, Sequence

#: ``peft`` module -> {HF name: "module:attribute" in peftcore}.
NAMES: dict[str, dict[str, str]] = {
    "peft": {
        "LoraConfig": "peftcore:LoraConfig",
        "IA3Config": "peftcore_ia3:IA3Config",
        "PeftConfig": "peftcore:PeftConfig",
        "PeftModel": "peftcore:PeftModel",
        "PeftType": "peftcore:PeftType",
        "TaskType": "peftcore:TaskType",
        "PeftWarning": "peftcore:PeftWarning",
        "PrefixTuningConfig": "peftcore:PrefixTuningConfig",
        "PromptEncoderConfig": "peftcore:PromptEncoderConfig",
        "PromptTuningConfig": "peftcore:PromptTuningConfig",
        "get_peft_model": "peftcore:get_peft_model",
        "get_peft_config": "peftcore:get_peft_config",
        "inject_adapter_in_model": "peftcore:inject_adapter_in_model",
        "get_peft_model_state_dict": "peftcore:get_peft_model_state_dict",
        "set_peft_model_state_dict": "peftcore:set_peft_model_state_dict",
        "get_base_model_state_dict": "peftcore_torch:get_base_model_state_dict",
        "set_base_model_state_dict": "peftcore_torch:set_base_model_state_dict",
        "load_peft_weights": "peftcore_torch:load_peft_weights",
        "AutoPeftModel": "peftcore_torch:AutoPeftModel",
        "AutoPeftModelForCausalLM": "peftcore_torch:AutoPeftModelForCausalLM",
        "AutoPeftModelForSequenceClassification": "peftcore_torch:AutoPeftModelForSequenceClassification",
        "PromptTuningInit": "peftcore:PromptTuningInit",
        "prepare_model_for_kbit_training": "peftcore_torch:prepare_model_for_kbit_training",
        "PromptLearningConfig": "benchmarks.hf_peft_suite.shim:PromptLearningConfig",
    },
    "peft.tuners": {},
    "peft.tuners.lora": {
        "LoraConfig": "peftcore:LoraConfig",
        "LoraLayer": "peftcore_torch.lora:LoraLayer",
        "Linear": "peftcore_torch.lora:LoraLinear",
        "Embedding": "peftcore_torch.lora:LoraEmbedding",
        "LoraModel": "peftcore_torch.peft_model:TunerModel",
    },
    "peft.tuners.lora.config": {"LoraConfig": "peftcore:LoraConfig"},
    "peft.tuners.lora.layer": {
        "LoraLayer": "peftcore_torch.lora:LoraLayer",
        "Linear": "peftcore_torch.lora:LoraLinear",
        "Embedding": "peftcore_torch.lora:LoraEmbedding",
    },
    "peft.tuners.lora.monteclora": {},
    "peft.tuners.ia3": {"IA3Config": "peftcore_ia3:IA3Config"},
    "peft.tuners.tuners_utils": {
        "BaseTunerLayer": "peftcore_torch.layers:AdapterLayer",
        "BaseTuner": "peftcore_torch.peft_model:TunerModel",
    },
    "peft.tuners._buffer_dict": {},
    "peft.utils.other": {
        "ModulesToSaveWrapper": "peftcore_torch.modules_to_save:ModulesToSaveWrapper",
        "TrainableTokensWrapper": "peftcore_torch.trainable_tokens:TrainableTokens",
    },
    "peft.utils": {
        "ModulesToSaveWrapper": "peftcore_torch.modules_to_save:ModulesToSaveWrapper",
        "TrainableTokensWrapper": "peftcore_torch.trainable_tokens:TrainableTokens",
        "AuxiliaryTrainingWrapper": "peftcore_torch.modules_to_save:ModulesToSaveWrapper",
        "_get_submodules": "peftcore_torch:get_submodules",
        "get_peft_model_state_dict": "peftcore:get_peft_model_state_dict",
        "set_peft_model_state_dict": "peftcore:set_peft_model_state_dict",
        "PeftType": "peftcore:PeftType",
        "TaskType": "peftcore:TaskType",
    },
    "peft.import_utils": {},
    "peft.mapping": {"get_peft_model": "peftcore:get_peft_model", "inject_adapter_in_model": "peftcore:inject_adapter_in_model"},
    "peft.peft_model": {"PeftModel": "peftcore:PeftModel"},
    "peft.config": {"PeftConfig": "peftcore:PeftConfig"},
}


def _infer_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _is_transformers_ge_v5() -> bool:
    import transformers
    from packaging import version

    return version.parse(transformers.__version__) >= version.parse("5.0.0.dev0")


#: Stand-ins for HF's test-machine helpers.
HELPERS: dict[str, dict[str, Any]] = {
    "peft.utils.other": {"ModulesToSaveWrapper": "peftcore_torch.modules_to_save:ModulesToSaveWrapper"},
    "peft.utils": {"infer_device": _infer_device},
    "peft.import_utils": {"is_transformers_ge_v5": _is_transformers_ge_v5},
}


class _PromptLearningKind(type):
    def __instancecheck__(cls, instance: Any) -> bool:
        return bool(getattr(instance, "is_prompt_learning", False))

    def __subclasscheck__(cls, subclass: Any) -> bool:
        return bool(getattr(subclass, "is_prompt_learning", False))


class PromptLearningConfig(metaclass=_PromptLearningKind):
    """HF's base class of the prompt-learning configs, for ``isinstance``/``issubclass`` checks: peftcore's
    configs say it with their ``is_prompt_learning`` attribute instead of a base class."""


def placeholder(module: str, name: str) -> Any:
    """A class named ``name`` for what peftcore lacks: it can be built (HF's test module
    builds some configs at import time) but holds nothing, and peftcore refuses it."""

    def accept(self: Any, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"peftcore has no {module}.{name}")

    return type(name, (), {"__init__": accept, "__module__": module, "from_pretrained": classmethod(refuse)})


class ShimModule(types.ModuleType):
    """One ``peft`` module: mapped names resolved on first use, placeholders for the rest."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if f"{self.__name__}.{name}" in NAMES:  # a submodule (``from peft.tuners import lora``)
            value: Any = importlib.import_module(f"{self.__name__}.{name}")
        elif name.startswith("is_") and name.endswith("_available"):
            value = lambda *args, **kwargs: False  # noqa: E731 (optional integrations: absent)
        elif name in NAMES.get(self.__name__, {}):
            module, attribute = NAMES[self.__name__][name].split(":")
            value = getattr(importlib.import_module(module), attribute)
        elif name in HELPERS.get(self.__name__, {}):
            value = HELPERS[self.__name__][name]
        else:
            value = placeholder(self.__name__, name)
        setattr(self, name, value)
        return value


class ShimFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``peft`` and every ``peft.*`` module as a :class:`ShimModule`."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None, target: Any = None) -> Any:
        if fullname == "peft" or fullname.startswith("peft."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = ShimModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__version__ = "0.21.2"  # the HF PEFT release peftcore's names follow


def install() -> None:
    """Make ``import peft`` (and its submodules) give the shim."""
    for name in [n for n in sys.modules if n == "peft" or n.startswith("peft.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, ShimFinder())
