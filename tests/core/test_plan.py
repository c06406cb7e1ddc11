import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore import LayerNode, LoraConfig, ModelGraph, PlanError, RewritePlan
from peftcore.methods.lora import AddLora
from peftcore.plan import FreezeBase, SaveModule

GRAPH = ModelGraph(
    layers=(
        LayerNode("enc.fc1", "linear", "Linear", 4, 6, has_bias=True, params={"weight": (6, 4), "bias": (6,)}),
        LayerNode("enc.fc2", "linear", "Linear", 6, 2, has_bias=False, params={"weight": (2, 6)}),
        LayerNode("head", "container", "Head"),
        LayerNode("head.out", "linear", "Linear", 2, 3, has_bias=True, params={"weight": (3, 2), "bias": (3,)}),
    ),
    output_head="head.out",
)


def test_plan_json_round_trip_and_golden() -> None:
    plan = LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], modules_to_save=["head"]).plan(GRAPH, "a1")
    assert RewritePlan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json()) == {
        "version": 1,
        "method": "lora",
        "adapter_name": "a1",
        "ops": [
            {"op": "freeze_base", "path": ""},
            {"op": "lora", "path": "enc.fc1", "layer_kind": "linear", "in_features": 4, "out_features": 6,
             "r": 2, "lora_alpha": 4.0, "scaling": 2.0, "dropout": 0.0, "init": "kaiming"},
            {"op": "modules_to_save", "path": "head", "param_shapes": {"out.weight": [3, 2], "out.bias": [3]}},
        ],
    }
    assert plan.num_trainable() == 2 * 4 + 6 * 2 + 3 * 2 + 3
    specs = plan.tensor_specs()
    assert specs["enc.fc1.lora_A"].hf_name == "enc.fc1.lora_A.weight"
    assert specs["head.out.weight"].hf_name == "head.out.weight"


def test_graph_json_round_trip() -> None:
    assert ModelGraph.from_dict(json.loads(GRAPH.to_json())) == GRAPH


def test_plan_ops_are_frozen() -> None:
    op = AddLora(path="x", in_features=2, out_features=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        op.r = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "must be a JSON object"),
        ({"method": "lora"}, "missing"),
        ({"method": "lora", "adapter_name": "a", "ops": [{"op": "lorra"}]}, "unknown plan op 'lorra'.*'lora'"),
        ({"method": "lora", "adapter_name": "a", "ops": [{"op": "lora", "rank": 3}]}, "unknown fields"),
        ({"method": "lora", "adapter_name": "a", "ops": "x"}, "must be a list"),
        ({"method": "lora", "adapter_name": "a", "ops": [], "version": 99}, "newer"),
    ],
)
def test_malformed_plans_raise_plan_error(data: object, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        RewritePlan.from_dict(data)  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {"method": json_values, "adapter_name": json_values, "ops": st.lists(
            st.fixed_dictionaries({"op": st.sampled_from(["lora", "freeze_base", "modules_to_save", "zzz"]) | json_values}, optional={
                "path": json_values, "r": json_values, "param_shapes": json_values, "layer_kind": json_values}),
            max_size=3)},
        optional={"version": json_values},
    )
)
def test_fuzzed_plan_json_raises_only_plan_error(data: dict) -> None:
    try:
        RewritePlan.from_dict(data)
    except PlanError:
        pass


def test_freeze_base_has_no_tensors() -> None:
    assert FreezeBase().tensor_specs() == {} and FreezeBase().num_trainable() == 0
    assert SaveModule(path="m", param_shapes={"w": (2, 3)}).num_trainable() == 6
