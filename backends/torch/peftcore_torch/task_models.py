"""Hugging Face PEFT's task classes: ``PeftModelForCausalLM`` and the rest.

``get_peft_model`` and ``PeftModel.from_pretrained`` return an instance of the class for
the config's ``task_type``, as HF PEFT does (:data:`MODEL_TYPE_TO_PEFT_MODEL_MAPPING`);
a config without one gives a plain :class:`~peftcore_torch.peft_model.TorchPeftModel`.
Each class is a :class:`TorchPeftModel`: the forward, ``generate``, saving and the
adapter API are the same, and the task decides what the adapter trains and saves (the
classifier head for ``SEQ_CLS``...) as it does for the base class.

As in HF PEFT, a task class can also be built directly:
``PeftModelForCausalLM(model, peft_config, adapter_name="default")``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Union

from torch import nn

from peftcore.config import PeftConfig
from peftcore.errors import ConfigError
from peftcore.graph import ModelGraph
from peftcore.io import DEFAULT_ADAPTER
from peftcore.plugins import get_plugin_manager
from peftcore_torch.peft_model import TorchPeftModel

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "TaskPeftModel",
    "task_peft_model_class",
]


class TaskPeftModel(TorchPeftModel):
    """Base of the task classes; ``task_type`` is the HF task type each one is for."""

    task_type: ClassVar[str] = ""

    def __init__(
        self,
        model: nn.Module,
        peft_config: Union[PeftConfig, str],
        adapter_name: Any = DEFAULT_ADAPTER,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        if not isinstance(peft_config, PeftConfig):  # the shell peftcore builds: (model, backend name, graph)
            if not isinstance(peft_config, str) or not isinstance(adapter_name, ModelGraph):
                raise TypeError(
                    f"{type(self).__name__}(model, peft_config, adapter_name='default'): peft_config must be a "
                    f"peftcore PeftConfig, got {type(peft_config).__name__}"
                )
            super().__init__(model, peft_config, adapter_name)
            return
        # HF PEFT's constructor: wrap the model and add the adapter, as get_peft_model does
        if peft_config.task_type is not None and str(peft_config.task_type) != self.task_type:
            raise ConfigError(
                f"{type(self).__name__} is for task_type {self.task_type!r}, the config says "
                f"{str(peft_config.task_type)!r}; use {MODEL_TYPE_TO_PEFT_MODEL_MAPPING[str(peft_config.task_type)].__name__}"
            )
        backend = get_plugin_manager().select_backend(model, backend="torch", config=peft_config)
        graph = backend.describe(model)
        if graph is None:  # the torch backend always knows its layers' shapes
            raise ConfigError(f"{type(self).__name__}: the torch backend could not describe {type(model).__name__}")
        super().__init__(model, backend.name, graph)
        name_or_path = getattr(model, "name_or_path", None)
        if peft_config.base_model_name_or_path is None and isinstance(name_or_path, str) and name_or_path:
            peft_config = peft_config.replace(base_model_name_or_path=name_or_path)
        self.add_adapter(
            adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage
        )


class PeftModelForCausalLM(TaskPeftModel):
    """A causal language model with adapters (``task_type="CAUSAL_LM"``)."""

    task_type = "CAUSAL_LM"


class PeftModelForSeq2SeqLM(TaskPeftModel):
    """An encoder-decoder language model with adapters (``task_type="SEQ_2_SEQ_LM"``)."""

    task_type = "SEQ_2_SEQ_LM"


class PeftModelForSequenceClassification(TaskPeftModel):
    """A sequence classifier with adapters; its head is trained and saved (``task_type="SEQ_CLS"``)."""

    task_type = "SEQ_CLS"


class PeftModelForTokenClassification(TaskPeftModel):
    """A token classifier with adapters; its head is trained and saved (``task_type="TOKEN_CLS"``)."""

    task_type = "TOKEN_CLS"


class PeftModelForQuestionAnswering(TaskPeftModel):
    """An extractive question-answering model with adapters; its span head is trained and
    saved (``task_type="QUESTION_ANS"``)."""

    task_type = "QUESTION_ANS"


class PeftModelForFeatureExtraction(TaskPeftModel):
    """A model giving hidden states (embeddings) with adapters (``task_type="FEATURE_EXTRACTION"``)."""

    task_type = "FEATURE_EXTRACTION"


#: HF PEFT's table: task type -> the class ``get_peft_model`` returns for it.
MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[TaskPeftModel]] = {
    cls.task_type: cls
    for cls in (
        PeftModelForSequenceClassification,
        PeftModelForSeq2SeqLM,
        PeftModelForCausalLM,
        PeftModelForTokenClassification,
        PeftModelForQuestionAnswering,
        PeftModelForFeatureExtraction,
    )
}


def task_peft_model_class(task_type: str) -> type[TorchPeftModel]:
    """The class for ``task_type`` (a plain TorchPeftModel for a task HF has no class for)."""
    return MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(str(task_type), TorchPeftModel)
