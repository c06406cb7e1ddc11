"""pytest plugin for running HF PEFT's ``test_custom_models.py`` against either library.

``--peft-impl=hf`` runs HF PEFT itself (the baseline); ``--peft-impl=peftcore`` installs
the name-mapping ``peft`` module of :mod:`shim` first. Either way only the cases of
:mod:`select_cases` are run; the rest are deselected. Test dependencies that only unselected
cases use (``diffusers``, ``datasets``) are replaced by empty modules while the test
modules are collected, when not installed.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

import pytest

from benchmarks.hf_peft_suite import select_cases, shim

#: Modules HF's test helpers import at the top whose contents no selected case uses.
OPTIONAL_TEST_MODULES = {"diffusers": ("StableDiffusionPipeline",), "datasets": ("load_dataset",)}


def pytest_addoption(parser: Any) -> None:
    parser.addoption("--peft-impl", choices=("hf", "peftcore"), default="peftcore",
                     help="which library the 'peft' module is: HF PEFT or the peftcore name shim")


_STUBS: list[str] = []


def pytest_configure(config: Any) -> None:
    for module_name, names in OPTIONAL_TEST_MODULES.items():
        if importlib.util.find_spec(module_name) is None:
            module = types.ModuleType(module_name)
            for name in names:
                setattr(module, name, shim.placeholder(module_name, name))
            sys.modules[module_name] = module
            _STUBS.append(module_name)
    if config.getoption("--peft-impl") == "peftcore":
        shim.install()


def pytest_collection_finish(session: Any) -> None:
    """The test modules are imported: take the stubs away again, so that nothing asking
    whether the package is installed (transformers does) is misled."""
    for module_name in _STUBS:
        sys.modules.pop(module_name, None)


def pytest_collection_modifyitems(config: Any, items: list) -> None:
    keep, drop = [], []
    for item in items:
        (keep if item.fspath.basename == "test_custom_models.py" and select_cases.kept(item) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


@pytest.hookimpl(trylast=True)
def pytest_report_header(config: Any) -> str:
    return f"peft implementation: {config.getoption('--peft-impl')}"
