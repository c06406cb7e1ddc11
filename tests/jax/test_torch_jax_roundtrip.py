"""A LoRA adapter trained on torch moves to JAX (Flax NNX) and back through
``save_pretrained``/``from_pretrained``: the JAX model computes what the torch one does,
and the tensors that come back are the ones that left, within 1e-5 of their scale.

Skipped, with the reason printed, when jax/flax (or the JAX backend package) are not importable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("jax", reason="jax is not installed: the torch <-> JAX round trip is skipped")
pytest.importorskip("flax.nnx", reason="flax is not installed: the torch <-> JAX round trip is skipped")
pytest.importorskip("peftcore_jax", reason="peftcore_jax is not importable: put examples/peftcore-jax on PYTHONPATH")

from peftcore.api import PeftModel, get_peft_model  # noqa: E402
from peftcore.methods.lora import LoraConfig  # noqa: E402
from peftcore.plugins import get_plugin_manager  # noqa: E402
from peftcore.testing import TOY_SPECS, ToySpec  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402

#: the issue's bound for moving adapters between frameworks
RTOL = 1e-5


@pytest.fixture(scope="module")
def backends() -> dict:
    import peftcore_jax.plugin

    manager = get_plugin_manager()
    if "jax" not in manager.backends():
        manager.register(peftcore_jax.plugin, name="jax")
    return {name: manager.get_backend(name) for name in ("torch", "jax")}


def run(backend: Any, model: PeftModel, inputs: np.ndarray) -> np.ndarray:
    return np.asarray(backend.conformance_kit().forward(model.get_base_model(), inputs), dtype=np.float64)


@pytest.mark.parametrize("toy", TOY_SPECS, ids=[s.name for s in TOY_SPECS])
def test_lora_moves_torch_to_jax_and_back(backends: dict, toy: ToySpec, tmp_path: Any) -> None:
    rng = np.random.default_rng(7)
    weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
    torch_backend, jax_backend = backends["torch"], backends["jax"]
    config = LoraConfig(target_modules=[s.name for s in toy.layers], r=4, lora_alpha=8)
    trained = get_peft_model(torch_backend.conformance_kit().build(toy, weights), config, backend="torch", example_inputs=inputs)
    tensors = {k: (rng.standard_normal(s.shape) * 0.2).astype(np.float32) for k, s in trained.plans["default"].tensor_specs().items()}
    trained.import_adapter("default", tensors)
    torch_out = run(torch_backend, trained, inputs)
    trained.save_pretrained(str(tmp_path / "from_torch"))

    on_jax = PeftModel.from_pretrained(
        jax_backend.conformance_kit().build(toy, weights), str(tmp_path / "from_torch"), backend="jax", example_inputs=inputs
    )
    assert_close_to_scale(run(jax_backend, on_jax, inputs), torch_out, rtol=RTOL)
    on_jax.save_pretrained(str(tmp_path / "from_jax"))

    back = PeftModel.from_pretrained(
        torch_backend.conformance_kit().build(toy, weights), str(tmp_path / "from_jax"), backend="torch", example_inputs=inputs
    )
    returned = back.export_adapter("default")
    assert set(returned) == set(tensors)
    for key, value in tensors.items():
        assert_close_to_scale(np.asarray(returned[key]), value, rtol=RTOL)
    assert_close_to_scale(run(torch_backend, back, inputs), torch_out, rtol=RTOL)
