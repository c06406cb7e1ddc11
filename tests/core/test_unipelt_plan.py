"""UniPELT planning on hand-written ModelGraphs (no framework needed)."""

import json

import pytest

from peftcore import ConfigError, LayerNode, ModelGraph, PlanError, RewritePlan, TargetNotFoundError, UniPELTConfig
from peftcore.methods.lora import AddLora
from peftcore.methods.unipelt_ops import AddBottleneckAdapter, AddGate, AddPrefix
from peftcore.plan import check_plan_fits
from peftcore.registry import PeftRegistry


def linear(path: str, n_in: int, n_out: int) -> LayerNode:
    return LayerNode(path, "linear", "Linear", n_in, n_out, has_bias=False, params={"weight": (n_out, n_in)})


def llama_like(blocks: int = 2, model_type: str = "llama") -> ModelGraph:
    layers = [LayerNode("model", "container"), LayerNode("model.layers", "container")]
    for i in range(blocks):
        b = f"model.layers.{i}"
        layers += [
            LayerNode(b, "container"),
            LayerNode(f"{b}.self_attn", "container", "LlamaAttention"),
            linear(f"{b}.self_attn.q_proj", 16, 16),
            linear(f"{b}.self_attn.k_proj", 16, 8),  # two of four heads: grouped-query attention
            linear(f"{b}.self_attn.v_proj", 16, 8),
            linear(f"{b}.self_attn.o_proj", 16, 16),
            LayerNode(f"{b}.mlp", "container"),
            linear(f"{b}.mlp.up_proj", 16, 32),
            linear(f"{b}.mlp.down_proj", 32, 16),
            LayerNode(f"{b}.input_layernorm", "norm", "LlamaRMSNorm", params={"weight": (16,)}),
        ]
    layers.append(linear("lm_head", 16, 50))
    return ModelGraph(layers=tuple(layers), model_type=model_type, output_head="lm_head")


def test_apl_plan_per_block_and_json_round_trip() -> None:
    plan = UniPELTConfig(r=2, num_virtual_tokens=3, bottleneck_size=4).plan(llama_like(), "u")
    assert RewritePlan.from_json(plan.to_json()) == plan
    block0 = [op for op in plan.ops if op.path.startswith("model.layers.0")]
    assert [(op.op, op.path.rsplit(".", 2)[-2:]) for op in block0] == [
        ("lora", ["self_attn", "q_proj"]), ("gate", ["self_attn", "q_proj"]),
        ("lora", ["self_attn", "v_proj"]), ("gate", ["self_attn", "v_proj"]),
        ("prefix", ["0", "self_attn"]), ("gate", ["0", "self_attn"]),
        ("bottleneck_adapter", ["mlp", "down_proj"]), ("gate", ["mlp", "down_proj"]),
    ]
    lora, prefix, adapter = block0[0], block0[4], block0[6]
    assert isinstance(lora, AddLora) and lora.scaling == 1.0 and lora.r == 2
    assert isinstance(prefix, AddPrefix) and prefix.width == 8 and prefix.key_path == "model.layers.0.self_attn.k_proj"
    assert isinstance(adapter, AddBottleneckAdapter) and (adapter.features, adapter.bottleneck) == (16, 4)
    gate = block0[5]
    assert isinstance(gate, AddGate) and gate.target == "prefix" and gate.in_features == 16
    specs = plan.tensor_specs()
    assert specs["model.layers.0.self_attn.prefix.keys"].shape == (3, 8)
    assert specs["model.layers.0.self_attn.prefix.gate.weight"].shape == (1, 16)
    assert specs["model.layers.0.self_attn.q_proj.lora_gate.bias"].shape == (1,)
    assert specs["model.layers.1.mlp.down_proj.adapter.up.weight"].shape == (16, 4)
    lora = (2 * 16 + 16 * 2 + 17) + (2 * 16 + 8 * 2 + 17)  # q and v (v is 8 wide), each with its gate
    per_block = lora + (2 * 3 * 8 + 17) + (4 * 16 + 4 + 16 * 4 + 16 + 17)
    assert plan.num_trainable() == 2 * per_block
    assert all(not op.mergeable for op in plan.ops if op.op in ("gate", "prefix", "bottleneck_adapter"))
    check_plan_fits(plan, llama_like(), "test")


