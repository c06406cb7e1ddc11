import pytest

from peftcore import ConfigError, LayerNode, LoraConfig, ModelGraph, TargetNotFoundError, UnsupportedLayerError
from peftcore.methods.lora import AddLora


def linear(path: str, n_in: int = 8, n_out: int = 8) -> LayerNode:
    return LayerNode(path, "linear", "Linear", n_in, n_out, has_bias=True, params={"weight": (n_out, n_in), "bias": (n_out,)})


def llama_like(blocks: int = 3) -> ModelGraph:
    layers = [LayerNode("model.embed_tokens", "embedding", "Embedding", num_embeddings=50, embedding_dim=8, params={"weight": (50, 8)})]
    for i in range(blocks):
        layers.append(LayerNode(f"model.layers.{i}", "container", "Block"))
        layers.append(LayerNode(f"model.layers.{i}.self_attn", "container", "Attention"))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            layers.append(linear(f"model.layers.{i}.self_attn.{name}"))
        layers.append(LayerNode(f"model.layers.{i}.norm", "norm", "RMSNorm", params={"weight": (8,)}))
    layers.append(linear("lm_head", 8, 50))
    return ModelGraph(layers=tuple(layers), model_type="llama", output_head="lm_head")


def lora_paths(config: LoraConfig, graph: ModelGraph) -> list:
    return [op.path for op in config.plan(graph).ops if isinstance(op, AddLora)]


def test_list_matches_exact_name_or_dotted_suffix() -> None:
    graph = llama_like()
    assert lora_paths(LoraConfig(target_modules=["q_proj"]), graph) == [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    assert lora_paths(LoraConfig(target_modules=["self_attn.v_proj"]), graph)[0] == "model.layers.0.self_attn.v_proj"
    assert lora_paths(LoraConfig(target_modules=["lm_head"]), graph) == ["lm_head"]
    # "proj" is not a dotted suffix of "q_proj"
    with pytest.raises(TargetNotFoundError):
        LoraConfig(target_modules=["proj"]).plan(graph)


def test_regex_must_match_the_whole_path() -> None:
    graph = llama_like()
    assert lora_paths(LoraConfig(target_modules=r".*\.(q|v)_proj"), graph) == [
        f"model.layers.{i}.self_attn.{n}_proj" for i in range(3) for n in "qv"
    ]
    with pytest.raises(TargetNotFoundError):
        LoraConfig(target_modules="q_proj").plan(graph)


def test_all_linear_skips_output_head_and_exclude_modules() -> None:
    graph = llama_like()
    paths = lora_paths(LoraConfig(target_modules="all-linear"), graph)
    assert len(paths) == 12 and "lm_head" not in paths
    paths = lora_paths(LoraConfig(target_modules="all-linear", exclude_modules=["o_proj", "k_proj"]), graph)
    assert len(paths) == 6 and not any(p.endswith(("o_proj", "k_proj")) for p in paths)


def test_layers_to_transform() -> None:
    graph = llama_like()
    paths = lora_paths(LoraConfig(target_modules=["q_proj"], layers_to_transform=[0, 2]), graph)
    assert paths == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    paths = lora_paths(LoraConfig(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers"), graph)
    assert paths == ["model.layers.1.self_attn.q_proj"]
    with pytest.raises(TargetNotFoundError, match="removed them all"):
        LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]).plan(graph)


def test_nothing_matched_lists_closest_names() -> None:
    with pytest.raises(TargetNotFoundError, match=r"closest layer names: .*q_proj"):
        LoraConfig(target_modules=["q_prj"]).plan(llama_like())


def test_unsupported_kind_is_named() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"model.layers.0.norm.*RMSNorm"):
        LoraConfig(target_modules=["norm"]).plan(llama_like())
    with pytest.raises(UnsupportedLayerError, match="self_attn"):
        LoraConfig(target_modules=["self_attn"]).plan(llama_like())


def test_default_targets_by_model_type() -> None:
    assert lora_paths(LoraConfig(), llama_like(1)) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    graph = ModelGraph(layers=(linear("fc"),), model_type="mystery")
    with pytest.raises(ConfigError, match="no default for model type 'mystery'"):
        LoraConfig().plan(graph)


def test_rank_and_alpha_patterns_and_rslora() -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 32})
    ops = {op.path: op for op in config.plan(llama_like(2)).ops if isinstance(op, AddLora)}
    assert ops["model.layers.0.self_attn.q_proj"].scaling == 8.0
    assert ops["model.layers.1.self_attn.q_proj"].scaling == 2.0
    assert ops["model.layers.1.self_attn.v_proj"].r == 2 and ops["model.layers.1.self_attn.v_proj"].scaling == 4.0
    rs = LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]).plan(llama_like(1)).ops[1]
    assert rs.scaling == 2.0


def test_embedding_lora_dimensions() -> None:
    op = LoraConfig(r=2, target_modules=["embed_tokens"]).plan(llama_like(1)).ops[1]
    assert (op.layer_kind, op.in_features, op.out_features) == ("embedding", 50, 8)
    assert op.tensor_specs()["lora_A"].shape == (2, 50) and op.tensor_specs()["lora_A"].hf_name == "lora_embedding_A"
