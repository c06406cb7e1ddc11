"""pytest plugin: the ``peftcore_backend`` fixture, parametrised over backends.

Load it from a conftest (``pytest_plugins = ["peftcore.testing.plugin"]``). The backends
a test runs on come from ``--peftcore-backend NAME`` (repeatable), else the test class's
``backends`` attribute, else every installed backend. A backend that is not available
is skipped with its reason (run pytest with ``-rs`` to see the reasons listed).
"""

from __future__ import annotations

from typing import Any

import pytest

from peftcore.plugins import Backend, get_plugin_manager


def pytest_addoption(parser: Any) -> None:
    parser.addoption(
        "--peftcore-backend",
        action="append",
        default=[],
        help="run the peftcore conformance suite on this backend (repeatable)",
    )


def pytest_generate_tests(metafunc: Any) -> None:
    if "peftcore_backend_name" not in metafunc.fixturenames:
        return
    names = list(metafunc.config.getoption("--peftcore-backend") or [])
    if not names:
        names = list(getattr(metafunc.cls, "backends", None) or [])
    if not names:
        names = sorted(get_plugin_manager().backends())
    metafunc.parametrize("peftcore_backend_name", names, scope="class")


@pytest.fixture(scope="class")
def peftcore_backend(peftcore_backend_name: str) -> Backend:
    """The named backend; the test is skipped, with the reason, when it is unavailable."""
    manager = get_plugin_manager()
    backends = manager.backends()
    if peftcore_backend_name not in backends:
        failed = [f for f in manager.failures if f.name == peftcore_backend_name]
        reason = failed[0].error if failed else "not installed"
        pytest.skip(f"peftcore backend {peftcore_backend_name!r} unavailable: {reason}")
    backend = backends[peftcore_backend_name]
    if not backend.available:
        pytest.skip(f"peftcore backend {peftcore_backend_name!r} unavailable: {backend.info.reason}")
    return backend
