"""Exceptions raised by peftcore.

Every error peftcore raises on bad input derives from :class:`PeftCoreError`, so a
caller can catch one type. Each subclass also derives from the builtin exception a
Python user would expect (``ValueError``, ``KeyError``...), so existing handlers work.
"""

from __future__ import annotations

import difflib
import sys
from typing import Iterable


class PeftCoreError(Exception):
    """Base class of every peftcore error."""


class ConfigError(PeftCoreError, ValueError):
    """A PEFT config has an unknown field, a bad value, or an unsupported option."""


class UnknownFieldError(ConfigError, TypeError):
    """A config was given a keyword it has no field for (a ``TypeError`` too, as a
    dataclass constructor would raise)."""


class MissingFieldError(ConfigError, TypeError):
    """A saved config lacks a field every config must have (``peft_type``); a ``TypeError``
    too, as HF PEFT raises."""


class UnknownMethodError(PeftCoreError, KeyError):
    """No PEFT method is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TargetNotFoundError(PeftCoreError, ValueError):
    """The config's targets matched no layer of the model."""


class UnsupportedLayerError(PeftCoreError, TypeError):
    """A targeted layer is of a kind the method (or the backend) cannot adapt."""


class BackendError(PeftCoreError, RuntimeError):
    """A backend is unknown, unavailable, ambiguous, or failed inside a hook."""


class PlanError(PeftCoreError, ValueError):
    """A rewrite plan is malformed or cannot be applied to this model."""


class AdapterError(PeftCoreError, ValueError):
    """An adapter (in memory or on disk) is missing, malformed or does not fit the model."""


class MethodOperationError(PeftCoreError, TypeError):
    """An operation the adapter's method does not have (``set_requires_grad`` on a prompt,
    as HF PEFT: a ``TypeError``)."""


class PromptLearningUnloadError(PeftCoreError, AttributeError):
    """``unload()`` of a prompt-learning adapter, which HF PEFT's models lack (an
    ``AttributeError`` there, so here too)."""


class PeftWarning(UserWarning):
    """A warning about a PEFT model or adapter (Hugging Face PEFT's name); peftcore's own
    warnings about adapter state derive from it."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` candidates that look most like ``name`` (for error messages)."""
    pool = list(dict.fromkeys(candidates))
    found = difflib.get_close_matches(name, pool, n=n, cutoff=0.5)
    if len(found) < n:
        short = {c.rsplit(".", 1)[-1]: c for c in pool}
        for match in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(short), n=n, cutoff=0.6):
            if short[match] not in found:
                found.append(short[match])
    return found[:n]


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Format a ``did you mean ...?`` suffix, or an empty string when nothing is close."""
    found = closest(name, candidates)
    return f"; did you mean {', '.join(repr(f) for f in found)}?" if found else ""


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside peftcore
    and its backends (the user's line), however deep inside the library it is raised."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0].startswith("peftcore"):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level

