"""The torch backend plugin (entry point ``torch`` in the ``peftcore`` group).

This module imports without torch installed: it imports torch only when asked for its
runtime, and then reports the backend unavailable, with the reason, if that fails.
"""

from __future__ import annotations

from typing import Any

from peftcore.hookspecs import hookimpl
from peftcore.runtime import BackendRuntime, UnavailableRuntime

NAME = "torch"


@hookimpl
def peftcore_backend() -> BackendRuntime:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return UnavailableRuntime(NAME, "PyTorch", f"torch is not importable ({exc})")
    from peftcore_torch.runtime import TorchRuntime

    return TorchRuntime()


@hookimpl
def peftcore_backend_modules() -> list[str]:
    # a model of this backend has a class from these modules; others are not asked about
    # (so picking a backend for another framework's model does not import this one's)
    return ["torch"]


@hookimpl
def peftcore_conformance_kit(backend: str) -> Any:
    if backend != NAME:
        return None
    from peftcore_torch.toys import TorchToyKit

    return TorchToyKit()
