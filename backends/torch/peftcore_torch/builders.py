"""The torch builders of plan ops: one function per op class the backend builds.

A builder is ``builder(model, layers, op, adapter_name)``: ``layers`` maps every module
path (adapter layers included, ``""`` for the model) to its module. Builders wrap the
layer at ``op.path`` with an adapter layer (:func:`~peftcore_torch.walk.wrap_layer`) and
add the adapter to it. ``freeze_base`` is the core's, built on the runtime's primitives.
"""

from __future__ import annotations

from torch import nn

from peftcore.adapter_layer import layer_builder
from peftcore.errors import PlanError
from peftcore.methods.bitfit import TrainBias
from peftcore.methods.lora import AddLora
from peftcore.methods.lora_conv import AddLoraConv
from peftcore.methods.lora_params import AddParamLora
from peftcore.methods.p_tuning import AddPromptEncoder
from peftcore.methods.prefix_tuning import AddPrefixEncoder
from peftcore.methods.prompt_tuning import AddPrompt
from peftcore.methods.trainable_tokens import TrainTokens
from peftcore.methods.unipelt_ops import AddBottleneckAdapter, AddGate, AddPrefix
from peftcore.plan import SaveModule
from peftcore.runtime import OpBuilders
from peftcore_torch.bitfit import BiasAdapter
from peftcore_torch.layers import AdapterLayer
from peftcore_torch.lora import LoraEmbedding, LoraLinear
from peftcore_torch.lora_conv import build_lora_conv
from peftcore_torch.lora_quantised import LoraQuantisedLinear
from peftcore_torch.modules_to_save import ModulesToSaveWrapper
from peftcore_torch.param_lora import build_param_lora
from peftcore_torch.prefix import build_prefix
from peftcore_torch.prefix_tuning import build_prefix_encoder
from peftcore_torch.prompt import PromptEmbedding
from peftcore_torch.prompt_inputs import EncoderPromptHook, PromptInputHook, is_encoder_decoder, takes_token_inputs
from peftcore_torch.quantised import is_quantised_linear
from peftcore_torch.trainable_tokens import build_trainable_tokens
from peftcore_torch.unipelt import build_bottleneck_adapter, build_gate
from peftcore_torch.walk import is_conv1d, replace_module, wrap_layer


def build_lora(model: nn.Module, layers: dict, op: AddLora, adapter_name: str) -> None:
    target = layers.get(op.path)
    base = target.base_layer if isinstance(target, AdapterLayer) else target
    if isinstance(base, nn.Embedding):
        wrapper_type: type[AdapterLayer] = LoraEmbedding
    elif is_quantised_linear(base):
        wrapper_type = LoraQuantisedLinear
    elif isinstance(base, nn.Linear) or (base is not None and is_conv1d(base)):
        wrapper_type = LoraLinear
    else:
        kind = type(base).__name__ if base is not None else "missing"
        raise PlanError(
            f"torch backend cannot put LoRA on {op.path!r} ({kind}); it supports Linear, Conv1D, Embedding "
            "and bitsandbytes' Linear4bit/Linear8bitLt"
        )
    wrap_layer(model, layers, op.path, wrapper_type).add(adapter_name, op)


def build_prompt(model: nn.Module, layers: dict, op: AddPrompt, adapter_name: str) -> None:
    target = layers.get(op.path)
    base = target.base_layer if isinstance(target, AdapterLayer) else target
    if not isinstance(base, nn.Embedding):
        kind = type(base).__name__ if base is not None else "missing"
        raise PlanError(f"torch backend prompts an nn.Embedding; {op.path!r} is {kind}")
    encoder_decoder = is_encoder_decoder(model)
    if op.num_transformer_submodules == 2 and not encoder_decoder:
        raise PlanError(
            f"prompt on {op.path!r} has num_transformer_submodules=2, which needs an encoder-decoder model; "
            "this one is not (use 1)"
        )
    layer = wrap_layer(model, layers, op.path, PromptEmbedding)
    assert isinstance(layer, PromptEmbedding)
    if layer.input_hook is None and encoder_decoder:
        layer.input_hook = EncoderPromptHook(model, layer)
    elif layer.input_hook is None and takes_token_inputs(model):
        layer.input_hook = PromptInputHook(model, layer)
    layer.add(adapter_name, op)


BUILDERS: OpBuilders = {
    AddLora: build_lora,
    AddLoraConv: build_lora_conv,
    AddParamLora: build_param_lora,
    TrainTokens: build_trainable_tokens,
    SaveModule: layer_builder(replace_module, ModulesToSaveWrapper),
    TrainBias: layer_builder(replace_module, BiasAdapter),
    AddPrompt: build_prompt,
    AddPromptEncoder: build_prompt,
    AddPrefix: build_prefix,
    AddPrefixEncoder: build_prefix_encoder,
    AddBottleneckAdapter: build_bottleneck_adapter,
    AddGate: build_gate,
}
