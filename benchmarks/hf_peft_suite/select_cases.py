"""Which of Hugging Face PEFT's test cases measure peftcore: those of the methods it claims.

Files measured (:data:`FILES`): ``test_custom_models.py`` (LoRA, and DoRA, on ``nn.Linear``,
``nn.Embedding`` and transformers' ``Conv1D`` layers, on bare parameters (``target_parameters``)
and with ``trainable_token_indices``, and (IA)^3 through the example plugin
``peftcore-ia3``, on :data:`CLAIMED_MODELS`; LoRA on torch's convolutions on
:data:`LORA_CONV_MODELS`, with DoRA except on :data:`GROUPED_CONV_MODELS`), and the model-level files
``test_decoder_models.py``, ``test_encoder_decoder_models.py``,
``test_feature_extraction_models.py``, ``test_seq_classifier.py`` and ``test_config.py``
(LoRA, (IA)^3, prompt tuning, prefix tuning and P-tuning).

Each case is selected by its **own** config, never by text elsewhere in its test:

- a case parametrised with configs (config classes, config instances, or keyword dicts
  beside a config class) is kept when every config is of a claimed method, no keyword
  switches a LoRA variant on (:data:`VARIANT_KEYS` set to a value that is not
  ``None``/``False``/empty, or an ``init_lora_weights`` of :data:`VARIANT_INITS`), its
  ``model_id`` (if any) is a claimed model, and the test's body (decorators and skip
  guards excluded) does not itself switch a variant on for every case;
- a case without config parameters is kept when its body (decorators excluded) names
  only claimed config classes, switches no variant on, and names no layer type peftcore
  does not claim (:data:`UNCLAIMED_SOURCE_WORDS`).

The rule reads names, keyword dicts and source text only, so it selects the same cases
whichever ``peft`` (HF's own or the peftcore shim) the test module imported; the runner
also hands the baseline run's selection to the peftcore run (see ``plugin.py``).
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from typing import Any, Optional

#: Model ids of ``test_custom_models.py`` whose targeted layers are Linear, Embedding or Conv1D
#: (``MlpUsingParameters``: bare 2-D parameters, LoRA's ``target_parameters``).
CLAIMED_MODELS = frozenset({
    "MLP", "EmbConv1D", "MLP2", "MLP_LayerNorm", "MlpUsingParameters",
})
#: Model ids whose targeted layers are torch convolutions: claimed for LoRA (and DoRA) only
#: ((IA)^3's plugin has no conv layer).
LORA_CONV_MODELS = frozenset({"Conv1d", "Conv2d", "Conv2dGroups", "Conv2dGroups2", "Conv3d"})
#: Conv models whose targeted convolution is grouped: DoRA is refused there (its norm needs
#: the adapter's change of the weight, which LoRA on a grouped convolution has not; see
#: ``peftcore.methods.lora_conv.grouped_dora_refusal``), so their DoRA cases are not claimed.
GROUPED_CONV_MODELS = frozenset({"Conv2dGroups", "Conv2dGroups2"})

#: Config classes claimed, by measured file.
LORA_IA3 = frozenset({"LoraConfig", "IA3Config"})
PROMPT_METHODS = frozenset({"PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig"})
FILES: dict[str, frozenset] = {
    "test_custom_models.py": LORA_IA3,
    "test_decoder_models.py": LORA_IA3 | PROMPT_METHODS,
    "test_encoder_decoder_models.py": LORA_IA3 | PROMPT_METHODS,
    "test_feature_extraction_models.py": LORA_IA3 | PROMPT_METHODS,
    "test_seq_classifier.py": LORA_IA3 | PROMPT_METHODS,
    "test_config.py": LORA_IA3 | PROMPT_METHODS,
}

#: LoRA config keywords of variants peftcore does not implement (``runtime_config`` is not
#: one: it is a runtime knob every HF ``LoraConfig`` carries; ``use_dora`` is implemented).
VARIANT_KEYS = (
    "velora_config", "lora_bias", "use_bdlora", "kasa_config", "monteclora_config",
    "alora_invocation_tokens", "use_qalora", "arrow_config",
    "corda_config", "eva_config", "loftq_config", "layer_replication", "use_kasa", "lora_ga_config",
    "megatron_config", "ensure_weight_tying",
)

#: ``init_lora_weights`` values that switch on a LoRA variant (a different forward), not an init.
VARIANT_INITS = frozenset({"mica"})

#: Words (lower case) whose presence in a test's body shows it is about something
#: peftcore does not claim.
UNCLAIMED_SOURCE_WORDS = (
    "conv2d", "conv3d", "nn.conv1d", "multiheadattention", "modelmha", "gru(", "lstm",
    "bitsandbytes", "require_non_cpu", "torch.compile",
)

CONFIG_NAME = re.compile(r"\b([A-Z][A-Za-z0-9]*Config)\b")
#: Config names in test sources that are not PEFT methods.
NEUTRAL_CONFIGS = frozenset({
    "PeftConfig", "AutoConfig", "LlamaConfig", "GPT2Config", "BertConfig", "PretrainedConfig", "PreTrainedConfig",
    "PromptLearningConfig", "GenerationConfig", "BitsAndBytesConfig",
})
#: A variant keyword switched on in source: ``use_dora=True`` or ``"use_dora": True``.
VARIANT_ON = re.compile(
    r"""["']?\b(%s)\b["']?\s*[:=](?!=)\s*(?=\S)(?!None\b|False\b|\[\]|\{\}|\(\))""" % "|".join(VARIANT_KEYS)
)


