"""Which of Hugging Face PEFT's ``tests/test_custom_models.py`` cases measure peftcore.

The cases kept are those of the methods peftcore claims with HF's meaning: LoRA on
``nn.Linear``, ``nn.Embedding`` and transformers' ``Conv1D`` layers, and (IA)^3 through the
example plugin ``peftcore-ia3``. Concretely, a collected test is kept when

- it is parametrised with a config class (``config_cls``) named ``LoraConfig`` or
  ``IA3Config``, on one of :data:`CLAIMED_MODELS`, and its config keywords use none of
  :data:`VARIANT_KEYS` nor :data:`VARIANT_INITS` (LoRA variants peftcore does not have:
  DoRA, VeLoRA, MiCA...); or
- it is not parametrised with a config class, and its source names no config class but
  ``LoraConfig``/``IA3Config``, none of :data:`VARIANT_KEYS`, and no layer type peftcore
  does not claim (:data:`UNCLAIMED_SOURCE_WORDS`).

The rule reads only names, so it selects the same cases whichever ``peft`` (HF's own or
the peftcore shim) the test module imported.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

#: Model ids of HF's test models whose targeted layers are Linear, Embedding or Conv1D.
CLAIMED_MODELS = frozenset({
    "MLP", "EmbConv1D", "MLP2", "MLP_LayerNorm",
})

#: LoRA config keywords of variants peftcore does not implement.
VARIANT_KEYS = (
    "use_dora", "velora_config", "lora_bias", "use_bdlora", "target_parameters", "kasa_config",
    "trainable_token_indices", "monteclora_config", "alora_invocation_tokens", "use_qalora", "arrow_config",
    "corda_config", "eva_config", "loftq_config", "layer_replication", "use_kasa", "lora_ga_config",
    "runtime_config", "megatron_config", "ensure_weight_tying",
)

#: ``init_lora_weights`` values that switch on a LoRA variant (a different forward), not an init.
VARIANT_INITS = frozenset({"mica"})

#: Words (lower case) whose presence in a test's source shows it is about something
#: peftcore does not claim.
UNCLAIMED_SOURCE_WORDS = (
    "conv2d", "conv3d", "nn.conv1d", "multiheadattention", "modelmha", "gru(", "lstm",
    "bitsandbytes", "require_non_cpu", "torch.compile",
)

CONFIG_NAME = re.compile(r"\b([A-Z][A-Za-z0-9]*Config)\b")
CLAIMED_CONFIGS = frozenset({"LoraConfig", "IA3Config"})
#: Config names in test sources that are not PEFT methods.
NEUTRAL_CONFIGS = frozenset({"PeftConfig", "AutoConfig", "LlamaConfig", "GPT2Config", "BertConfig", "PretrainedConfig"})


def _config_names_and_variants(params: dict[str, Any]) -> tuple[set[str], bool]:
    """Config class names the parameters hold (classes or instances), and whether any
    parameter asks for a LoRA variant (a keyword dict naming one, or an instance with one set)."""
    names: set[str] = set()
    variant = False
    for value in params.values():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for one in values:
            name = one.__name__ if isinstance(one, type) else type(one).__name__
            if name.endswith("Config"):
                names.add(name)
                if not isinstance(one, type):
                    variant |= any(getattr(one, key, None) not in (None, False, [], {}, ()) for key in VARIANT_KEYS)
                if not isinstance(one, type):
                    variant |= str(getattr(one, "init_lora_weights", "")).lower() in VARIANT_INITS
            if isinstance(one, dict):
                variant |= any(key in one for key in VARIANT_KEYS)
                variant |= str(one.get("init_lora_weights", "")).lower() in VARIANT_INITS
    return names - NEUTRAL_CONFIGS, variant


def kept(item: Any) -> bool:
    """Whether a collected pytest item of ``test_custom_models.py`` is one of the measured cases."""
    callspec = getattr(item, "callspec", None)
    params: dict[str, Any] = dict(callspec.params) if callspec is not None else {}
    if "model_id" in params and params["model_id"] not in CLAIMED_MODELS:
        return False
    configs, variant = _config_names_and_variants(params)
    if variant or not configs <= CLAIMED_CONFIGS:
        return False
    if "config_cls" in params and "model_id" in params:
        return bool(configs)
    function = getattr(item, "function", None)
    try:
        source = inspect.getsource(function) if function is not None else ""
    except (OSError, TypeError):
        return False
    configs |= set(CONFIG_NAME.findall(source)) - NEUTRAL_CONFIGS
    return (
        bool(configs)
        and configs <= CLAIMED_CONFIGS
        and not any(key in source for key in VARIANT_KEYS)
        and not any(word in source.lower() for word in UNCLAIMED_SOURCE_WORDS)
    )
