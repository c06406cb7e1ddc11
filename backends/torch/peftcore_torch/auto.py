"""Hugging Face PEFT's ``AutoPeftModel`` classes for the torch backend.

``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` reads the adapter's
``adapter_config.json``, builds the base model its ``base_model_name_or_path`` names
with the matching ``transformers`` auto class, and loads the adapter onto it with
:meth:`peftcore.peft_model.PeftModel.from_pretrained`. The base model is loaded with
``transformers``' own ``from_pretrained`` (a local directory or, as transformers
allows, a hub name); the adapter directory must be local.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Optional

from peftcore.config import PeftConfig
from peftcore.errors import AdapterError
from peftcore.io import DEFAULT_ADAPTER, read_adapter
from peftcore.peft_model import PeftModel
from peftcore.task_type import TRANSFORMERS_AUTO_CLASSES

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
]

#: task_type -> the transformers auto class that builds its base model.
TASK_AUTO_CLASSES = dict(TRANSFORMERS_AUTO_CLASSES)

#: keywords ``from_pretrained`` passes on to ``PeftModel.from_pretrained`` rather than transformers.
_ADAPTER_KWARGS = ("torch_device", "autocast_adapter_dtype", "low_cpu_mem_usage", "ephemeral_gpu_offload", "strict")


class AutoPeftModel:
    """Load a base model and its adapter from the adapter's directory (HF PEFT's class).

    The generic class picks the transformers auto class from the adapter's
    ``task_type`` (``AutoModel`` when it has none); the task-specific subclasses require
    a matching ``task_type``, as HF PEFT does.
    """

    task_type: ClassVar[Optional[str]] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise EnvironmentError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter_dir)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        revision: Optional[str] = None,
        **kwargs: Any,
    ) -> PeftModel:
        """The base model named by the adapter's config, with the adapter loaded.

        ``kwargs`` go to the transformers model's ``from_pretrained`` (e.g.
        ``torch_dtype``), except HF PEFT's adapter-loading ones (``torch_device``...).
        """
        import transformers

        directory = os.fspath(pretrained_model_name_or_path)
        saved = read_adapter(directory).config
        peft_config = config if config is not None else saved
        task_type = peft_config.task_type
        if cls.task_type is not None and task_type is not None and task_type != cls.task_type:
            raise ValueError(
                f"{directory}: the adapter's task_type is {task_type!r}, {cls.__name__} expects {cls.task_type!r}; "
                f"use AutoPeftModel or the class for {task_type}"
            )
        base_name = peft_config.base_model_name_or_path
        if not base_name:
            raise AdapterError(
                f"{directory}: adapter_config.json names no base_model_name_or_path; build the base model yourself "
                "and use PeftModel.from_pretrained(model, adapter_dir)"
            )
        auto_name = TASK_AUTO_CLASSES.get(cls.task_type or task_type or "FEATURE_EXTRACTION", "AutoModel")
        adapter_kwargs = {key: kwargs.pop(key) for key in _ADAPTER_KWARGS if key in kwargs}
        if revision is not None:
            kwargs["revision"] = revision
        base_model = getattr(transformers, auto_name).from_pretrained(base_name, **kwargs)
        return PeftModel.from_pretrained(
            base_model, directory, adapter_name=adapter_name, is_trainable=is_trainable, config=config,
            backend="torch", **adapter_kwargs,
        )


class AutoPeftModelForCausalLM(AutoPeftModel):
    task_type = "CAUSAL_LM"


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    task_type = "SEQ_CLS"


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    task_type = "SEQ_2_SEQ_LM"


class AutoPeftModelForTokenClassification(AutoPeftModel):
    task_type = "TOKEN_CLS"


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    task_type = "QUESTION_ANS"


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    task_type = "FEATURE_EXTRACTION"
