"""The core ops of LoRA's ``target_parameters`` and ``trainable_token_indices`` (numpy only).

Their planning against a hand-written graph (HF PEFT's order, nesting and file keys),
the plan's JSON round trip, the numpy ``delta`` of each against a direct per-expert /
per-row computation, and the errors of bad settings.
"""

from __future__ import annotations

import numpy as np
import pytest

from peftcore.errors import ConfigError, PlanError
from peftcore.graph import LayerNode, ModelGraph
from peftcore.methods.lora import LoraConfig
from peftcore.methods.lora_params import AddParamLora
from peftcore.methods.trainable_tokens import TrainTokens
from peftcore.methods.trainable_tokens_config import TrainableTokensConfig
from peftcore.plan import RewritePlan


def moe_graph(transposed: bool = False) -> ModelGraph:
    experts = (4, 16, 48) if transposed else (4, 48, 16)
    down = (4, 24, 16) if transposed else (4, 16, 24)
    return ModelGraph(
        layers=(
            LayerNode("model.embed_tokens", "embedding", num_embeddings=50, embedding_dim=16, params={"weight": (50, 16)}),
            LayerNode(
                "model.layers.0.mlp.experts", "other", params={"gate_up_proj": experts, "down_proj": down},
                transposed=transposed,
            ),
            LayerNode("lm_head", "linear", in_features=16, out_features=50, params={"weight": (50, 16)},
                      shares_weight_with="model.embed_tokens"),
        ),
        input_embedding="model.embed_tokens",
        output_head="lm_head",
    )


def test_parameters_are_planned_in_hf_order_and_nesting() -> None:
    plan = LoraConfig(r=2, lora_alpha=4, target_parameters=["experts.down_proj", "experts.gate_up_proj"]).plan(moe_graph())
    ops = [op for op in plan.ops if isinstance(op, AddParamLora)]
    # registration order: gate_up_proj first (inner, one wrapper outside it), down_proj outer
    assert [(op.parameter_name, op.depth) for op in ops] == [("gate_up_proj", 1), ("down_proj", 0)]
    gate_up = ops[0]
    assert (gate_up.num_experts, gate_up.in_features, gate_up.out_features) == (4, 16, 48)
    specs = plan.tensor_specs()
    assert specs["model.layers.0.mlp.experts.base_layer.lora_A"].shape == (8, 16)
    assert specs["model.layers.0.mlp.experts.base_layer.lora_A"].hf_name == "model.layers.0.mlp.experts.base_layer.lora_A.weight"
    assert specs["model.layers.0.mlp.experts.lora_B"].shape == (16, 8)
    assert RewritePlan.from_json(plan.to_json()) == plan
    assert all(op.misfit(moe_graph()) is None for op in ops)
    assert "has shape (4, 16, 48)" in (ops[0].misfit(moe_graph(transposed=True)) or "")


def test_rank_pattern_is_matched_against_the_parameter_name() -> None:
    config = LoraConfig(r=2, target_parameters=["experts.down_proj"], rank_pattern={"down_proj": 3})
    (op,) = [op for op in config.plan(moe_graph()).ops if isinstance(op, AddParamLora)]
    assert op.r == 3 and config.plan_disagreement(config.plan(moe_graph())) is None


@pytest.mark.parametrize("transposed", [False, True])
def test_the_expert_delta_is_each_experts_b_times_a(transposed: bool) -> None:
    (op,) = [
        op for op in LoraConfig(r=2, lora_alpha=6, target_parameters=["experts.gate_up_proj"]).plan(moe_graph(transposed)).ops
        if isinstance(op, AddParamLora)
    ]
    rng = np.random.default_rng(0)
    a = rng.standard_normal(op.tensor_specs()["lora_A"].shape)
    b = rng.standard_normal(op.tensor_specs()["lora_B"].shape)
    change = op.delta({"lora_A": a, "lora_B": b})
    assert change.shape == op.parameter_shape
    for e in range(op.num_experts):
        a_e = a[e * op.r : (e + 1) * op.r]  # rows e*r .. e*r+r
        b_e = b[:, [k * op.num_experts + e for k in range(op.r)]]  # columns e, e+E, ...
        expected = op.scaling * b_e @ a_e
        np.testing.assert_allclose(change[e], expected.T if transposed else expected, rtol=1e-12)


def test_token_rows_are_planned_with_the_tied_head() -> None:
    plan = LoraConfig(target_modules=["lm_head"], trainable_token_indices=[3, 1]).plan(moe_graph())
    tokens = [op for op in plan.ops if isinstance(op, TrainTokens)]
    assert [(op.path, op.tied_to) for op in tokens] == [("model.embed_tokens", ""), ("lm_head", "model.embed_tokens")]
    specs = plan.tensor_specs()
    assert specs["model.embed_tokens.trainable_tokens_delta"].hf_name == "model.embed_tokens.token_adapter.trainable_tokens_delta"
    assert not any(key.startswith("lm_head.trainable") for key in specs)  # a tied head's rows are saved once
    standalone = TrainableTokensConfig(token_indices=[3, 1]).plan(moe_graph()).tensor_specs()
    assert standalone["lm_head.trainable_tokens_delta"].hf_name == "lm_head.trainable_tokens_delta"
    assert RewritePlan.from_json(plan.to_json()) == plan


def test_the_token_delta_needs_the_table() -> None:
    op = TrainTokens(path="model.embed_tokens", token_indices=(3, 1), num_embeddings=5, embedding_dim=2)
    rows = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert op.delta({"trainable_tokens_delta": rows}) is None
    table = np.arange(10.0).reshape(5, 2)
    merged = table + op.delta({"trainable_tokens_delta": rows}, base=table)
    np.testing.assert_array_equal(merged[[3, 1]], rows)
    np.testing.assert_array_equal(np.delete(merged, [1, 3], axis=0), np.delete(table, [1, 3], axis=0))


@pytest.mark.parametrize(
    ("settings", "error", "words"),
    [
        ({"target_parameters": ["experts.gate_up_proj"], "lora_dropout": 0.1}, ConfigError, "lora_dropout"),
        ({"target_parameters": ["experts.gate_up_proj"], "init_lora_weights": "olora"}, ConfigError, "init_lora_weights"),
        ({"target_parameters": "experts.gate_up_proj"}, ConfigError, "list"),
        ({"trainable_token_indices": {"embed_tokens": "1"}}, ConfigError, "list"),
        ({"trainable_token_indices": [1, 1]}, ConfigError, "repeat"),
    ],
)
def test_bad_settings_name_the_problem(settings: dict, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        LoraConfig(target_modules=["lm_head"], **settings).plan(moe_graph())


def test_ops_check_their_own_fields() -> None:
    with pytest.raises(PlanError, match="outside"):
        TrainTokens(path="e", token_indices=(9,), num_embeddings=5, embedding_dim=2)
    with pytest.raises(PlanError, match="2-D"):
        AddParamLora(path="m", parameter_name="w", num_experts=3, in_features=2, out_features=2)