def _is_on(value: Any) -> bool:
    return value not in (None, False) and not (isinstance(value, (list, tuple, dict, set, str)) and len(value) == 0)


def _config_names_and_variants(params: dict[str, Any]) -> tuple[set[str], bool]:
    """Config class names the parameters hold (classes or instances), and whether any
    parameter switches a LoRA variant on (a keyword dict, or an instance with one set)."""
    names: set[str] = set()
    variant = False
    for value in params.values():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for one in values:
            name = one.__name__ if isinstance(one, type) else type(one).__name__
            if name.endswith("Config") and name not in NEUTRAL_CONFIGS:
                names.add(name)
                if not isinstance(one, type):
                    variant |= any(_is_on(getattr(one, key, None)) for key in VARIANT_KEYS)
                    variant |= str(getattr(one, "init_lora_weights", "")).lower() in VARIANT_INITS
            if isinstance(one, dict):
                variant |= any(_is_on(one.get(key)) for key in VARIANT_KEYS)
                variant |= str(one.get("init_lora_weights", "")).lower() in VARIANT_INITS
    return names, variant


def _dora_on(params: dict[str, Any]) -> bool:
    """Whether a parameter (a keyword dict or a config instance) switches DoRA on."""
    for value in params.values():
        for one in list(value) if isinstance(value, (list, tuple)) else [value]:
            if isinstance(one, dict) and _is_on(one.get("use_dora")):
                return True
            if not isinstance(one, (type, dict)) and _is_on(getattr(one, "use_dora", None)):
                return True
    return False


def body_source(function: Any) -> Optional[str]:
    """The source of ``function``'s body, without its decorators and signature (``None``
    when there is no source)."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return None
    tree = ast.parse(source)
    definition = tree.body[0]
    if not isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)) or not definition.body:
        return source
    lines = source.splitlines()
    return "\n".join(lines[definition.body[0].lineno - 1 :])


def _without_skip_guards(source: str) -> str:
    """``source`` less the ``if ...: pytest.skip(...)`` guards (they name other methods)."""
    kept: list[str] = []
    skipping_indent: Optional[int] = None
    lines = source.splitlines()
    for index, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if skipping_indent is not None:
            if line.strip() and indent <= skipping_indent:
                skipping_indent = None
            else:
                continue
        following = lines[index + 1].strip() if index + 1 < len(lines) else ""
        if line.lstrip().startswith(("if ", "elif ")) and ("pytest.skip" in line or following.startswith("pytest.skip")):
            skipping_indent = indent
            continue
        kept.append(line)
    return "\n".join(kept)


def kept(item: Any) -> bool:
    """Whether a collected pytest item is one of the measured cases."""
    filename = str(getattr(getattr(item, "fspath", None), "basename", "") or "test_custom_models.py")
    claimed = FILES.get(filename)
    if claimed is None:
        return False
    callspec = getattr(item, "callspec", None)
    params: dict[str, Any] = dict(callspec.params) if callspec is not None else {}
    configs, variant = _config_names_and_variants(params)
    if filename == "test_custom_models.py" and "model_id" in params:
        model_id = params["model_id"]
        if model_id in LORA_CONV_MODELS and configs - {"LoraConfig"}:
            return False  # conv models: LoRA only
        if model_id in GROUPED_CONV_MODELS and _dora_on(params):
            return False  # DoRA on a grouped convolution is refused
        if model_id not in CLAIMED_MODELS | LORA_CONV_MODELS:
            return False
    if variant:
        return False
    source = body_source(getattr(item, "function", None))
    body = _without_skip_guards(source) if source is not None else ""
    if configs:  # selected by its own config
        return configs <= claimed and not VARIANT_ON.search(body)
    if source is None:
        return False
    named = set(CONFIG_NAME.findall(body)) - NEUTRAL_CONFIGS
    return (
        bool(named)
        and named <= claimed
        and not VARIANT_ON.search(body)
        and not any(word in body.lower() for word in UNCLAIMED_SOURCE_WORDS)
    )
