"""The SINGA builders of plan ops: one function per op class the backend builds.

A builder is ``builder(model, layers, op, adapter_name)``: ``layers`` maps every layer
path (adapter layers included, ``""`` for the model) to its layer. SINGA layers create
their parameters at their first call, so a builder refuses a layer that has not run yet
(the core plans only once the layers know their shapes). ``freeze_base`` is the core's.
"""

from __future__ import annotations

from typing import Any

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import layer  # noqa: E402

from peftcore.adapter_layer import layer_builder  # noqa: E402
from peftcore.errors import PlanError  # noqa: E402
from peftcore.methods.bitfit import TrainBias  # noqa: E402
from peftcore.methods.lora import AddLora  # noqa: E402
from peftcore.methods.lora_conv import AddLoraConv  # noqa: E402
from peftcore.methods.p_tuning import AddPromptEncoder  # noqa: E402
from peftcore.methods.prompt_tuning import AddPrompt  # noqa: E402
from peftcore.plan import SaveModule  # noqa: E402
from peftcore.runtime import OpBuilders  # noqa: E402
from peftcore_singa.bitfit import BiasAdapter, base_bias  # noqa: E402
from peftcore_singa.describe import is_linear  # noqa: E402
from peftcore_singa.layers import AdapterLayer  # noqa: E402
from peftcore_singa.lora import LoraEmbedding, LoraLinear  # noqa: E402
from peftcore_singa.lora_conv import build_lora_conv  # noqa: E402
from peftcore_singa.modules_to_save import ModulesToSaveWrapper  # noqa: E402
from peftcore_singa.prompt import PromptEmbedding  # noqa: E402
from peftcore_singa.walk import replace_layer, wrap_layer  # noqa: E402


def build_lora(model: Any, layers: dict, op: AddLora, adapter_name: str) -> None:
    target = layers.get(op.path)
    base = target.base_layer if isinstance(target, AdapterLayer) else target
    if isinstance(base, layer.Embedding):
        wrapper_type: type[AdapterLayer] = LoraEmbedding
    elif base is not None and is_linear(base):
        wrapper_type = LoraLinear
    else:
        kind = type(base).__name__ if base is not None else "missing"
        raise PlanError(
            f"singa backend cannot put LoRA on {op.path!r} ({kind}); it supports Linear, Gemm, Linear3D, Embedding"
        )
    if not base._initialized:
        raise PlanError(f"layer {op.path!r} is not initialised (no forward has reached it); pass example_inputs")
    wrap_layer(model, layers, op.path, wrapper_type).add(adapter_name, op)


def _initialised_base(layers: dict, path: str) -> Any:
    target = layers.get(path)
    base = target.base_layer if isinstance(target, AdapterLayer) else target
    if base is not None and not base._initialized:
        raise PlanError(f"layer {path!r} is not initialised (no forward has reached it); pass example_inputs")
    return base


def build_bitfit(model: Any, layers: dict, op: TrainBias, adapter_name: str) -> None:
    base = _initialised_base(layers, op.path)
    if base is not None and not isinstance(base, (layer.Linear, layer.Gemm)) and base_bias(base) is None:
        raise PlanError(
            f"singa backend trains the bias of Linear, Gemm and layers with a 'bias' tensor; "
            f"{op.path!r} ({type(base).__name__}) has none"
        )
    wrap_layer(model, layers, op.path, BiasAdapter).add(adapter_name, op)


def build_prompt(model: Any, layers: dict, op: AddPrompt, adapter_name: str) -> None:
    """Prompt tuning, residual prompt tuning, XPrompt and (op ``prompt_encoder``) P-tuning."""
    if op.num_transformer_submodules != 1:
        raise PlanError("singa backend has no encoder-decoder models; prompts need num_transformer_submodules=1")
    base = _initialised_base(layers, op.path)
    if not isinstance(base, layer.Embedding):
        kind = type(base).__name__ if base is not None else "missing"
        raise PlanError(f"singa backend prompts a layer.Embedding; {op.path!r} is {kind}")
    wrap_layer(model, layers, op.path, PromptEmbedding).add(adapter_name, op)


BUILDERS: OpBuilders = {
    AddLora: build_lora,
    AddLoraConv: build_lora_conv,
    SaveModule: layer_builder(replace_layer, ModulesToSaveWrapper),
    TrainBias: build_bitfit,
    AddPrompt: build_prompt,
    AddPromptEncoder: build_prompt,
}
