"""Getting a transformers model ready for training with adapters: HF PEFT's
``prepare_model_for_kbit_training`` and ``PeftModel.prepare_model_for_gradient_checkpointing``.

Neither needs quantisation. On a model in full precision the first freezes every
parameter and widens float16/bfloat16 parameters to float32 (the adapters then train in
float32); on a quantised model (bitsandbytes 4/8-bit, GPTQ, AQLM, EETQ, HQQ, torchao)
it leaves the weights' types alone and, when asked, switches on gradient checkpointing
with inputs that require gradients (so that reentrant checkpointing of a frozen model
still backpropagates into the adapters).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Optional

import torch
from torch import nn

#: ``model.quantization_method`` values of quantisations whose weights must keep their type.
_KEEP_TYPE_QUANTISATIONS = frozenset({"gptq", "aqlm", "eetq", "hqq", "torchao"})


def _quantisation(model: nn.Module) -> tuple[bool, bool]:
    """(quantised at all, quantised by a method whose weights keep their type)."""
    method = getattr(model, "quantization_method", None)
    # transformers' QuantizationMethod is a str enum whose str() is "QuantizationMethod.HQQ": compare its value
    keep_type = str(getattr(method, "value", method)) in _KEEP_TYPE_QUANTISATIONS or bool(getattr(model, "hqq_quantized", False))
    kbit = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))
    return kbit or keep_type, keep_type


def inputs_require_grad(model: Any) -> None:
    """Make the input embeddings' output require gradients (transformers'
    ``enable_input_require_grads`` where the model has it, else a forward hook)."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):
        model.get_input_embeddings().register_forward_hook(_output_requires_grad)


def _output_requires_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[dict] = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Freeze ``model``, widen its half-precision parameters to float32 (unless a
    quantisation keeps their type), and on a quantised model switch on gradient
    checkpointing when ``use_gradient_checkpointing``; returns the model (changed in place).
    ``auto_clear_cache`` empties the CUDA allocator's cache after widening."""
    quantised, keep_type = _quantisation(model)
    checkpointing_kwargs = dict(gradient_checkpointing_kwargs or {})
    for parameter in model.parameters():
        parameter.requires_grad = False
    if not keep_type:
        for parameter in model.parameters():
            if parameter.dtype in (torch.float16, torch.bfloat16) and type(parameter).__name__ != "Params4bit":
                parameter.data = parameter.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if quantised and use_gradient_checkpointing:
        if checkpointing_kwargs.get("use_reentrant", True):  # non-reentrant checkpointing needs no grad inputs
            inputs_require_grad(model)
        if hasattr(type(model), "activation_checkpointing_enable"):  # transformers' newer name, no deprecation
            transformers_model: Any = model
            transformers_model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
            return model
        enable: Any = model.gradient_checkpointing_enable
        if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
            enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        else:
            if checkpointing_kwargs:
                warnings.warn(
                    "this transformers version's gradient_checkpointing_enable takes no gradient_checkpointing_kwargs; "
                    "they are ignored",
                    FutureWarning,
                    stacklevel=2,
                )
            enable()
    return model


def checkpointing_on(model: nn.Module) -> bool:
    """Whether ``model`` checkpoints activations: transformers' ``is_activation_checkpointing``
    (its newer name, read first so the deprecated one warns nothing), else
    ``is_gradient_checkpointing``, else True (HF PEFT's default for a model that does not say)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or name in vars(model):
            return bool(getattr(model, name))
    return True


def prepare_model_for_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """On a model that is not quantised, make the input embeddings' output require
    gradients, which checkpointing a frozen model needs (HF PEFT does this when wrapping a
    model whose gradient checkpointing is on, or that does not say)."""
    if not (
        getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_quantized", False)
    ):
        inputs_require_grad(model)
    return model