def test_variants_and_layers_to_transform() -> None:
    graph = llama_like(3)
    ops = UniPELTConfig(variant="AP", layers_to_transform=[2]).plan(graph).ops
    assert [op.op for op in ops] == ["freeze_base", "prefix", "gate", "bottleneck_adapter", "gate"]
    assert all(op.path.startswith("model.layers.2.") for op in ops[1:])
    assert {op.op for op in UniPELTConfig(variant="L").plan(graph).ops} == {"freeze_base", "lora", "gate"}


def test_overrides_place_unipelt_in_an_unknown_model() -> None:
    graph = llama_like(1, model_type="mystery")
    with pytest.raises(ConfigError, match="no default UniPELT layout for model type 'mystery'"):
        UniPELTConfig().plan(graph)
    config = UniPELTConfig(variant="L", lora_modules=["self_attn.o_proj"])
    assert [op.path for op in config.plan(graph).ops if op.op == "lora"] == ["model.layers.0.self_attn.o_proj"]
    with pytest.raises(TargetNotFoundError, match="closest paths in the block: self_attn.q_proj"):
        UniPELTConfig(variant="L", lora_modules=["self_attn.q_prj"]).plan(graph)


def test_fused_key_projection_is_split() -> None:
    layers = [LayerNode("transformer.h", "container"), LayerNode("transformer.h.0", "container"),
              LayerNode("transformer.h.0.attn", "container"), linear("transformer.h.0.attn.c_attn", 8, 24),
              linear("transformer.h.0.attn.c_proj", 8, 8), LayerNode("transformer.h.0.mlp", "container"),
              linear("transformer.h.0.mlp.c_fc", 8, 32), linear("transformer.h.0.mlp.c_proj", 32, 8)]
    plan = UniPELTConfig(num_virtual_tokens=2).plan(ModelGraph(layers=tuple(layers), model_type="gpt2"))
    prefix = next(op for op in plan.ops if isinstance(op, AddPrefix))
    assert prefix.width == 8
    assert [op.path for op in plan.ops if op.op == "lora"] == ["transformer.h.0.attn.c_attn"]


def test_config_validation_and_registry() -> None:
    for bad in ({"variant": ""}, {"variant": "AA"}, {"variant": "X"}, {"r": 0}, {"num_virtual_tokens": -1},
                {"adapter_activation": "softmax"}, {"lora_modules": []}, {"prefix_init_std": 0}):
        with pytest.raises(ConfigError):
            UniPELTConfig(**bad)
    assert PeftRegistry.get("unipelt") is UniPELTConfig and PeftRegistry.get("UNIPELT") is UniPELTConfig
    config = UniPELTConfig(variant="AP", lora_modules=["a.b"])
    assert PeftRegistry.config_from_dict(json.loads(config.to_json())) == config


def test_op_fields_are_checked() -> None:
    with pytest.raises(PlanError, match="target"):
        AddGate(path="x", target="attention", in_features=4)
    with pytest.raises(PlanError, match="activation"):
        AddBottleneckAdapter(path="x", features=4, bottleneck=2, activation="softmax")
    with pytest.raises(PlanError, match="positive"):
        AddPrefix(path="x", num_virtual_tokens=0, width=4)
    with pytest.raises(PlanError, match="must be int"):
        RewritePlan.from_dict({"method": "unipelt", "adapter_name": "a", "ops": [{"op": "prefix", "path": "x", "width": "8"}]})


def test_loading_checks_the_adapter_fits() -> None:
    plan = UniPELTConfig().plan(llama_like())
    narrower = ModelGraph(layers=tuple(
        linear(n.path, 16, 4) if n.path.endswith("k_proj") else n for n in llama_like()
    ), model_type="llama")
    with pytest.raises(Exception, match="does not produce keys of width 8"):
        check_plan_fits(plan, narrower, "dir")
