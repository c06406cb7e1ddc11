"""Planning BitFit, prompt tuning and residual prompt tuning on hand-made model graphs."""

from __future__ import annotations

import json

import pytest

from peftcore import (
    BitFitConfig,
    ConfigError,
    LayerNode,
    ModelGraph,
    PlanError,
    PromptTuningConfig,
    ResidualPromptTuningConfig,
    RewritePlan,
    TargetNotFoundError,
)
from peftcore.errors import AdapterError
from peftcore.methods.prompt_tuning import AddPrompt
from peftcore.plan import check_plan_fits
from peftcore.registry import PeftRegistry

GRAPH = ModelGraph(
    layers=(
        LayerNode("embed", "embedding", "Embedding", num_embeddings=50, embedding_dim=8, params={"weight": (50, 8)}),
        LayerNode("layers.0.query", "linear", "Linear", 8, 8, has_bias=True, params={"weight": (8, 8), "bias": (8,)}),
        LayerNode("layers.0.value", "linear", "Linear", 8, 8, has_bias=False, params={"weight": (8, 8)}),
        LayerNode("layers.0.norm", "norm", "LayerNorm", params={"weight": (8,), "bias": (8,)}),
        LayerNode("layers.1.query", "linear", "Linear", 8, 8, has_bias=True, params={"weight": (8, 8), "bias": (8,)}),
        LayerNode("layers.1.value", "linear", "Linear", 8, 8, has_bias=False, params={"weight": (8, 8)}),
        LayerNode("classifier", "linear", "Linear", 8, 3, has_bias=False, params={"weight": (3, 8)}),
    ),
    output_head="classifier",
    input_embedding="embed",
)


def _bias_paths(plan: RewritePlan) -> list[tuple[str, bool]]:
    return [(op.path, op.added) for op in plan.ops_of("bitfit_bias")]


def test_bitfit_defaults_to_every_existing_bias() -> None:
    plan = BitFitConfig().plan(GRAPH)
    assert _bias_paths(plan) == [("layers.0.query", False), ("layers.0.norm", False), ("layers.1.query", False)]
    assert plan.num_trainable() == 24
    assert all(name.endswith(".bias") for name in plan.tensor_specs())


def test_bitfit_adds_biases_to_linears_but_not_the_head_unless_named() -> None:
    plan = BitFitConfig(add_missing_biases=True).plan(GRAPH)
    assert ("layers.0.value", True) in _bias_paths(plan) and ("classifier", True) not in _bias_paths(plan)
    named = BitFitConfig(add_missing_biases=True, target_modules=["value", "classifier"]).plan(GRAPH)
    assert _bias_paths(named) == [("layers.0.value", True), ("layers.1.value", True), ("classifier", True)]


def test_bitfit_subsets_and_layer_filters() -> None:
    plan = BitFitConfig(target_modules=["query"], layers_to_transform=[1]).plan(GRAPH)
    assert _bias_paths(plan) == [("layers.1.query", False)]
    plan = BitFitConfig(exclude_modules=["norm"]).plan(GRAPH)
    assert [p for p, _ in _bias_paths(plan)] == ["layers.0.query", "layers.1.query"]
    with pytest.raises(TargetNotFoundError, match="closest"):
        BitFitConfig(target_modules=["qurey"]).plan(GRAPH)
    with pytest.raises(TargetNotFoundError, match="add_missing_biases"):
        BitFitConfig(target_modules=["value"]).plan(GRAPH)


def test_bitfit_skips_biases_inside_saved_modules_and_round_trips() -> None:
    plan = BitFitConfig(modules_to_save=["layers.0"]).plan(GRAPH.__class__(
        layers=(LayerNode("layers.0", "container", "Block"),) + GRAPH.layers, output_head="classifier"
    ))
    assert [p for p, _ in _bias_paths(plan)] == ["layers.1.query"]
    assert RewritePlan.from_json(plan.to_json()) == plan
    config = BitFitConfig(target_modules=["query"], add_missing_biases=True)
    assert PeftRegistry.config_from_dict(json.loads(config.to_json())) == config


def test_bitfit_misfits_are_named() -> None:
    plan = BitFitConfig(add_missing_biases=True, target_modules=["value"]).plan(GRAPH)
    changed = ModelGraph(
        layers=tuple(
            LayerNode(n.path, n.kind, n.type_name, n.in_features, n.out_features, has_bias=True, params={**n.params, "bias": (8,)})
            if n.path == "layers.0.value" else n
            for n in GRAPH.layers
        )
    )
    with pytest.raises(AdapterError, match="has a bias, the adapter was trained on one without"):
        check_plan_fits(plan, changed, "adapter")


def test_bitfit_config_errors() -> None:
    with pytest.raises(ConfigError, match="add_missing_biases"):
        BitFitConfig(add_missing_biases="yes")
    with pytest.raises(ConfigError, match="layers_to_transform"):
        BitFitConfig(layers_to_transform=["0"])
    with pytest.raises(ConfigError, match="did you mean 'target_modules'"):
        BitFitConfig(target_module=["query"])


