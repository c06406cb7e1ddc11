"""The shared conformance suite on the JAX backend (``examples/peftcore-jax``).

Skipped, with the reason printed, when jax/flax are not importable. The plugin is
registered in-process when its distribution is not installed (its directory on
``PYTHONPATH`` is enough), exactly as its entry point would register it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("jax", reason="jax is not installed: the JAX backend's conformance suite is skipped")
pytest.importorskip("flax.nnx", reason="flax is not installed: the JAX backend's conformance suite is skipped")
pytest.importorskip("peftcore_jax", reason="peftcore_jax is not importable: put examples/peftcore-jax on PYTHONPATH")

from peftcore.plugins import get_plugin_manager  # noqa: E402
from peftcore.testing import ConformanceSuite  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def jax_backend_registered() -> None:
    import peftcore_jax.plugin

    manager = get_plugin_manager()
    if "jax" not in manager.backends():
        manager.register(peftcore_jax.plugin, name="jax")


class TestJaxConformance(ConformanceSuite):
    backends = ["jax"]
    conv_lora_skip = "the JAX example backend declares LoRA on nnx.Conv a limitation (peftcore_jax.runtime.CONV_LORA_LIMITATION)"
