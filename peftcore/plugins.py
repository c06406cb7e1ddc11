"""Plugin discovery and backend selection.

The pluggy manager is built lazily, once per process (thread-safe), on first use:
``import peftcore`` loads no plugin. Plugins come only from the ``peftcore``
entry-point group, first-party backends included, loaded one entry point at a time
with pluggy's ``load_setuptools_entrypoints`` so that one plugin failing to import is
recorded by name while the others keep working. ``PEFTCORE_DISABLED_PLUGINS``
(comma-separated entry-point names) blocks plugins before they are imported.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, TypeVar

import pluggy

from peftcore import hookspecs
from peftcore.config import PeftConfig
from peftcore.errors import BackendError, PeftCoreError, PlanError, did_you_mean
from peftcore.graph import ModelGraph
from peftcore.model_ops import PLUGIN_FAULTS, build_base_tensors, build_freeze_base, guarded
from peftcore.plan import FreezeBase, PlanOp, op_types
from peftcore.registry import PeftRegistry
from peftcore.runtime import BackendInfo, BackendRuntime, CheckpointFormat, OpBuilder, missing_primitives

T = TypeVar("T")

ENTRY_POINT_GROUP = "peftcore"
ENV_BACKEND = "PEFTCORE_BACKEND"
ENV_DISABLED = "PEFTCORE_DISABLED_PLUGINS"

_lock = threading.Lock()
_manager: Optional[PluginManager] = None


def _renew_lock_in_child() -> None:
    """A child forked while another thread held the lock would inherit it locked forever."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_lock_in_child)


@dataclass(frozen=True)
class PluginFailure:
    """An entry point that could not be loaded, and why."""

    name: str
    error: str


