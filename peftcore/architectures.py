"""What each transformers architecture calls its attention and feed-forward layers, and
the defaults that follow from it when a config leaves its layers unset.

Hugging Face PEFT keeps one table per method from ``model_type`` to layer names. Here
each architecture is described once, by the names its blocks give their projections (a
:class:`LayerNames`); every method's default is then a rule over those names:

- LoRA adapts the query and value projections (a fused query/key/value projection where
  the architecture has one);
- (IA)^3 scales the two attention projections the architecture lists for it and the
  feed-forward output layer, whose *input* it scales (the feed-forward module);
- prefix tuning finds each block's key projection, the first of :data:`KEY_NAMES` it
  holds (see :mod:`peftcore.methods.prefix_tuning`).

The rules reproduce HF PEFT 0.21's defaults for every model type HF lists (checked by
``tests/core/test_architectures.py`` against the installed ``peft``), so an adapter saved
from defaults names the same layers in both libraries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

Targets = Union[str, list]


@dataclass(frozen=True)
class LayerNames:
    """Short names of one architecture's layers, as a ``target_modules`` list holds them.

    ``query_value``: what LoRA adapts (query and value, or the fused projection);
    ``ia3_attention``: the attention projections (IA)^3 scales by their output;
    ``feedforward``: the feed-forward output layers, whose input (IA)^3 scales
    (``None``: the architecture has no (IA)^3 default).
    ``extra_lora``: layers some architectures also adapt with LoRA by default.
    """

    query_value: tuple[str, ...]
    ia3_attention: Optional[tuple[str, ...]] = None
    feedforward: Optional[tuple[str, ...]] = None
    extra_lora: tuple[str, ...] = ()

    @property
    def lora(self) -> list[str]:
        return [*self.query_value, *self.extra_lora]

    @property
    def ia3(self) -> Optional[list[str]]:
        if self.ia3_attention is None or self.feedforward is None:
            return None
        return [*self.ia3_attention, *self.feedforward]


# Naming families shared by many architectures.
_Q, _K, _V = "q_proj", "k_proj", "v_proj"
_GATED_MLP_KV = LayerNames((_Q, _V), (_K, _V), ("down_proj",))  # Llama, Mistral: keys and values
_GATED_MLP_QV = LayerNames((_Q, _V), (_Q, _V), ("down_proj",))  # Gemma, Qwen: queries and values
_BERT_LIKE = LayerNames(("query", "value"), ("key", "value"), ("output.dense",))
_BERT_NO_IA3 = LayerNames(("query", "value"))
_FUSED_QKV_4H = LayerNames(("query_key_value",), ("query_key_value",), ("dense_4h_to_h",))
_GPT2_LIKE = LayerNames(("c_attn",), ("c_attn",), ("mlp.c_proj",))
_T5_LIKE = LayerNames(("q", "v"), ("k", "v"), ("wo",))

#: Layer names by ``model_type`` (transformers' ``config.model_type``).
ARCHITECTURES: dict[str, LayerNames] = {
    # decoder-only, separate q/k/v projections
    "llama": _GATED_MLP_KV,
    "mistral": _GATED_MLP_KV,
    "llama4": LayerNames((_Q, _V), (_Q, _V), ("down_proj",)),
    "mixtral": LayerNames((_Q, _V), (_K, _V), ("w2",)),
    "gemma": _GATED_MLP_QV,
    "gemma2": _GATED_MLP_QV,
    "gemma3_text": _GATED_MLP_QV,
    "qwen2": _GATED_MLP_QV,
    "qwen3": _GATED_MLP_QV,
    "opt": LayerNames((_Q, _V), (_Q, _K), ("fc2",)),
    "gptj": LayerNames((_Q, _V), (_Q, _V), ("fc_out",)),
    "gpt_neo": LayerNames((_Q, _V), (_Q, _V), ("c_proj",)),
    "phi": LayerNames((_Q, _V), (_Q, _V), ("fc2",), extra_lora=("fc1", "fc2")),
    "stablelm": LayerNames((_Q, _V)),
    "nemotron_h": LayerNames((_Q, _K, _V, "o_proj")),
    # decoder-only, fused query/key/value
    "gpt2": _GPT2_LIKE,
    "gpt_bigcode": _GPT2_LIKE,
    "btlm": LayerNames(("c_attn",), extra_lora=("c_proj",)),
    "bloom": LayerNames(("query_key_value",), ("query_key_value",), ("mlp.dense_4h_to_h",)),
    "gpt_neox": _FUSED_QKV_4H,
    "falcon": _FUSED_QKV_4H,
    "RefinedWeb": _FUSED_QKV_4H,
    "RefinedWebModel": _FUSED_QKV_4H,
    "chatglm": LayerNames(("query_key_value",)),
    "mpt": LayerNames(("Wqkv",)),
    "codegen": LayerNames(("qkv_proj",)),
    # encoders
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_NO_IA3,
    "electra": _BERT_NO_IA3,
    "layoutlm": _BERT_NO_IA3,
    "distilbert": LayerNames(("q_lin", "v_lin")),  # peftcore's own (not in HF PEFT's tables)
    "deberta-v2": LayerNames(("query_proj", "value_proj"), ("key_proj", "value_proj"), ("output.dense",)),
    "deberta": LayerNames(("in_proj",), ("in_proj",), ("output.dense",)),
    # encoder-decoders
    "t5": _T5_LIKE,
    "mt5": LayerNames(("q", "v"), ("k", "v", "wi_1"), ()),
    "bart": LayerNames((_Q, _V), (_Q, _V), ("fc2",)),
    "blip-2": LayerNames(("q", "v", _Q, _V)),
    # recurrent
    "rwkv": LayerNames(("key", "value"), extra_lora=("receptance", "output")),
    "rwkv7": LayerNames(("r_proj", _K, _V, "o_proj"), extra_lora=("key", "value")),
}

#: Model types whose LoRA default is a regular expression over full paths rather than
#: names (multimodal models whose vision tower has layers of the same names).
LORA_REGEX_DEFAULTS: dict[str, str] = {
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
}

#: Key projections prefix tuning looks for in a block, in this order, with how many
#: tensors each produces side by side (3 for a fused query/key/value projection).
KEY_NAMES: tuple[tuple[str, int], ...] = (
    ("k_proj", 1),
    ("key", 1),
    ("k", 1),
    ("key_proj", 1),
    ("c_attn", 3),
    ("query_key_value", 3),
    ("qkv_proj", 3),
    ("Wqkv", 3),
    ("in_proj", 3),
)


def lora_default(model_type: Optional[str]) -> Optional[Targets]:
    """LoRA's ``target_modules`` when a config leaves them unset (``None``: no default)."""
    if model_type in LORA_REGEX_DEFAULTS:
        return LORA_REGEX_DEFAULTS[model_type]
    names = ARCHITECTURES.get(model_type or "")
    return names.lora if names is not None else None


def ia3_defaults(model_type: Optional[str]) -> tuple[Optional[list[str]], Optional[list[str]]]:
    """(IA)^3's ``(target_modules, feedforward_modules)`` defaults (``None`` where there is none)."""
    names = ARCHITECTURES.get(model_type or "")
    if names is None or names.ia3 is None:
        return None, None
    return names.ia3, list(names.feedforward or ())
