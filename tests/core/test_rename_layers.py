"""``peftcore.convert.rename_layers``: an adapter's layer paths renamed (plan, tensor keys,
target_modules), as moving an adapter from an ONNX import to its torch model needs."""

from __future__ import annotations

import numpy as np
import pytest

from peftcore import LoraConfig
from peftcore.convert import Adapter, rename_layers
from peftcore.errors import AdapterError
from peftcore.graph import LayerNode, ModelGraph

GRAPH = ModelGraph(layers=(
    LayerNode("/0/Gemm", "linear", in_features=5, out_features=8),
    LayerNode("/2/Gemm", "linear", in_features=8, out_features=3),
))


def _adapter(targets: object) -> Adapter:
    config = LoraConfig(r=2, target_modules=targets)
    plan = config.plan(GRAPH)
    rng = np.random.default_rng(0)
    tensors = {key: rng.standard_normal(spec.shape).astype(np.float32) for key, spec in plan.tensor_specs().items()}
    return Adapter(config, plan, tensors, "peftcore")


@pytest.mark.parametrize("targets", [["/0/Gemm", "/2/Gemm"], r"/\d/Gemm"])
def test_rename_moves_plan_tensors_and_targets(targets: object) -> None:
    adapter = _adapter(targets)
    renamed = rename_layers(adapter, {"/0/Gemm": "0", "/2/Gemm": "2"})
    assert [op.path for op in renamed.plan.ops if op.path] == ["0", "2"]
    assert renamed.config.target_modules == ["0", "2"]
    assert set(renamed.tensors) == set(renamed.plan.tensor_specs())
    np.testing.assert_array_equal(renamed.tensors["0.lora_A"], adapter.tensors["/0/Gemm.lora_A"])
    assert renamed.plan.method == adapter.plan.method and renamed.config.r == 2


def test_rename_refuses_unknown_and_colliding_paths() -> None:
    adapter = _adapter(["/0/Gemm", "/2/Gemm"])
    with pytest.raises(AdapterError, match=r"adapts no such layer"):
        rename_layers(adapter, {"/1/Relu": "1"})
    with pytest.raises(AdapterError, match="same layer path"):
        rename_layers(adapter, {"/0/Gemm": "x", "/2/Gemm": "x"})
    with pytest.raises(AdapterError, match="non-empty string"):
        rename_layers(adapter, {"/0/Gemm": ""})
