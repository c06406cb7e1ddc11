"""Adapters built by the JAX backend train with Flax NNX's own tools: a jitted step with
``nnx.Optimizer(..., wrt=TRAINABLE)`` changes the adapter's tensors and leaves every
frozen base parameter bit-identical (LoRA with dropout, and prompt tuning)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("jax", reason="jax is not installed: the JAX training test is skipped")
pytest.importorskip("flax.nnx", reason="flax is not installed: the JAX training test is skipped")
pytest.importorskip("optax", reason="optax (a flax dependency) is not installed")
pytest.importorskip("peftcore_jax", reason="peftcore_jax is not importable: put examples/peftcore-jax on PYTHONPATH")

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from peftcore.api import get_peft_model  # noqa: E402
from peftcore.methods.lora import LoraConfig  # noqa: E402
from peftcore.methods.prompt_tuning import PromptTuningConfig  # noqa: E402
from peftcore.plugins import get_plugin_manager  # noqa: E402
from peftcore.testing.toys import MLP, TOKEN_MODEL  # noqa: E402

CASES = {
    "lora": (MLP, lambda: LoraConfig(target_modules=["fc1", "head"], r=2, lora_dropout=0.1)),
    "prompt": (TOKEN_MODEL, lambda: PromptTuningConfig(num_virtual_tokens=2)),
}


@pytest.fixture(scope="module", autouse=True)
def jax_backend_registered() -> None:
    import peftcore_jax.plugin

    manager = get_plugin_manager()
    if "jax" not in manager.backends():
        manager.register(peftcore_jax.plugin, name="jax")


@pytest.mark.parametrize("case", sorted(CASES))
def test_jitted_training_moves_only_the_adapter(case: str) -> None:
    from peftcore_jax.runtime import TRAINABLE
    from peftcore_jax.toys import ToyModel

    spec, config = CASES[case]
    rng = np.random.default_rng(3)
    model = ToyModel(spec, spec.random_weights(rng))
    inputs = spec.random_inputs(rng)
    peft_model = get_peft_model(model, config(), backend="jax", example_inputs=inputs)
    frozen = [p for p in peft_model.runtime.parameters(model) if not TRAINABLE((), p)]
    frozen_before = [np.asarray(p[...]) for p in frozen]
    adapter_before = peft_model.export_adapter("default")
    x = jnp.asarray(inputs)
    target = jnp.ones(model(x).shape)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=TRAINABLE)

    @nnx.jit
    def step(model: Any, optimizer: Any) -> Any:
        loss, grads = nnx.value_and_grad(lambda m: ((m(x) - target) ** 2).mean(), argnums=nnx.DiffState(0, TRAINABLE))(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    losses = [float(step(model, optimizer)) for _ in range(4)]
    assert losses[-1] < losses[0]
    adapter_after = peft_model.export_adapter("default")
    assert all(not np.array_equal(adapter_after[k], adapter_before[k]) for k in adapter_before)
    for param, before in zip(frozen, frozen_before):
        np.testing.assert_array_equal(np.asarray(param[...]), before)


def test_layers_of_one_shape_start_from_different_lora_factors() -> None:
    """Each adapter layer draws from its own RNG stream (keyed by its path): two
    same-shaped layers (each block's q_proj, say) must not start identical."""

    class TwoLayers(nnx.Module):
        def __init__(self) -> None:
            self.first = nnx.Linear(6, 6, rngs=nnx.Rngs(0))
            self.second = nnx.Linear(6, 6, rngs=nnx.Rngs(1))

        def __call__(self, x: Any) -> Any:
            return self.second(self.first(x))

    peft_model = get_peft_model(TwoLayers(), LoraConfig(target_modules=["first", "second"], r=2), backend="jax")
    factors = peft_model.export_adapter("default")
    assert not np.array_equal(factors["first.lora_A"], factors["second.lora_A"])


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_weight_based_inits_keep_the_output(init: str) -> None:
    """The core's PiSSA/OLoRA/orthogonal inits on JAX: arrays are immutable, so the
    residual base kernel is a new array stored back in the layer."""
    from peftcore.testing.numerics import assert_close_to_scale

    model = nnx.Linear(6, 5, rngs=nnx.Rngs(3))

    class Net(nnx.Module):
        def __init__(self) -> None:
            self.proj = model

        def __call__(self, x: Any) -> Any:
            return self.proj(x)

    net = Net()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6)), dtype=jnp.float32)
    before = np.asarray(net(x))
    kernel = np.asarray(model.kernel[...]).copy()
    peft_model = get_peft_model(net, LoraConfig(target_modules=["proj"], r=2, lora_alpha=2, init_lora_weights=init), backend="jax")
    assert_close_to_scale(np.asarray(net(x)), before)
    factors = peft_model.export_adapter("default")
    product = factors["proj.lora_B"] @ factors["proj.lora_A"]
    if init == "orthogonal":
        assert np.abs(product).max() <= 1e-5 * np.abs(factors["proj.lora_A"]).max()
    else:  # the base kept the rest: kernel - scaling * (B @ A)^T, scaling 1 here
        assert_close_to_scale(np.asarray(net.proj.base_layer.kernel[...]), kernel - 1.0 * product.T)
        assert np.abs(product).max() > 0
