"""Hugging Face PEFT's public names and arguments, with HF's meaning (one test per name)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

import peftcore
from peftcore import (
    ConfigError,
    LoraConfig,
    PeftModel,
    TaskType,
    get_peft_config,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peftcore.testing.numerics import assert_close_to_scale
from tests.integration import tiny

peft = pytest.importorskip("peft")


def lora(**kwargs: Any) -> LoraConfig:
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    kwargs.setdefault("init_lora_weights", False)
    return LoraConfig(r=4, lora_alpha=8, **kwargs)


def out(model: Any) -> torch.Tensor:
    ids = tiny.random_ids(2, 6)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_task_type_names_and_validation() -> None:
    assert [t.value for t in TaskType] == [t.value for t in peft.TaskType]
    config = LoraConfig(task_type=TaskType.SEQ_CLS)
    assert config.task_type == "SEQ_CLS" and type(config.task_type) is str
    assert json.loads(config.to_json())["task_type"] == "SEQ_CLS"
    with pytest.raises(ValueError, match="CAUSAL_LM"):
        LoraConfig(task_type="CAUSAL")


def test_lora_bias_values_are_hf_peft_s() -> None:
    for value in ("none", "all", "lora_only"):
        assert LoraConfig(bias=value).bias == value
    with pytest.raises(ConfigError, match="bias must be one of"):
        LoraConfig(bias="some")


def test_unknown_config_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="lora_alhpa"):
        LoraConfig(lora_alhpa=8)
    with pytest.raises(ConfigError):
        LoraConfig(lora_alhpa=8)


def test_get_peft_model_hf_arguments() -> None:
    model = get_peft_model(tiny.llama_lm(), lora(), autocast_adapter_dtype=True, mixed=False)
    assert model.active_adapter == "default"
    with pytest.raises(ConfigError, match="mixed"):
        get_peft_model(tiny.llama_lm(), lora(), mixed=True)


def test_base_model_name_or_path_is_recorded(tmp_path: Any) -> None:
    tiny.llama_lm().save_pretrained(str(tmp_path / "base"))
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    model = get_peft_model(base, lora())
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")


def test_from_pretrained_hf_arguments(tmp_path: Any) -> None:
    trained = get_peft_model(tiny.llama_lm(), lora(task_type="CAUSAL_LM"))
    trained.save_pretrained(str(tmp_path))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    loaded = PeftModel.from_pretrained(
        tiny.llama_lm(), str(tmp_path), config=config, torch_device="cpu", low_cpu_mem_usage=True,
        autocast_adapter_dtype=True,
    )
    torch.testing.assert_close(out(loaded), out(trained))
    assert loaded.peft_config["default"].inference_mode is True
    with pytest.raises(TypeError, match="bogus"):
        PeftModel.from_pretrained(tiny.llama_lm(), str(tmp_path), bogus=1)


def test_save_pretrained_hf_arguments_and_model_card(tmp_path: Any) -> None:
    base = tiny.llama_lm()
    base.config._name_or_path = "my/base"  # as from_pretrained("my/base") sets it
    model = get_peft_model(base, lora())
    model.save_pretrained(str(tmp_path), safe_serialization=True, save_embedding_layers="auto")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(os.listdir(tmp_path))
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "base_model: my/base" in card and "library_name: peft" in card
    # HF PEFT names no base model for a model without a config, whatever the adapter config says
    plain = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), lora(target_modules=["0"], base_model_name_or_path="x"))
    plain.save_pretrained(str(tmp_path / "plain"))
    plain_card = (tmp_path / "plain" / "README.md").read_text()
    assert "base_model" not in plain_card and "library_name: peft" in plain_card
    model.save_pretrained(str(tmp_path / "b"), safe_serialization=False)  # HF's pickle: see test_bin_weights
    assert "adapter_model.bin" in os.listdir(tmp_path / "b")
    model.save_pretrained(str(tmp_path / "c"), save_embedding_layers=True)  # see test_hf_drop_in for what it saves
    model.save_pretrained(str(tmp_path / "d"), is_main_process=False)
    assert not (tmp_path / "d").exists()
    # the card HF PEFT reads, and an existing card keeps its text
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "README.md").write_text("My notes\n")
    model.save_pretrained(str(tmp_path / "e"))
    assert "My notes" in (tmp_path / "e" / "README.md").read_text()


def test_add_adapter_hf_argument_names() -> None:
    model = get_peft_model(tiny.llama_lm(), lora())
    model.add_adapter(adapter_name="other", peft_config=lora(), low_cpu_mem_usage=False, autocast_adapter_dtype=True)
    assert set(model.peft_config) == {"default", "other"}
    model.add_adapter("third", lora())
    assert model.active_adapter == "default"


def test_get_and_set_peft_model_state_dict() -> None:
    source = get_peft_model(tiny.llama_lm(), lora())
    state = get_peft_model_state_dict(source)
    hf = peft.get_peft_model(tiny.llama_lm(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert set(state) == set(peft.get_peft_model_state_dict(hf))
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    target = get_peft_model(tiny.llama_lm(), lora())
    result = set_peft_model_state_dict(target, state)
    assert result.unexpected_keys == []
    torch.testing.assert_close(out(target), out(source))
    # and HF's own state dict, adapter names in the keys, loads too
    peft.set_peft_model_state_dict(hf, peft.get_peft_model_state_dict(hf))
    result = set_peft_model_state_dict(target, {**{k: v for k, v in hf.state_dict().items() if "lora_" in k}})
    torch.testing.assert_close(out(target), out(hf))


def test_disable_and_enable_adapter_layers() -> None:
    base = out(tiny.llama_lm())
    model = get_peft_model(tiny.llama_lm(), lora())
    adapted = out(model)
    model.disable_adapter_layers()
    torch.testing.assert_close(out(model), base)
    model.enable_adapter_layers()
    torch.testing.assert_close(out(model), adapted)


@pytest.mark.parametrize("weights", [(0.7, 0.4), (-0.7, 0.4)], ids=["positive", "negative"])
@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_hf(combination: str, weights: tuple) -> None:
    ours = get_peft_model(tiny.llama_lm(), lora())
    torch.manual_seed(7)
    ours.add_adapter("b", lora())
    hf = peft.get_peft_model(
        tiny.llama_lm(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    hf.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    for name in ("default", "b"):
        set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(hf, adapter_name=name), adapter_name=name)
    kwargs: dict[str, Any] = {"svd_rank": 6} if combination == "svd" else {}
    ours.add_weighted_adapter(["default", "b"], list(weights), "mix", combination_type=combination, **kwargs)
    hf.add_weighted_adapter(["default", "b"], list(weights), "mix", combination_type=combination, **kwargs)
    ours.set_adapter("mix")
    hf.set_adapter("mix")
    assert_close_to_scale(out(ours), out(hf))
    assert torch.isfinite(out(ours)).all()  # a negative weight once gave NaN factors (sqrt of a negative)
    if combination == "cat":  # exactly the weighted sum of the deltas
        ours.set_adapter("default")
        with pytest.raises(ValueError, match="'ties' needs a density"):  # TIES prunes: HF needs a density too
            ours.add_weighted_adapter(["default", "b"], [1.0, 1.0], "t", combination_type="ties")
        with pytest.raises(ValueError, match="not supported"):
            ours.add_weighted_adapter(["default", "b"], [1.0, 1.0], "t", combination_type="median")


def test_auto_peft_model_classes(tmp_path: Any) -> None:
    from peftcore_torch import AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

    tiny.llama_lm().save_pretrained(str(tmp_path / "llama"))
    tiny.bert_cls().save_pretrained(str(tmp_path / "bert"))
    import transformers

    lm = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama")), lora(task_type="CAUSAL_LM"))
    lm.save_pretrained(str(tmp_path / "lm_adapter"))
    for cls in (AutoPeftModel, AutoPeftModelForCausalLM):
        loaded = cls.from_pretrained(str(tmp_path / "lm_adapter"))
        assert isinstance(loaded, PeftModel)
        torch.testing.assert_close(out(loaded), out(lm.eval()))
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    cls_model = get_peft_model(transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "bert")), config)
    cls_model.save_pretrained(str(tmp_path / "cls_adapter"))
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "cls_adapter"))
    torch.testing.assert_close(out(loaded), out(cls_model.eval()))
    with pytest.raises(ValueError, match="SEQ_CLS"):
        AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "cls_adapter"))


def test_merge_warnings_as_hf() -> None:
    model = get_peft_model(tiny.llama_lm(), lora())
    model.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    with pytest.warns(UserWarning, match="merged"):
        model.disable_adapter_layers()
    assert model.merged_adapters == []
    model.enable_adapter_layers()


def test_hf_names_are_exported() -> None:
    for name in ("TaskType", "get_peft_config", "get_peft_model_state_dict", "set_peft_model_state_dict",
                 "UnknownFieldError"):
        assert name in peftcore.__all__ and hasattr(peftcore, name)


def test_get_peft_config() -> None:
    config = get_peft_config({"peft_type": "LORA", "r": 4, "task_type": "CAUSAL_LM", "peft_version": "9.9"})
    assert isinstance(config, LoraConfig) and config.r == 4 and config.task_type == "CAUSAL_LM"
    hf_dict = peft.LoraConfig(r=4, target_modules=["q_proj"]).to_dict()
    assert get_peft_config(json.loads(json.dumps(hf_dict, default=list))).target_modules == ["q_proj"]