def test_prompt_plan_uses_the_input_embedding_and_hf_keys() -> None:
    plan = PromptTuningConfig(num_virtual_tokens=5, task_type="SEQ_CLS").plan(GRAPH, "p")
    prompt = plan.ops_of("prompt_embedding")[0]
    assert isinstance(prompt, AddPrompt)
    assert (prompt.path, prompt.num_virtual_tokens, prompt.token_dim, prompt.num_embeddings) == ("embed", 5, 8, 50)
    specs = plan.tensor_specs()
    assert specs["embed.prompt_embeddings"].hf_name == "prompt_embeddings" and specs["embed.prompt_embeddings"].hf_root
    assert specs["classifier.weight"].hf_name == "base_model.classifier.weight"
    assert plan.num_trainable() == 5 * 8 + 3 * 8
    assert RewritePlan.from_json(plan.to_json()) == plan
    assert not prompt.mergeable


def test_prompt_text_init_repeats_or_cuts_the_tokenised_text() -> None:
    def tokenizer(text: str) -> dict:
        return {"input_ids": [ord(c) - ord("a") for c in text]}

    config = PromptTuningConfig(num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text="abc", tokenizer=tokenizer)
    assert config.plan(GRAPH).ops_of("prompt_embedding")[0].init_token_ids == (0, 1, 2, 0, 1, 2, 0)
    short = config.replace(num_virtual_tokens=2)
    assert short.plan(GRAPH).ops_of("prompt_embedding")[0].init_token_ids == (0, 1)
    assert config.loading_plan(GRAPH).ops_of("prompt_embedding")[0].init == "random"
    with pytest.raises(ConfigError, match="expected ids below 50"):
        config.replace(tokenizer=lambda text: [99]).plan(GRAPH)
    with pytest.raises(ConfigError, match="needs tokenizer_name_or_path"):
        config.replace(tokenizer=None).plan(GRAPH)
    assert "tokenizer" not in config.to_dict() and "embedding_layer" not in config.to_dict()


def test_prompt_config_and_graph_errors() -> None:
    with pytest.raises(ConfigError, match="num_virtual_tokens is not set"):
        PromptTuningConfig().plan(GRAPH)  # built as HF PEFT builds it; planning needs the count
    with pytest.raises(ConfigError, match="must be 1 or 2"):
        PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=3)
    # HF PEFT's default for encoder-decoder models: a second (decoder) block of rows
    seq2seq = PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_2_SEQ_LM").plan(GRAPH)
    assert seq2seq.ops_of("prompt_embedding")[0].tensor_specs()["prompt_embeddings"].shape[0] == 4
    with pytest.raises(ConfigError, match="prompt_tuning_init_text"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT")
    with pytest.raises(ConfigError, match="token_dim=16"):
        PromptTuningConfig(num_virtual_tokens=2, token_dim=16).plan(GRAPH)
    with pytest.raises(PlanError, match="needs an embedding layer"):
        PromptTuningConfig(num_virtual_tokens=2, embedding_layer="classifier").plan(GRAPH)
    two = ModelGraph(layers=GRAPH.layers + (LayerNode("pos", "embedding", "Embedding", num_embeddings=9, embedding_dim=8),))
    with pytest.raises(PlanError, match="set embedding_layer"):
        PromptTuningConfig(num_virtual_tokens=2).plan(two)
    assert PromptTuningConfig(num_virtual_tokens=2, embedding_layer="pos").plan(two).ops[1].path == "pos"


def test_residual_prompt_plan_and_baking() -> None:
    config = ResidualPromptTuningConfig(num_virtual_tokens=4, bottleneck_size=3, separate_mlps=True)
    plan = config.plan(GRAPH)
    prompt = plan.ops_of("prompt_embedding")[0]
    assert prompt.residual_shapes()["residual_down_weight"] == (4, 3, 8)
    assert plan.num_trainable() == 4 * 8 + 4 * (3 * 8 + 3 + 8 * 3 + 8 + 8 + 8)
    baked = prompt.baked()
    assert not baked.residual and baked.num_trainable() == 4 * 8
    assert type(config.baked()) is PromptTuningConfig and config.baked().num_virtual_tokens == 4
    shared = ResidualPromptTuningConfig(num_virtual_tokens=4, bottleneck_size=3, layer_norm=False).plan(GRAPH)
    assert "residual_norm_weight" not in shared.ops_of("prompt_embedding")[0].residual_shapes()
    with pytest.raises(ConfigError, match="activation"):
        ResidualPromptTuningConfig(num_virtual_tokens=4, activation="swish")


def test_prompt_op_fields_are_checked() -> None:
    base = {"op": "prompt_embedding", "path": "embed", "num_virtual_tokens": 2, "token_dim": 8, "num_embeddings": 50}
    assert RewritePlan.from_dict({"method": "prompt_tuning", "adapter_name": "a", "ops": [base]}).ops[0].token_dim == 8
    for bad in ({"init": "text"}, {"init": "token_ids", "init_token_ids": [1]}, {"init_token_ids": [60, 1]}, {"residual_dropout": 1.5}):
        with pytest.raises(PlanError):
            RewritePlan.from_dict({"method": "prompt_tuning", "adapter_name": "a", "ops": [{**base, **bad}]})
