"""Tiny ``transformers`` models built locally with seeded random weights (no downloads).

Importing it where torch or transformers is missing (a SINGA environment, say) skips the
test module that imports it, with the reason, instead of failing its collection.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch", reason="tests/integration/tiny.py builds torch models; torch is not installed")
transformers = pytest.importorskip(
    "transformers", reason="tests/integration/tiny.py builds transformers models; transformers is not installed"
)

VOCAB = 60


def seeded(build: Callable[[], Any], seed: int = 0) -> Any:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build()
    return model.eval()


def llama_lm(seed: int = 0) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    return seeded(lambda: transformers.LlamaForCausalLM(config), seed)


def gpt2_lm(seed: int = 0) -> Any:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    return seeded(lambda: transformers.GPT2LMHeadModel(config), seed)


def gpt2_cls(seed: int = 0) -> Any:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, num_labels=3,
    )
    return seeded(lambda: transformers.GPT2ForSequenceClassification(config), seed)


def bert_cls(seed: int = 0) -> Any:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=3, type_vocab_size=2,
    )
    return seeded(lambda: transformers.BertForSequenceClassification(config), seed)


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def t5_lm(seed: int = 0) -> Any:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )
    return seeded(lambda: transformers.T5ForConditionalGeneration(config), seed)


def bart_lm(seed: int = 0) -> Any:
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )
    return seeded(lambda: transformers.BartForConditionalGeneration(config), seed)


def train_steps(model: Any, batch: dict[str, Any], steps: int, lr: float, dropout: bool = True) -> list[float]:
    """``steps`` Adam steps on ``model(**batch).loss`` over the trainable parameters; the
    losses seen. ``dropout=False`` trains in eval mode, for a tiny model whose loss moves
    less than its dropout noise. The model is left in eval mode."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train(dropout)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    model.eval()
    return losses
