"""pytest plugin for running HF PEFT's test files (:data:`select_cases.FILES`) against either library.

``--peft-impl=hf`` runs HF PEFT itself (the baseline); ``--peft-impl=peftcore`` installs
the name-mapping ``peft`` module of :mod:`shim` first. Either way only the cases of
:mod:`select_cases` are run; the rest are deselected. ``--write-selection FILE`` records
the ids kept, and ``--read-selection FILE`` keeps exactly those ids instead of applying
the rule, so that both runs measure the same cases. ``--local-models DIR`` redirects
the hub ids of HF's model-level tests to the tiny local models of :mod:`local_models`.
Test dependencies that only unselected cases use (``diffusers``, ``datasets``) are
replaced by empty modules while the test modules are collected, when not installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from benchmarks.hf_peft_suite import local_models, select_cases, shim

#: Modules HF's test helpers import at the top whose contents no selected case uses.
OPTIONAL_TEST_MODULES = {"diffusers": ("StableDiffusionPipeline",), "datasets": ("load_dataset",)}


def pytest_addoption(parser: Any) -> None:
    parser.addoption("--peft-impl", choices=("hf", "peftcore"), default="peftcore",
                     help="which library the 'peft' module is: HF PEFT or the peftcore name shim")
    parser.addoption("--write-selection", default=None, help="write the ids of the selected cases to this file")
    parser.addoption("--read-selection", default=None, help="run exactly the case ids listed in this file")
    parser.addoption("--local-models", default=None, help="folder of the tiny local models (see local_models.py)")


_STUBS: list[str] = []


def pytest_configure(config: Any) -> None:
    for module_name, names in OPTIONAL_TEST_MODULES.items():
        if importlib.util.find_spec(module_name) is None:
            module = types.ModuleType(module_name)
            module.__spec__ = importlib.machinery.ModuleSpec(module_name, None)  # find_spec() must not fail on it
            for name in names:
                setattr(module, name, shim.placeholder(module_name, name))
            sys.modules[module_name] = module
            _STUBS.append(module_name)
    if config.getoption("--peft-impl") == "peftcore":
        shim.install()
    if config.getoption("--local-models"):
        local_models.install(local_models.prepare(Path(config.getoption("--local-models"))))


def pytest_collection_finish(session: Any) -> None:
    """The test modules are imported: take the stubs away again, so that nothing asking
    whether the package is installed (transformers does) is misled."""
    for module_name in _STUBS:
        sys.modules.pop(module_name, None)


def case_id(item: Any) -> str:
    """``file::Class::test[params]``: the id both runs and the results use."""
    return f"{item.fspath.basename}::{'::'.join(item.nodeid.split('::')[1:])}"


def pytest_collection_modifyitems(config: Any, items: list) -> None:
    listed = config.getoption("--read-selection")
    wanted = set(json.loads(Path(listed).read_text())) if listed else None
    keep, drop = [], []
    for item in items:
        chosen = case_id(item) in wanted if wanted is not None else select_cases.kept(item)
        (keep if chosen else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    if config.getoption("--write-selection"):
        Path(config.getoption("--write-selection")).write_text(json.dumps(sorted(case_id(i) for i in keep), indent=0))


@pytest.hookimpl(trylast=True)
def pytest_report_header(config: Any) -> str:
    return f"peft implementation: {config.getoption('--peft-impl')}"
