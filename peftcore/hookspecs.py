"""The plugin contract: pluggy hook specifications (project name and prefix ``peftcore``).

Seven hooks in all:

* ``peftcore_backend`` makes a plugin a backend: it returns the backend's
  :class:`~peftcore.runtime.BackendRuntime` (primitives plus op builders). It is called on
  each plugin on its own, never broadcast. ``peftcore_backend_modules`` (optional) names
  the framework's top-level modules, so that picking a backend for a model skips, without
  importing its framework, a backend none of the model's classes comes from.
* The extension hooks are broadcast to every plugin, each plugin called on its own so a
  failing one is left out and named: methods, native layer kinds, op builders, checkpoint
  formats ``peftcore convert`` reads, and the conformance kit of toy models a backend's
  test suite uses.

A plugin module must import without its framework installed (keep heavy imports inside
functions) and report itself unavailable through its runtime's ``info()`` instead.
The core calls hooks through :class:`peftcore.plugins.PluginManager`'s typed methods,
never by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import pluggy

from peftcore.runtime import BackendInfo

if TYPE_CHECKING:
    from peftcore.config import PeftConfig
    from peftcore.plan import PlanOp
    from peftcore.runtime import BackendRuntime, CheckpointFormat

PROJECT = "peftcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["BackendInfo", "PROJECT", "hookimpl", "hookspec"]


@hookspec(firstresult=True)
def peftcore_backend() -> BackendRuntime:  # type: ignore[empty-body]
    """This plugin's backend runtime (cheap to build: it imports its framework only when
    asked for ``info()`` or given a model)."""


@hookspec(firstresult=True)
def peftcore_backend_modules() -> Sequence[str]:  # type: ignore[empty-body]
    """The top-level module names of this plugin's framework (``["torch"]``), given
    without importing it. Backend detection asks a backend's runtime (which imports the
    framework) only about a model one of whose classes (its type or a base class) comes
    from these modules; without this hook, every backend's runtime is asked."""


@hookspec
def peftcore_register_methods() -> Sequence[type[PeftConfig]]:  # type: ignore[empty-body]
    """Config classes of extra PEFT methods (each sets ``method``)."""


@hookspec
def peftcore_layer_kinds(backend: str) -> Mapping[Any, str]:  # type: ignore[empty-body]
    """Map extra native layer classes of ``backend`` (e.g. a quantised linear) to IR kinds."""


@hookspec
def peftcore_op_builders(backend: str) -> Mapping[type[PlanOp], Callable[..., Any]]:  # type: ignore[empty-body]
    """Builders for extra op kinds on ``backend``: ``{op class: builder(model, layers, op, adapter_name)}``
    (an op's registered name is accepted as the key too)."""


@hookspec
def peftcore_checkpoint_formats() -> Sequence[CheckpointFormat]:  # type: ignore[empty-body]
    """Framework checkpoint layouts ``peftcore convert`` can read adapters from."""


@hookspec
def peftcore_conformance_kit(backend: str) -> Any:
    """For the shared test suite: an object with ``build(spec, weights)`` (a native model of
    a toy spec with canonical-layout weights) and ``forward(model, inputs)`` (numpy in, numpy
    out, eval mode) for ``backend``; None when this plugin has none for it."""
