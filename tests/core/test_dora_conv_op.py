"""The core op of DoRA on a convolution (``lora_conv`` with ``use_dora``), numpy only.

Planning against a hand-written graph (HF PEFT's tensors and file keys, the magnitude
``(1, out, 1, ...)``), the plan's JSON round trip, the numpy ``delta`` against DoRA's
definition written out per output channel, and the refusal on a grouped convolution.
"""

from __future__ import annotations

import numpy as np
import pytest

from peftcore.errors import PlanError
from peftcore.graph import LayerNode, ModelGraph
from peftcore.methods.lora import LoraConfig
from peftcore.methods.lora_conv import AddLoraConv
from peftcore.plan import RewritePlan


def conv_graph(groups: int = 1) -> ModelGraph:
    conv = LayerNode(
        "body", "conv", "Conv2d", in_features=4, out_features=6, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1),
        dilation=(1, 1), groups=groups, padding_mode="zeros", has_bias=True,
        params={"weight": (6, 4 // groups, 3, 3), "bias": (6,)},
    )
    return ModelGraph(layers=(conv,), model_type="cnn")


def test_dora_on_a_conv_plans_hf_tensors_and_round_trips() -> None:
    plan = LoraConfig(r=2, lora_alpha=4, target_modules=["body"], use_dora=True).plan(conv_graph())
    op = next(op for op in plan.ops if isinstance(op, AddLoraConv))
    assert op.use_dora and op.scaling == 2.0
    specs = plan.tensor_specs()
    assert specs["body.lora_A"].shape == (2, 4, 3, 3) and specs["body.lora_B"].shape == (6, 2, 1, 1)
    assert specs["body.lora_magnitude_vector"].shape == (1, 6, 1, 1)
    assert specs["body.lora_magnitude_vector"].hf_name == "body.lora_magnitude_vector"
    assert RewritePlan.from_json(plan.to_json()) == plan


def test_the_delta_is_dora_s_weight_minus_the_base() -> None:
    op = next(op for op in LoraConfig(r=2, lora_alpha=4, target_modules=["body"], use_dora=True).plan(conv_graph()).ops
              if isinstance(op, AddLoraConv))
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 4, 3, 3))
    tensors = {
        "lora_A": rng.standard_normal((2, 4, 3, 3)),
        "lora_B": rng.standard_normal((6, 2, 1, 1)),
        "lora_magnitude_vector": rng.uniform(0.5, 2.0, (1, 6, 1, 1)),
    }
    assert op.delta(tensors) is None  # DoRA's change needs the base weight
    expected = np.empty_like(weight)
    for out in range(6):  # per output channel: m / ||W + s B A|| * (W + s B A), written out
        combined = weight[out] + 2.0 * np.einsum("r,rikl->ikl", tensors["lora_B"][out, :, 0, 0], tensors["lora_A"])
        expected[out] = tensors["lora_magnitude_vector"][0, out, 0, 0] / np.sqrt(np.sum(combined**2)) * combined
    np.testing.assert_allclose(op.delta(tensors, weight), expected - weight, rtol=1e-12, atol=1e-12)


def test_dora_on_a_grouped_conv_is_refused_with_the_reason() -> None:
    with pytest.raises(PlanError, match=r"DoRA cannot be put on conv layer 'body' with groups=2.*use_dora=False"):
        LoraConfig(r=2, target_modules=["body"], use_dora=True).plan(conv_graph(groups=2))
    LoraConfig(r=2, target_modules=["body"]).plan(conv_graph(groups=2))  # plain LoRA is planned
