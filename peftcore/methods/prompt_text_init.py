"""Prompt tuning's TEXT init: the token ids of ``prompt_tuning_init_text``.

The tokenizer is the object passed as ``tokenizer=``, else the one the user named in
``tokenizer_name_or_path``, loaded as Hugging Face PEFT loads it:
``transformers.AutoTokenizer.from_pretrained(tokenizer_name_or_path, **tokenizer_kwargs)``.
A local directory always works; a hub name downloads only where the user's environment lets
transformers do so (``HF_HUB_OFFLINE`` and the cache are transformers' business), and a
failure comes back as a :class:`~peftcore.errors.ConfigError` that keeps transformers' own
message. transformers is imported here, on first use, never when peftcore is imported.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from peftcore.errors import ConfigError

__all__ = ["load_named_tokenizer", "text_init_token_ids"]


def load_named_tokenizer(owner: str, name_or_path: str, kwargs: Optional[Mapping[str, Any]]) -> Any:
    """``AutoTokenizer.from_pretrained(name_or_path, **kwargs)``, its failures as a ConfigError
    (``trust_remote_code`` is dropped from ``kwargs``, as HF PEFT drops it)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ConfigError(
            f"{owner}: loading the tokenizer {name_or_path!r} for prompt_tuning_init='TEXT' needs transformers "
            f"({exc}); install it, or pass a tokenizer object as tokenizer=..."
        ) from exc
    # as in HF PEFT, a tokenizer named in a config never runs code from its repository
    options = {key: value for key, value in (kwargs or {}).items() if key != "trust_remote_code"}
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **options)
    except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors, ...
        raise ConfigError(
            f"{owner}: could not load the tokenizer {name_or_path!r} (tokenizer_name_or_path) for "
            f"prompt_tuning_init='TEXT': {type(exc).__name__}: {exc}"
        ) from exc


def text_init_token_ids(
    owner: str,
    text: str,
    tokenizer: Any,
    name_or_path: Optional[str],
    tokenizer_kwargs: Optional[Mapping[str, Any]],
    count: int,
    vocab_size: int,
) -> tuple[int, ...]:
    """Token ids of ``text``, repeated or cut to ``count``, as HF PEFT's TEXT init takes them.

    ``tokenizer`` (any callable returning ``{"input_ids": [...]}`` or a list of ids) wins
    over ``name_or_path``; special tokens are kept, as HF's call ``tokenizer(text)`` keeps them.
    """
    if tokenizer is None:
        if not name_or_path:
            raise ConfigError(
                f"{owner}: prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a tokenizer directory or "
                "hub name, loaded with transformers.AutoTokenizer) or a tokenizer object (tokenizer=...)"
            )
        tokenizer = load_named_tokenizer(owner, name_or_path, tokenizer_kwargs)
    if not callable(tokenizer):
        raise ConfigError(f"{owner}.tokenizer must be callable (a tokenizer), got {type(tokenizer).__name__}")
    encoded = tokenizer(text)
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) or hasattr(encoded, "keys") else encoded
    ids = list(ids)
    if not ids or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
        raise ConfigError(f"{owner}: the tokenizer gave {ids!r} for the init text; expected ids below {vocab_size}")
    repeats = -(-count // len(ids))
    return tuple((ids * repeats)[:count])
