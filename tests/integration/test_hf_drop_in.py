"""What code written for Hugging Face PEFT reads and writes on a peftcore model: module
layout, trainable state, LoRA's ``bias``, saved embedding matrices, reprs and the model
card, each checked against real HF PEFT on the same weights."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftcore
from peftcore import ConfigError, LoraConfig, PeftModel, get_peft_model
from tests.integration import tiny

peft = pytest.importorskip("peft")


class Net(nn.Module):
    """Two linears with biases and a norm between them."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.lin1 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.norm(self.lin0(x))))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def trainable(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))


# -- LoRA's bias --------------------------------------------------------------------------
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_lora_bias_trains_the_same_biases_and_saves_the_same_keys_as_hf(bias: str, tmp_path: Path) -> None:
    ours = get_peft_model(net(), LoraConfig(target_modules=["lin0"], bias=bias, init_lora_weights=False))
    theirs = peft.get_peft_model(net(), peft.LoraConfig(target_modules=["lin0"], bias=bias, init_lora_weights=False))
    assert trainable(ours) == trainable(theirs)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if param.requires_grad and name.endswith("bias"):
                param.add_(0.5)  # what training the biases would do
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    # each library loads the other's file, biases included
    hf_loaded = peft.PeftModel.from_pretrained(net(), tmp_path / "ours")
    torch.testing.assert_close(hf_loaded(X), ours(X))
    ours_loaded = PeftModel.from_pretrained(net(), tmp_path / "ours")
    torch.testing.assert_close(ours_loaded(X), ours(X))
    from_hf = PeftModel.from_pretrained(net(), tmp_path / "theirs")
    torch.testing.assert_close(from_hf(X), theirs(X))


def test_lora_bias_all_covers_norm_biases_and_stays_trained_when_disabled() -> None:
    model = get_peft_model(net(), LoraConfig(target_modules=["lin0"], bias="all"))
    assert {"base_model.model.norm.bias", "base_model.model.lin1.bias"} <= trainable(model)
    with torch.no_grad():
        model.base_model.model.lin1.bias.add_(1.0)
    with pytest.warns(UserWarning, match="bias configured to be 'all'"):
        with model.disable_adapter():
            disabled = model(X)
    # the bias is the base model's own: disabling the adapter does not undo its training
    torch.testing.assert_close(disabled, net()(X) + 1.0)


def test_a_second_adapter_beside_one_with_bias_is_refused_and_not_added() -> None:
    model = get_peft_model(net(), LoraConfig(target_modules=["lin0"], bias="all"), adapter_name="first")
    with pytest.raises(ValueError, match="only 1 adapter with bias"):
        model.add_adapter("second", LoraConfig(target_modules=["lin1"]))
    assert list(model.peft_config) == ["first"] and isinstance(model.base_model.model.lin1, nn.Linear)
    plain = get_peft_model(net(), LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ConfigError, match="only 1 adapter with bias"):
        plain.add_adapter("biased", LoraConfig(target_modules=["lin1"], bias="lora_only"))
    assert list(plain.peft_config) == ["default"]


def test_set_peft_model_state_dict_loads_trained_base_biases_as_hf_does() -> None:
    source = get_peft_model(net(), LoraConfig(target_modules=["lin0"], bias="all", init_lora_weights=False))
    with torch.no_grad():
        source.base_model.model.lin1.bias.fill_(1.5)
    state = peftcore.get_peft_model_state_dict(source)
    assert "base_model.model.lin1.bias" in state
    target = get_peft_model(net(), LoraConfig(target_modules=["lin0"]))  # bias="none": HF loads them anyway
    result = peftcore.set_peft_model_state_dict(target, state)
    assert result.unexpected_keys == []
    torch.testing.assert_close(target(X), source(X))


# -- layout and state ---------------------------------------------------------------------
def test_modules_to_save_state_dict_is_hf_peft_s() -> None:
    config = {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "init_lora_weights": False}
    ours = get_peft_model(net(), LoraConfig(**config))
    theirs = peft.get_peft_model(net(), peft.LoraConfig(**config))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    wrapper = ours.base_model.model.lin1
    assert isinstance(wrapper.original_module, nn.Linear) and set(wrapper.modules_to_save) == {"default"}
    with torch.no_grad():
        theirs.base_model.model.lin1.modules_to_save["default"].weight.add_(0.3)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(X), theirs(X))


