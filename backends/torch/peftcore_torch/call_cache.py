"""What an adapter layer works out once per ``generate`` call instead of once per token.

Greedy or sampled decoding calls every adapter layer once per new token, with the same
adapters, the same weights and inputs of the same dtype each time, so the checks a layer
makes before choosing its kernel, and the operand layouts the kernel wants, are the same
at every step. :meth:`PeftModel.generate` opens a :class:`CallCache` for the call; a
layer keeps there what it prepared at the first step (keyed by the layer) and reuses it
at the next ones.

Why this is safe: a call holds the model's lock for reading (:mod:`peftcore.model_lock`),
so no other thread changes the adapters while it runs. A change made from inside the
call, by the same thread (a logits processor that switches adapters), takes the lock for
writing, which moves the lock's ``changes`` counter: the cache sees it and starts empty.
Writing into a parameter behind the library's back (``p.data.copy_(...)``) from inside
the call is not seen, as it would not be by a compiled model either.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Optional

from peftcore.model_lock import ModelLock, model_lock
from peftcore_torch.tracing import compiling


class CallCache:
    """Per-layer entries kept for one call, emptied when the model changes."""

    __slots__ = ("lock", "changes", "entries")

    def __init__(self, lock: ModelLock) -> None:
        self.lock = lock
        self.changes = lock.changes
        self.entries: dict[Any, Any] = {}

    def current(self) -> dict[Any, Any]:
        """The entries, emptied first if the model changed since they were made."""
        if self.lock.changes != self.changes:
            self.entries.clear()
            self.changes = self.lock.changes
        return self.entries


_CALL: contextvars.ContextVar[Optional[CallCache]] = contextvars.ContextVar("peftcore_torch_call_cache", default=None)


@contextlib.contextmanager
def caching_call(model: Any) -> Iterator[None]:
    """Let the adapter layers keep per-call work for the length of the block (one
    ``generate`` of ``model``, run holding its lock for reading). Only this thread's (or
    task's) context sees it."""
    cache = CallCache(model_lock(model))
    token = _CALL.set(cache)
    try:
        yield
    finally:
        _CALL.reset(token)
        cache.entries.clear()  # the prepared copies go with the call, whoever still holds the cache


def call_entries() -> Optional[dict[Any, Any]]:
    """The current call's entries, or None outside a cached call and under
    ``torch.compile`` (a compiled graph holds its own state)."""
    if compiling():  # dynamo cannot trace a ContextVar; checked first
        return None
    cache = _CALL.get()
    return None if cache is None else cache.current()
