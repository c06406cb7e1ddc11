"""Fixtures the SINGA integration tests share."""

from __future__ import annotations

import sys
from typing import Any, Iterator

import pytest


@pytest.fixture(scope="module")
def sg() -> Any:
    """The singa package (shims applied), or skip with the reason it is unavailable."""
    from peftcore_singa.plugin import peftcore_backend

    info = peftcore_backend().info()
    if not info.available:
        pytest.skip(f"peftcore backend 'singa' unavailable: {info.reason}")
    from peftcore_singa.compat import import_singa

    return import_singa()


@pytest.fixture(autouse=True)
def _restore_autograd_training() -> Iterator[None]:
    """SINGA's train/eval switch is a module global; keep tests from leaking it."""
    autograd = sys.modules.get("singa.autograd")
    previous = getattr(autograd, "training", None)
    yield
    if autograd is not None:
        autograd.training = previous
