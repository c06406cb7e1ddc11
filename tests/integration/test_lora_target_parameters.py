"""LoRA on bare parameters (``target_parameters``) against real HF PEFT.

Tiny Mixtral and Qwen3-MoE (stacked experts ``(experts, out, in)``) and GPT-OSS
(``is_transposed``: ``(experts, in, out)``) models built from their transformers configs: files move both
ways with HF PEFT's keys and nesting, outputs agree, training moves only the adapter and
lowers the loss, merge equals the unmerged forward and unmerge restores the expert
weights bit for bit, and the numpy delta of the op is the torch layer's.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tiny import seeded, train_steps  # noqa: E402

import peftcore  # noqa: E402
from peftcore.errors import ConfigError, PlanError  # noqa: E402
from peftcore.methods.lora_params import AddParamLora  # noqa: E402
from peftcore.testing.numerics import FLOAT32_RTOL, assert_close_to_scale  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
VOCAB = 60


def mixtral_lm(seed: int = 0) -> Any:
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )
    return seeded(lambda: transformers.MixtralForCausalLM(config), seed)


def gpt_oss_lm(seed: int = 0) -> Any:
    config = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
        sliding_window=8,
    )
    return seeded(lambda: transformers.GptOssForCausalLM(config), seed)


def qwen3_moe_lm(seed: int = 0) -> Any:
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, moe_intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    return seeded(lambda: transformers.Qwen3MoeForCausalLM(config), seed)


MODELS = {"mixtral": mixtral_lm, "gpt_oss": gpt_oss_lm, "qwen3_moe": qwen3_moe_lm}


def _ids(seed: int = 1) -> Any:
    return torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def _logits(model: Any, ids: Any) -> np.ndarray:
    with torch.no_grad():
        return model(ids).logits.numpy()


def _ours(base: Any, **extra: Any) -> Any:
    config = peftcore.LoraConfig(r=2, lora_alpha=4, target_parameters=EXPERTS, init_lora_weights=False, **extra)
    return peftcore.get_peft_model(copy.deepcopy(base), config)


def _hf(base: Any) -> Any:
    config = peft.LoraConfig(r=2, lora_alpha=4, target_parameters=EXPERTS, init_lora_weights=False)
    return peft.get_peft_model(copy.deepcopy(base), config)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_our_file_loads_in_hf_peft_with_the_same_outputs(name: str, tmp_path: Any) -> None:
    base, ids = MODELS[name](), _ids()
    ours = _ours(base)
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    expected = _logits(ours, ids)
    assert not np.allclose(expected, _logits(base, ids))  # the adapter does something
    assert_close_to_scale(_logits(theirs, ids), expected, FLOAT32_RTOL)
    saved = set(peft.get_peft_model_state_dict(theirs))
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in saved  # gate_up_proj, inner
    assert "base_model.model.model.layers.0.mlp.experts.lora_B.weight" in saved  # down_proj, outer


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hf_file_loads_in_peftcore_with_the_same_outputs(name: str, tmp_path: Any) -> None:
    base, ids = MODELS[name](), _ids()
    theirs = _hf(base)
    theirs.save_pretrained(str(tmp_path))
    ours = peftcore.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert_close_to_scale(_logits(ours, ids), _logits(theirs, ids), FLOAT32_RTOL)
    hf_state = peft.get_peft_model_state_dict(theirs)
    tensors = ours.export_adapter("default")
    for key, value in hf_state.items():
        canonical = key.removeprefix("base_model.model.").removesuffix(".weight")
        np.testing.assert_array_equal(tensors[canonical], value.numpy())


def test_training_lowers_the_loss_and_moves_only_the_adapter() -> None:
    base = mixtral_lm()
    model = _ours(base)
    ids = _ids()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model, {"input_ids": ids, "labels": ids}, steps=8, lr=1e-2, dropout=False)
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed), changed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if ".lora_" in n}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_merge_equals_unmerged_and_unmerge_is_exact(name: str) -> None:
    base, ids = MODELS[name](), _ids()
    model = _ours(base)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))}
    unmerged = _logits(model, ids)
    model.merge_adapter()
    assert_close_to_scale(_logits(model, ids), unmerged, FLOAT32_RTOL)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.equal(p, weights[n]), n
    merged = copy.deepcopy(model).merge_and_unload()
    assert_close_to_scale(_logits(merged, ids), unmerged, FLOAT32_RTOL)
    assert not any("lora" in n for n, _ in merged.named_parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_numpy_delta_is_the_layers(name: str) -> None:
    model = _ours(MODELS[name]())
    tensors = model.export_adapter("default")
    ops = [op for op in model.plans["default"].ops if isinstance(op, AddParamLora)]
    assert {op.parameter_name for op in ops} == {"gate_up_proj", "down_proj"}
    layers = dict(model.base_model.model.named_modules())
    for op in ops:
        layer = layers[op.path + ".base_layer" * op.depth]
        change = op.delta({k.removeprefix(op.path + "."): v for k, v in tensors.items() if k.startswith(op.path + ".")})
        assert change.shape == tuple(layer.base_weight().shape)
        assert_close_to_scale(change, layer.delta_weight("default").detach().numpy(), FLOAT32_RTOL)


def test_a_two_dimensional_parameter_is_one_linear_map(tmp_path: Any) -> None:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).eval()
    x = torch.randn(4, 6)
    ours = peftcore.get_peft_model(
        copy.deepcopy(base), peftcore.LoraConfig(r=2, target_parameters=["0.weight"], init_lora_weights=False)
    )
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    with torch.no_grad():
        assert_close_to_scale(theirs(x).numpy(), ours(x).numpy(), FLOAT32_RTOL)
        assert not torch.allclose(ours(x), base(x))


def test_a_second_adapter_on_the_same_parameters() -> None:
    base, ids = mixtral_lm(), _ids()
    model = _ours(base)
    first = _logits(model, ids)
    model.add_adapter("other", peftcore.LoraConfig(r=3, target_parameters=EXPERTS, init_lora_weights=False))
    model.set_adapter("other")
    second = _logits(model, ids)
    assert not np.allclose(first, second)
    model.set_adapter("default")
    assert_close_to_scale(_logits(model, ids), first, FLOAT32_RTOL)
    with pytest.raises(PlanError, match="same parameters"):
        model.add_adapter("third", peftcore.LoraConfig(r=2, target_parameters=["experts.gate_up_proj"]))


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"lora_dropout": 0.1}, "lora_dropout"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"target_parameters": ["experts.no_such"]}, "match no parameter"),
    ],
)
def test_bad_settings_are_refused(extra: dict, words: str) -> None:
    settings = {"r": 2, "target_parameters": EXPERTS, **extra}
    with pytest.raises(ConfigError, match=words):
        peftcore.get_peft_model(mixtral_lm(), peftcore.LoraConfig(**settings))
