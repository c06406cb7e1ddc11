"""Check, before a real forward, that a model can take the positions prompt tuning adds.

Prompt tuning, P-tuning and residual prompt tuning put ``n`` virtual tokens in front of
the input embedding's output, so every layer after it sees ``seq + n`` positions. A model
that sizes something after the embedding from the raw input instead (SINGA's
``examples/trans`` looks its position table up with the input ids themselves) then adds
tensors of ``seq`` and ``seq + n`` positions, and SINGA's C++ op aborts the interpreter
(``tensor.cc`` "Check failed"), which no ``try`` can catch. A position table shorter than
``seq + n`` rows aborts the same way, or reads out of range.

:func:`check_prompt_fits` runs the model's forward once in eval mode on zeros shaped like
the real inputs, with SINGA's broadcasting ops (add, sub, mul, div) and its embedding
lookup checked in Python first; the first mismatch becomes an
:class:`~peftcore.errors.AdapterError` that says what the model did and why.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import autograd, tensor  # noqa: E402

from peftcore.errors import AdapterError  # noqa: E402


class _Mismatch(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _shape(t: Any) -> tuple:
    return tuple(int(d) for d in t.shape())


@contextlib.contextmanager
def _checked_ops() -> Iterator[None]:
    """SINGA's broadcasting ops and embedding lookup, with their inputs checked first."""
    originals: dict[Any, Any] = {}

    def binary(cls: Any) -> Any:
        forward = cls.forward

        def checked(self: Any, a: Any, b: Any) -> Any:
            try:
                np.broadcast_shapes(_shape(a), _shape(b))
            except ValueError:
                raise _Mismatch(f"{cls.__name__.lower()} of tensors shaped {_shape(a)} and {_shape(b)}") from None
            return forward(self, a, b)

        return checked

    def embedding(forward: Any) -> Any:
        def checked(self: Any, x: Any, w: Any) -> Any:
            ids = tensor.to_numpy(tensor.from_raw_tensor(x))
            rows = _shape(w)[0]
            if ids.size and (int(ids.max()) >= rows or int(ids.min()) < 0):
                raise _Mismatch(f"an embedding lookup of index {int(ids.max())} in a table of {rows} rows")
            return forward(self, x, w)

        return checked

    for cls in (autograd.Add, autograd.Sub, autograd.Mul, autograd.Div):
        originals[cls] = cls.forward
        cls.forward = binary(cls)
    originals[autograd.Embedding] = autograd.Embedding.forward
    autograd.Embedding.forward = embedding(autograd.Embedding.forward)
    try:
        yield
    finally:
        for cls, forward in originals.items():
            cls.forward = forward


def check_prompt_fits(run_forward: Any, inputs: Sequence[Any], prompts: dict[str, int]) -> None:
    """Run ``run_forward(*inputs)`` (eval mode, zero inputs: the caller's job) with the
    checks above; raise :class:`AdapterError` on the first mismatch. ``prompts`` maps the
    embedding path to the number of virtual tokens put there."""
    try:
        with _checked_ops():
            run_forward(*inputs)
    except _Mismatch as mismatch:
        where = ", ".join(f"{n} virtual tokens at {path!r}" for path, n in prompts.items())
        raise AdapterError(
            f"the model cannot take the positions prompt tuning adds ({where}): after the embedding, its forward "
            f"computes {mismatch.what}, which SINGA cannot do (it would abort the process). The layers after the "
            "embedding must take seq + num_virtual_tokens positions; a model that sizes them from the raw input "
            "(a position table looked up with the input ids, as SINGA's examples/trans does) or whose position "
            "table is shorter than that cannot take a prompt. Stopped before the forward ran; delete_adapter() "
            "the prompt, or give the model positions that count the virtual tokens"
        ) from None
