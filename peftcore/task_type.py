"""Hugging Face PEFT's task types (``TaskType``), with their names and meaning."""

from __future__ import annotations

from peftcore.peft_type import StrValueEnum

__all__ = ["TaskType", "TASK_TYPES", "TRANSFORMERS_AUTO_CLASSES"]


class TaskType(StrValueEnum):
    """The kind of model an adapter is for, as Hugging Face PEFT names it.

    A config's ``task_type`` is one of these (the enum member or its string). It decides
    which task head is trained in full (``SEQ_CLS``/``TOKEN_CLS``/``QUESTION_ANS``) and
    which model class ``AutoPeftModel`` builds.
    """

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


TASK_TYPES: tuple[str, ...] = tuple(t.value for t in TaskType)

#: task_type -> the name of the transformers auto class that builds its base model
#: (``AutoPeftModel``, and the CLI's ``--model DIR``).
TRANSFORMERS_AUTO_CLASSES: dict[str, str] = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
