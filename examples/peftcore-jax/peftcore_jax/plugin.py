"""The JAX backend plugin (entry point ``jax`` in the ``peftcore`` group).

Imports without jax or flax installed: they are imported inside the hooks, and
:func:`peftcore_backend` reports the backend unavailable, with the reason, when they
cannot be imported.
"""

from __future__ import annotations

from typing import Any

from peftcore.hookspecs import hookimpl
from peftcore.runtime import BackendRuntime, UnavailableRuntime

NAME = "jax"
FRAMEWORK = "JAX (Flax NNX)"


@hookimpl
def peftcore_backend() -> BackendRuntime:
    try:
        import flax
        import jax

        from peftcore_jax.runtime import JaxRuntime
    except Exception as exc:  # any failure to import means unavailable, with the reason
        return UnavailableRuntime(NAME, FRAMEWORK, f"jax/flax are not importable ({type(exc).__name__}: {exc})")
    return JaxRuntime(f"jax {jax.__version__}, flax {flax.__version__}")


@hookimpl
def peftcore_backend_modules() -> list[str]:
    return ["flax"]


@hookimpl
def peftcore_conformance_kit(backend: str) -> Any:
    if backend != NAME:
        return None
    from peftcore_jax.toys import JaxToyKit

    return JaxToyKit()
