"""The PEFT method registry.

A method is a config class (a :class:`~peftcore.config.PeftConfig` subclass whose
``plan`` method is the planner). Methods are registered in-process with the decorator::

    @PeftRegistry.register("my_method")
    class MyConfig(PeftConfig): ...

or by a plugin's ``peftcore_register_methods`` hook (see :mod:`peftcore.hookspecs`), which
is how third-party packages add methods.

The registry sits above the methods and below the plugin layer: it registers the
built-in methods (:data:`peftcore.methods.BUILTIN_METHODS`) itself, and it reaches
plugins only through the source the plugin layer gives it
(:meth:`MethodRegistry.set_plugin_source`; ``import peftcore`` connects the two).
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Iterable, Optional, TypeVar

from peftcore.config import PeftConfig, set_config_source
from peftcore.errors import ConfigError, UnknownMethodError, did_you_mean
from peftcore.methods import BUILTIN_METHODS
from peftcore.peft_type import as_peft_type
from peftcore.plan import op_types

C = TypeVar("C", bound="type[PeftConfig]")

#: Returns the config classes that installed plugins contribute (see ``set_plugin_source``).
PluginMethodSource = Callable[[], Iterable[type]]


class MethodRegistry:
    """Maps method names (``"lora"``) and HF ``peft_type`` strings to config classes."""

    def __init__(self) -> None:
        self._methods: dict[str, type[PeftConfig]] = {}
        self._plugin_source: Optional[PluginMethodSource] = None
        self._plugins_loaded = False
        self._loading_plugins = False
        self._lock = threading.RLock()

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator registering a config class as method ``name``."""

        def decorate(cls: C) -> C:
            self.add(name, cls)
            return cls

        return decorate

    def add(self, name: str, config_cls: type[PeftConfig]) -> None:
        """Register ``config_cls`` under ``name``; re-registering the same class is a no-op."""
        if not (isinstance(config_cls, type) and issubclass(config_cls, PeftConfig)):
            raise ConfigError(f"method {name!r} must be a PeftConfig subclass, got {config_cls!r}")
        if not name or not isinstance(name, str):
            raise ConfigError(f"method name must be a non-empty string, got {name!r}")
        with self._lock:
            existing = self._methods.get(name)
            if existing is not None and existing is not config_cls:
                raise ConfigError(
                    f"method {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
                )
            config_cls.method = name
            config_cls.peft_type = as_peft_type(config_cls.peft_type or name.upper())
            self._methods[name] = config_cls

    def set_plugin_source(self, source: PluginMethodSource) -> None:
        """Tell the registry where plugin methods come from.

        ``source()`` returns the config classes of every installed plugin. The plugin
        layer sets it (``import peftcore`` does); the registry calls it once, the first
        time a name is not among the methods registered in-process (or when
        :meth:`names` or :meth:`load_plugins` asks), so looking up a built-in method
        never starts plugin discovery.
        """
        with self._lock:
            self._plugin_source = source
            self._plugins_loaded = False

    def load_plugins(self) -> None:
        """Collect the methods of every installed plugin (once; later calls are free)."""
        self._ensure_plugins()

    def _ensure_plugins(self) -> None:
        if self._plugins_loaded:
            return
        with self._lock:
            source = self._plugin_source
            if self._plugins_loaded or self._loading_plugins or source is None:
                return  # done, this very thread is loading them (a plugin asking back), or no plugin layer
            self._loading_plugins = True
            try:
                for config_cls in source():  # add() rejects what is not a PeftConfig subclass
                    self.add(getattr(config_cls, "method", "") or config_cls.__name__.lower(), config_cls)
            finally:  # only now may other threads skip the lock and trust the registry
                self._plugins_loaded = True
                self._loading_plugins = False

    def names(self) -> list[str]:
        """Every registered method name, plugin methods included."""
        self._ensure_plugins()
        return sorted(self._methods)

    def get(self, name: str) -> type[PeftConfig]:
        """The config class of method ``name`` (or of HF ``peft_type`` ``name``)."""
        found = self._lookup(name)
        if found is None:
            self._ensure_plugins()
            found = self._lookup(name)
        if found is None:
            raise UnknownMethodError(
                f"unknown PEFT method {name!r}{did_you_mean(str(name), self._methods)}; "
                f"registered methods: {', '.join(sorted(self._methods))}"
            )
        return found

    def ops_of(self, name: str) -> tuple[str, ...]:
        """The plan op types method ``name`` may emit: the config class's ``plan_ops``, or,
        for a method that declares none, the op types defined in its config's module."""
        config_cls = self.get(name)
        if config_cls.plan_ops:
            return tuple(config_cls.plan_ops)
        return tuple(sorted(op for op, op_cls in op_types().items() if op_cls.__module__ == config_cls.__module__))

    def missing_ops(self, built_ops: Iterable[str]) -> dict[str, list[str]]:
        """For every registered method, the op types it needs that are not in
        ``built_ops`` (what a backend builds); an empty list means the backend builds it."""
        built = set(built_ops)
        return {name: sorted(set(self.ops_of(name)) - built) for name in self.names()}

    def _lookup(self, name: str) -> type[PeftConfig] | None:
        if name in self._methods:
            return self._methods[name]
        for cls in self._methods.values():
            if cls.peft_type == name:
                return cls
        return None

    def config_from_dict(self, data: dict) -> PeftConfig:
        """Build the right config class from a saved dict, using its ``peft_type``."""
        if not isinstance(data, dict):
            raise ConfigError(f"adapter config must be a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type")
        if not isinstance(peft_type, str):
            raise ConfigError(f"adapter config has no valid 'peft_type' (got {peft_type!r})")
        return self.get(peft_type).from_dict(data)


#: The process-wide registry (also reachable as ``peftcore.PeftRegistry``).
PeftRegistry = MethodRegistry()
for _config_cls in BUILTIN_METHODS:
    PeftRegistry.add(_config_cls.method, _config_cls)

if hasattr(os, "register_at_fork"):  # a lock held by another thread at fork time stays held in the child
    os.register_at_fork(after_in_child=lambda: setattr(PeftRegistry, "_lock", threading.RLock()))
register_method = PeftRegistry.register
set_config_source(PeftRegistry.config_from_dict)
