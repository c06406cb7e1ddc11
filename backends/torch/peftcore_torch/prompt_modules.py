"""Hugging Face PEFT's standalone prompt modules: ``PromptEmbedding``, ``PromptEncoder`` and
``PrefixEncoder``, built from a peftcore config with HF's constructor, submodule names (so
state dicts move between the two) and forward.

peftcore's own models do not use them: its prompt methods are adapter layers of the model
(:mod:`peftcore_torch.prompt`, :mod:`peftcore_torch.prefix_tuning`). These are for code that
builds HF's modules by hand. The config must give the sizes HF PEFT fills in from the model
(``token_dim``, ``num_layers``, ``num_transformer_submodules``, ``encoder_hidden_size``);
a missing one is a :class:`~peftcore.errors.ConfigError`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftcore.errors import ConfigError
from peftcore.methods.prompt_text_init import text_init_token_ids

__all__ = ["PrefixEncoder", "PromptEmbedding", "PromptEncoder"]


def _size(config: Any, name: str, default: Any = None) -> int:
    value = getattr(config, name, None)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(
            f"{type(config).__name__}.{name} must be set (a positive int) to build this module by hand; "
            "get_peft_model fills it in from the model"
        )
    return value


def _total_tokens(config: Any) -> int:
    return _size(config, "num_virtual_tokens") * _size(config, "num_transformer_submodules", 1)


class PromptEmbedding(nn.Module):
    """Prompt tuning's table of virtual-token embeddings (HF PEFT's ``PromptEmbedding``):
    ``num_virtual_tokens * num_transformer_submodules`` rows of ``token_dim``, started from
    rows of ``word_embeddings`` for ``SAMPLE_VOCAB`` and ``TEXT`` (unless the config is in
    inference mode); ``forward(indices)`` looks them up."""

    def __init__(self, config: Any, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        total = _total_tokens(config)
        self.embedding = nn.Embedding(total, _size(config, "token_dim"))
        init = str(getattr(config, "prompt_tuning_init", "RANDOM"))
        if config.inference_mode or init == "RANDOM":
            return
        vocab_size = word_embeddings.num_embeddings
        if init == "SAMPLE_VOCAB":
            ids = torch.randint(0, vocab_size, (total,), dtype=torch.long)
        else:  # TEXT, tokenised as peftcore's prompt tuning does (the named tokenizer, or tokenizer=)
            ids = torch.tensor(
                text_init_token_ids(
                    type(config).__name__, str(config.prompt_tuning_init_text), getattr(config, "tokenizer", None),
                    config.tokenizer_name_or_path, config.tokenizer_kwargs, total, vocab_size,
                ),
                dtype=torch.long,
            )
        with torch.no_grad():
            rows = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone()
        self.embedding.weight = nn.Parameter(rows.to(torch.float32))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


class PromptEncoder(nn.Module):
    """P-tuning's prompt encoder (HF PEFT's ``PromptEncoder``): an embedding table passed
    through an MLP (``mlp_head``: 3 linear layers with ReLU) or a bidirectional LSTM
    (``lstm_head``) and a 2-layer MLP. In inference mode only the table is built, as in HF."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        token_dim = _size(config, "token_dim")
        hidden = _size(config, "encoder_hidden_size", token_dim)
        self.token_dim = token_dim
        self.hidden_size = hidden
        self.total_virtual_tokens = _total_tokens(config)
        self.encoder_type = str(config.encoder_reparameterization_type).upper()
        self.embedding = nn.Embedding(self.total_virtual_tokens, token_dim)
        if config.inference_mode:
            return
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=token_dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout, bidirectional=True, batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, token_dim))
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, token_dim)
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if self.encoder_type == "LSTM":
            embeds = self.lstm_head(embeds)[0]
        return self.mlp_head(embeds)


class PrefixEncoder(nn.Module):
    """Prefix tuning's table (HF PEFT's ``PrefixEncoder``): per virtual token, the keys and
    values of every layer side by side (``num_layers * 2 * token_dim``), directly or (with
    ``prefix_projection``, while training) through a tanh MLP of ``encoder_hidden_size``."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        token_dim, layers = _size(config, "token_dim"), _size(config, "num_layers")
        tokens = _size(config, "num_virtual_tokens")
        self.prefix_projection = bool(config.prefix_projection)
        self._projects = self.prefix_projection and not config.inference_mode  # a loaded table is already projected
        zero = getattr(config, "init_weights", None) == "zero"
        if self._projects:
            hidden = _size(config, "encoder_hidden_size", token_dim)
            self.embedding = nn.Embedding(tokens, token_dim)
            output = nn.Linear(hidden, layers * 2 * token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), output)
            if zero:
                nn.init.zeros_(output.weight)
                nn.init.zeros_(output.bias)
        else:
            self.embedding = nn.Embedding(tokens, layers * 2 * token_dim)
            if zero:
                nn.init.zeros_(self.embedding.weight)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        if self._projects:
            return self.transform(self.embedding(prefix))
        return self.embedding(prefix)