class Backend:
    """One backend plugin and its runtime; every call goes to this plugin only."""

    def __init__(self, name: str, plugin: Any, manager: PluginManager) -> None:
        self.name = name
        self.plugin = plugin
        self._manager = manager
        self._runtime: Optional[BackendRuntime] = None
        self._info: Optional[BackendInfo] = None
        self._modules: Optional[frozenset[str]] = None

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    @property
    def runtime(self) -> BackendRuntime:
        """The plugin's :class:`~peftcore.runtime.BackendRuntime` (built once)."""
        if self._runtime is None:
            impls = [i for i in self._manager.pm.hook.peftcore_backend.get_hookimpls() if i.plugin is self.plugin]
            if not impls:
                raise BackendError(f"plugin {self.name!r} is not a backend (it does not implement peftcore_backend)")
            try:
                runtime = impls[0].function()
            except PLUGIN_FAULTS as exc:
                raise BackendError(
                    f"backend {self.name!r} failed in peftcore_backend: {type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(runtime, BackendRuntime):
                raise BackendError(
                    f"backend {self.name!r}: peftcore_backend returned {type(runtime).__name__}, "
                    "not a peftcore.runtime.BackendRuntime"
                )
            self._runtime = runtime
        return self._runtime

    def may_own(self, model: Any) -> bool:
        """False when the plugin names its framework's modules
        (``peftcore_backend_modules``) and none of ``model``'s classes comes from them:
        decided from module names alone, without building the runtime (which imports the
        framework). True otherwise, and when the plugin names none."""
        modules = self._framework_modules()
        if not modules:
            return True
        roots = {cls.__module__.partition(".")[0] for cls in type(model).__mro__}
        return not roots.isdisjoint(modules)

    def _framework_modules(self) -> frozenset:
        if self._modules is None:
            impls = [i for i in self._manager.pm.hook.peftcore_backend_modules.get_hookimpls() if i.plugin is self.plugin]
            declared: frozenset[str] = frozenset()
            if impls:
                try:
                    result: Any = impls[0].function()
                    declared = frozenset([result] if isinstance(result, str) else [str(name) for name in result])
                except PLUGIN_FAULTS as exc:  # then the runtime is asked, as for a plugin without the hook
                    self._manager.plugin_failed(self.name, "peftcore_backend_modules", exc)
            self._modules = declared
        return self._modules

    @property
    def info(self) -> BackendInfo:
        """The backend's self-description; a failing or incomplete plugin is unavailable."""
        if self._info is None:
            self._info = self._compute_info()
        return self._info

    def _compute_info(self) -> BackendInfo:
        try:
            runtime = self.runtime
            with guarded(runtime, "info"):
                info = runtime.info()
        except PeftCoreError as exc:
            return BackendInfo(name=self.name, framework="?", available=False, reason=str(exc))
        if not isinstance(info, BackendInfo):
            return BackendInfo(self.name, "?", False, reason=f"its runtime's info() returned {info!r}")
        missing = missing_primitives(runtime) if info.available else []
        if missing:
            return BackendInfo(
                info.name, info.framework, False, info.version, f"its runtime does not implement {', '.join(missing)}"
            )
        return info

    @property
    def available(self) -> bool:
        return self.info.available

    def require_available(self) -> None:
        if not self.available:
            raise BackendError(f"backend {self.name!r} is not available: {self.info.reason}")

    # -- what the core asks of a backend ---------------------------------------------------
    def detect(self, model: Any) -> bool:
        """Whether this backend recognises ``model``."""
        with guarded(self.runtime, "detect"):
            return bool(self.runtime.detect(model))

    def describe(self, model: Any, example_inputs: Any = None) -> Optional[ModelGraph]:
        """``model`` as a ModelGraph (None while its layers do not know their shapes)."""
        kinds = self._manager.layer_kinds(self.name)
        with guarded(self.runtime, "describe"):
            return self.runtime.describe(model, example_inputs, kinds)

    def builders(self) -> dict[type[PlanOp], OpBuilder]:
        """Every op builder, by op class: the core's generic ones, the backend's, then
        plugins' extras."""
        runtime = self.runtime
        builders: dict[type[PlanOp], OpBuilder] = {FreezeBase: build_freeze_base(runtime)}
        if type(runtime).base_tensor is not BackendRuntime.base_tensor:  # the runtime reaches base parameters
            builders.update({op: build_base_tensors(runtime) for op in op_types().values() if op.trains_base_in_place})
        with guarded(runtime, "builders"):
            builders.update(by_op_class(runtime.builders()))
        builders.update(self._manager.op_builders(self.name))
        return builders

    def ops(self) -> list[str]:
        """The names of the op kinds this backend can build, plugins' extras included."""
        with guarded(self.runtime, "builders"):
            return sorted({op.op for op in self.builders()})

    def refuse_unbuildable(self, config: PeftConfig) -> None:
        """Raise :class:`PlanError` with the backend's own reason when it declares it
        cannot build ``config``'s method (``BackendInfo.limitations``) and lacks a builder
        for an op that method may emit (a plugin may have added them since). Called
        before an adapter is planned, queued or built, for every backend. A variant of
        the config (:meth:`~peftcore.config.PeftConfig.variants`) the backend lists is
        refused the same way."""
        limitations = dict(self.info.limitations or {})
        for variant in config.variants():  # a form of a method the backend builds, which has no op of its own
            if variant in limitations:
                raise PlanError(f"{self.name} backend cannot build {variant} ({type(config).__name__}): {limitations[variant]}")
        reason = limitations.get(config.method)
        if reason is None:
            return
        lacking = set(PeftRegistry.ops_of(config.method)) - set(self.ops())
        if lacking:
            raise PlanError(f"{self.name} backend cannot build {config.method} ({type(config).__name__}): {reason}")

    def conformance_kit(self) -> Any:
        """The toy-model kit the shared test suite uses for this backend."""
        kit = self._manager.conformance_kit(self.name)
        if kit is None:
            raise BackendError(f"backend {self.name!r} has no conformance kit (peftcore_conformance_kit)")
        return kit


class PluginManager:
    """The loaded plugins and the backends among them."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self.disabled = _disabled_names()
        for name in self.disabled:
            self.pm.set_blocked(name)
        if load_entry_points:
            self._load_entry_points()
        self._backends: dict[str, Backend] = {}

    def broadcast(self, spec: Callable[..., T], **kwargs: Any) -> list[T]:
        """Call the extension hook ``spec`` (a function of :mod:`peftcore.hookspecs`) on every
        plugin, each on its own: one that raises is recorded in :attr:`failures`, named in
        a warning and left out. Returns the results that are not None."""
        caller = getattr(self.pm.hook, spec.__name__)
        results: list[T] = []
        for impl in reversed(caller.get_hookimpls()):  # pluggy's order: last registered first
            try:
                result = impl.function(*[kwargs[name] for name in impl.argnames])
            except PLUGIN_FAULTS as exc:  # a broken plugin must not take the others down
                self.plugin_failed(impl.plugin_name, spec.__name__, exc)
                continue
            if result is not None:
                results.append(result)
        return results

    def registered_methods(self) -> list[type]:
        """Config classes that plugins contribute (``peftcore_register_methods``)."""
        return [cls for group in self.broadcast(hookspecs.peftcore_register_methods) for cls in group]

    def layer_kinds(self, backend: str) -> dict[Any, str]:
        """Extra native layer classes mapped to IR kinds for ``backend``."""
        kinds: dict[Any, str] = {}
        for extra in self.broadcast(hookspecs.peftcore_layer_kinds, backend=backend):
            kinds.update(extra)
        return kinds

    def op_builders(self, backend: str) -> dict[type[PlanOp], OpBuilder]:
        """Extra op builders plugins add for ``backend``, by op class."""
        builders: dict[type[PlanOp], OpBuilder] = {}
        for extra in self.broadcast(hookspecs.peftcore_op_builders, backend=backend):
            builders.update(by_op_class(extra))
        return builders

    def checkpoint_formats(self) -> list[CheckpointFormat]:
        """Framework checkpoint layouts plugins can read adapters from."""
        return [fmt for group in self.broadcast(hookspecs.peftcore_checkpoint_formats) for fmt in group]

    def conformance_kit(self, backend: str) -> Any:
        """The first conformance kit a plugin offers for ``backend``, or None."""
        kits = self.broadcast(hookspecs.peftcore_conformance_kit, backend=backend)
        return kits[0] if kits else None

    def plugin_failed(self, plugin_name: str, hook_name: str, exc: BaseException) -> None:
        error = f"{hook_name} raised {type(exc).__name__}: {exc}"
        if not any(f.name == plugin_name and f.error == error for f in self.failures):
            self.failures.append(PluginFailure(plugin_name, error))
        warnings.warn(f"peftcore plugin {plugin_name!r} was left out: {error}", stacklevel=4)

    def _load_entry_points(self) -> None:
        for name in _entry_point_names(ENTRY_POINT_GROUP):
            if self.pm.is_blocked(name) or self.pm.get_plugin(name) is not None:
                continue
            try:
                self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
            except PLUGIN_FAULTS as exc:  # a broken plugin must not take the others down
                self.failures.append(PluginFailure(name, f"{type(exc).__name__}: {exc}"))
        for name, error in self._drop_unmatched_hooks():
            self.failures.append(PluginFailure(name, error))

    def _drop_unmatched_hooks(self) -> list[tuple[str, str]]:
        """pluggy's ``check_pending``: a plugin implementing a hook that has no
        specification (a misspelled ``peftcore_*`` name) would be ignored silently;
        each such plugin is unregistered instead and returned with the reason, by name,
        while the others stay."""
        dropped: list[tuple[str, str]] = []
        while True:
            try:
                self.pm.check_pending()
                return dropped
            except pluggy.PluginValidationError as exc:
                name = self.pm.get_name(exc.plugin) or repr(exc.plugin)
                self.pm.unregister(exc.plugin)
                dropped.append((name, f"{type(exc).__name__}: {exc}"))

    def register(self, plugin: Any, name: str) -> None:
        """Register an in-process plugin (a module or object with ``@hookimpl`` functions)."""
        if self.pm.is_blocked(name):
            return
        try:
            self.pm.register(plugin, name=name)
        except PLUGIN_FAULTS as exc:
            raise BackendError(f"plugin {name!r} could not be registered: {exc}") from exc
        self._backends.clear()
        dropped = self._drop_unmatched_hooks()
        if dropped:
            raise BackendError("; ".join(f"plugin {bad!r} could not be registered: {why}" for bad, why in dropped))

    def unregister(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self._backends.clear()

    def backends(self) -> dict[str, Backend]:
        """Every backend plugin by name (available or not)."""
        if not self._backends:
            for name, plugin in self.pm.list_name_plugin():
                impls = {c.name for c in self.pm.get_hookcallers(plugin) or ()}
                if "peftcore_backend" in impls:
                    self._backends[name] = Backend(name, plugin, self)
        return dict(self._backends)

    def describe_backends(self) -> str:
        """One line per backend and failed plugin, for error messages."""
        lines = []
        for name, backend in sorted(self.backends().items()):
            info = backend.info
            state = "available" if info.available else f"unavailable: {info.reason}"
            lines.append(f"  - {name} ({info.framework}): {state}")
        for failure in self.failures:
            lines.append(f"  - {failure.name}: failed to load: {failure.error}")
        for name in sorted(self.disabled):
            lines.append(f"  - {name}: disabled by {ENV_DISABLED}")
        return "\n".join(lines) if lines else "  (no backend plugin is installed)"

    def get_backend(self, name: str) -> Backend:
        """The named backend, which must be available."""
        backends = self.backends()
        if name not in backends:
            failed = [f for f in self.failures if f.name == name]
            why = f" (its plugin failed to load: {failed[0].error})" if failed else ""
            raise BackendError(
                f"unknown backend {name!r}{why}{did_you_mean(name, backends)}; installed backends:\n"
                + self.describe_backends()
            )
        backend = backends[name]
        backend.require_available()
        return backend

    def select_backend(self, model: Any, backend: Optional[str] = None, config: Any = None) -> Backend:
        """Pick the backend for ``model``: argument, config ``backend``, env var, detection."""
        chosen = backend or getattr(config, "backend", None) or os.environ.get(ENV_BACKEND) or None
        if chosen:
            return self.get_backend(chosen)
        claims, errors = [], []
        for _, candidate in sorted(self.backends().items()):
            if not candidate.may_own(model) or not candidate.available:
                continue
            try:
                if candidate.detect(model):
                    claims.append(candidate)
            except BackendError as exc:  # one broken plugin must not hide the others
                errors.append(str(exc))
        if len(claims) == 1:
            return claims[0]
        if len(claims) > 1:
            names = ", ".join(c.name for c in claims)
            raise BackendError(f"several backends claim a {type(model).__name__} ({names}); pass backend=...")
        failed = "".join(f"\n  ! {e}" for e in errors)
        raise BackendError(
            f"no installed backend recognises a {type(model).__module__}.{type(model).__qualname__}; "
            f"installed backends:\n" + self.describe_backends() + failed
        )


def by_op_class(builders: Mapping[Any, OpBuilder]) -> dict[type[PlanOp], OpBuilder]:
    """``builders`` keyed by op class. A key that is an op's registered name (how
    plugins written before op-class keys name them) is turned into its class; one that
    names no registered op builds nothing and is dropped."""
    known = op_types()
    keyed: dict[type[PlanOp], OpBuilder] = {}
    for key, builder in builders.items():
        op = known.get(key) if isinstance(key, str) else key
        if isinstance(op, type) and issubclass(op, PlanOp):
            keyed[op] = builder
    return keyed


def _disabled_names() -> set[str]:
    raw = os.environ.get(ENV_DISABLED, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def _entry_point_names(group: str) -> list[str]:
    from importlib import metadata

    eps = metadata.entry_points()
    if hasattr(eps, "select"):
        selected = eps.select(group=group)
    else:  # Python 3.9: a dict of group -> entry points
        selected = eps.get(group, [])  # type: ignore[arg-type]
    return list(dict.fromkeys(ep.name for ep in selected))


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, built on first call (one even under threads)."""
    global _manager
    if _manager is None:
        with _lock:
            if _manager is None:
                _manager = PluginManager()
    return _manager


def reset_plugin_manager() -> None:
    """Forget the plugin manager (the next use rebuilds it, re-reading the environment)."""
    global _manager
    with _lock:
        _manager = None
    PeftRegistry._plugins_loaded = False

