"""LoRA on an ``nnx.Conv`` is a declared limitation of the JAX example backend: the conv
is described with its geometry, the plan is made, and the build is refused with the
reason, leaving the model as it was (a linear layer of the same config unwrapped)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("jax", reason="jax is not installed: the JAX conv test is skipped")
pytest.importorskip("flax.nnx", reason="flax is not installed: the JAX conv test is skipped")
pytest.importorskip("peftcore_jax", reason="peftcore_jax is not importable: put examples/peftcore-jax on PYTHONPATH")

from flax import nnx  # noqa: E402

from peftcore.api import get_peft_model  # noqa: E402
from peftcore.errors import PlanError  # noqa: E402
from peftcore.methods.lora import LoraConfig  # noqa: E402
from peftcore.plugins import get_plugin_manager  # noqa: E402


class SmallCNN(nnx.Module):
    def __init__(self) -> None:
        self.conv = nnx.Conv(3, 4, (3, 3), strides=2, padding="VALID", rngs=nnx.Rngs(0))
        self.fc = nnx.Linear(4, 4, rngs=nnx.Rngs(1))
        self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(2))

    def __call__(self, x: Any) -> Any:
        return self.head(self.fc(self.conv(x).mean((1, 2))))


def test_conv_is_described_with_its_geometry() -> None:
    graph = get_plugin_manager().get_backend("jax").describe(SmallCNN(), None)
    node = graph.get("conv")
    assert (node.kind, node.in_features, node.out_features) == ("conv", 3, 4)
    assert (node.kernel_size, node.stride, node.padding, node.dilation, node.groups) == ((3, 3), (2, 2), "valid", (1, 1), 1)


def test_lora_on_a_conv_is_refused_with_the_reason_and_nothing_changes() -> None:
    model = SmallCNN()
    with pytest.raises(PlanError, match=r"'conv'.*nnx\.Conv.*not built"):
        get_peft_model(model, LoraConfig(target_modules=["conv", "fc"], r=2))
    assert type(model.conv) is nnx.Conv and type(model.fc) is nnx.Linear
    peft_model = get_peft_model(model, LoraConfig(target_modules=["fc"], r=2))
    assert [op.op for op in peft_model.plans["default"].ops] == ["freeze_base", "lora"]
