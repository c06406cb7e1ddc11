"""Tiny builds of the transformers architectures HF PEFT's defaults cover, by model type
(seeded random weights, no downloads), for the default-targets and prefix-layout tests."""

from __future__ import annotations

from typing import Any, Callable

import transformers

from tests.integration.tiny import VOCAB, bart_lm, bert_cls, gpt2_lm, llama_lm, seeded, t5_lm

_SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _decoder(config_class: Any, model_class: Any, **extra: Any) -> Callable[[int], Any]:
    def build(seed: int = 0) -> Any:
        config = config_class(**{**_SMALL, "max_position_embeddings": 64, "pad_token_id": 0, **extra})
        return seeded(lambda: model_class(config), seed)

    return build


def opt_lm(seed: int = 0) -> Any:
    config = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
        word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return seeded(lambda: transformers.OPTForCausalLM(config), seed)


def gptj_lm(seed: int = 0) -> Any:
    config = transformers.GPTJConfig(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return seeded(lambda: transformers.GPTJForCausalLM(config), seed)


def gpt_neo_lm(seed: int = 0) -> Any:
    config = transformers.GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return seeded(lambda: transformers.GPTNeoForCausalLM(config), seed)


def _encoder_cls(config_class: Any, model_class: Any) -> Callable[[int], Any]:
    def build(seed: int = 0) -> Any:
        config = config_class(**{**_SMALL, "max_position_embeddings": 64, "num_labels": 3, "type_vocab_size": 2})
        return seeded(lambda: model_class(config), seed)

    return build


#: model type -> (builder, task type of the built model)
BUILDS: dict[str, tuple[Callable[..., Any], str]] = {
    "llama": (llama_lm, "CAUSAL_LM"),
    "gpt2": (gpt2_lm, "CAUSAL_LM"),
    "opt": (opt_lm, "CAUSAL_LM"),
    "gptj": (gptj_lm, "CAUSAL_LM"),
    "gpt_neo": (gpt_neo_lm, "CAUSAL_LM"),
    "mistral": (_decoder(transformers.MistralConfig, transformers.MistralForCausalLM, num_key_value_heads=2), "CAUSAL_LM"),
    "qwen2": (_decoder(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, num_key_value_heads=2), "CAUSAL_LM"),
    "gemma3_text": (
        _decoder(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, num_key_value_heads=2, head_dim=8),
        "CAUSAL_LM",
    ),
    "bert": (bert_cls, "SEQ_CLS"),
    "roberta": (_encoder_cls(transformers.RobertaConfig, transformers.RobertaForSequenceClassification), "SEQ_CLS"),
    "deberta": (_encoder_cls(transformers.DebertaConfig, transformers.DebertaForSequenceClassification), "SEQ_CLS"),
    "deberta-v2": (_encoder_cls(transformers.DebertaV2Config, transformers.DebertaV2ForSequenceClassification), "SEQ_CLS"),
    "t5": (t5_lm, "SEQ_2_SEQ_LM"),
    "bart": (bart_lm, "SEQ_2_SEQ_LM"),
}