def test_lora_factors_are_linear_modules_with_hf_delta_weights() -> None:
    ours = get_peft_model(net(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    theirs = peft.get_peft_model(net(), peft.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    ours.load_state_dict(theirs.state_dict())
    layer = ours.base_model.model.lin0
    factor = layer.lora_A["default"]
    assert isinstance(factor, nn.Linear) and factor.weight.shape == (8, 6) and factor.bias is None
    torch.testing.assert_close(layer.get_delta_weight("default"), theirs.base_model.model.lin0.get_delta_weight("default"))
    assert repr(layer).startswith("lora.Linear(") and "in_features=6" in repr(layer)
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    assert (layer.in_features, layer.out_features) == (6, 8)


def test_embedding_lora_starts_as_hf_s_and_trains_both_factors_at_once() -> None:
    base = nn.Sequential(nn.Embedding(50, 6), nn.Linear(6, 2))
    model = get_peft_model(base, LoraConfig(target_modules=["0"], r=4))
    layer = model.base_model.model[0]
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    assert float(a.abs().max()) == 0.0 and 0.5 < float(b.std()) < 1.5  # HF PEFT's: A zero, B unit normal
    before = (a.detach().clone(), b.detach().clone())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    assert not torch.equal(a, before[0])  # B is non-zero, so A learns from the first step, as in HF PEFT
    assert torch.equal(b, before[1])  # ...and B waits for A


def test_no_adapter_trains_inside_disable_adapter_and_inactive_ones_never_do() -> None:
    model = get_peft_model(net(), LoraConfig(target_modules=["lin0"]))
    model.add_adapter("other", LoraConfig(target_modules=["lin0", "lin1"]))
    active = trainable(model)
    assert active and all(".default." in name for name in active)
    with model.disable_adapter():
        assert trainable(model) == set()
    assert trainable(model) == active
    model.disable_adapter_layers()
    assert trainable(model) == set()
    model.enable_adapter_layers()
    assert trainable(model) == active


def test_base_model_active_adapter_lists_several_active_adapters() -> None:
    model = get_peft_model(net(), LoraConfig(target_modules=["lin0"]))
    model.add_adapter("other", LoraConfig(target_modules=["lin0"]))
    assert model.base_model.active_adapter == "default"
    model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    assert model.base_model.active_adapter == ["default", "other"]
    assert model.active_adapter == "default"  # the PeftModel's is always one name, as in HF PEFT


# -- saved embedding matrices and the model card ------------------------------------------
def test_save_embedding_layers_auto_saves_a_targeted_embedding_and_hf_loads_it(tmp_path: Path) -> None:
    base = tiny.llama_lm()
    config = {"target_modules": ["q_proj", "embed_tokens"], "init_lora_weights": False}
    model = get_peft_model(base, LoraConfig(**config))
    with torch.no_grad():  # as after resizing and training the vocabulary
        model.base_model.model.model.embed_tokens.base_layer.weight.mul_(1.5)
    with pytest.warns(UserWarning, match="embedding layers found in `target_modules`"):
        model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    torch.testing.assert_close(saved[key], model.base_model.model.model.embed_tokens.base_layer.weight)
    ids = tiny.random_ids(2, 5)
    hf_loaded = peft.PeftModel.from_pretrained(tiny.llama_lm(), tmp_path)
    ours_loaded = PeftModel.from_pretrained(tiny.llama_lm(), tmp_path)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(hf_loaded(input_ids=ids).logits, expected)
        torch.testing.assert_close(ours_loaded(input_ids=ids).logits, expected)
    model.save_pretrained(tmp_path / "without", save_embedding_layers=False)
    assert key not in load_file(tmp_path / "without" / "adapter_model.safetensors")


def test_save_embedding_layers_on_a_model_without_embedding_getters_warns_and_saves_none(tmp_path: Path) -> None:
    model = get_peft_model(net(), LoraConfig(target_modules=["lin0"]))
    with pytest.warns(UserWarning, match="not a 🤗 transformers model"):
        model.save_pretrained(tmp_path, save_embedding_layers=True)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        "base_model.model.lin0.lora_A.weight", "base_model.model.lin0.lora_B.weight",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "auto")  # nothing targeted: "auto" saves none, silently


def test_a_new_model_card_describes_the_adapters_and_how_to_load_them(tmp_path: Path) -> None:
    model = get_peft_model(copy.deepcopy(net()), LoraConfig(target_modules=["lin0"], r=4))
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")
    for heading in ("## Adapters", "## How to use", "## Training", "## Framework versions"):
        assert heading in card
    assert "`default`: lora" in card and "r=4" in card and "PeftModel.from_pretrained" in card
    assert len(card) > 1000
    assert os.path.getsize(tmp_path / "adapter_config.json") > 0
