"""Hugging Face PEFT's tuner-model and layer API (``base_model.set_adapter``, ``prefix``,
``BaseTunerLayer`` attributes), its low-level functions (``inject_adapter_in_model``,
``get_base_model_state_dict``...) and adapter dtype/placement flags, each checked
against real HF PEFT on the same model where HF defines the answer."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch

import peftcore
import peftcore_torch
from peftcore import LoraConfig, PeftModel, PeftType, get_peft_model, inject_adapter_in_model
from peftcore_torch.layers import AdapterLayer
from tests.integration import tiny

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def lora(**kwargs: Any) -> LoraConfig:
    kwargs.setdefault("target_modules", TARGETS)
    kwargs.setdefault("init_lora_weights", False)
    return LoraConfig(r=4, lora_alpha=8, **kwargs)


def hf_lora(**kwargs: Any) -> Any:
    kwargs.setdefault("target_modules", TARGETS)
    return peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tiny.random_ids(2, 6)).logits


def adapter_layers(model: Any) -> list[AdapterLayer]:
    return [m for m in model.modules() if isinstance(m, AdapterLayer)]


def test_peft_type_is_hf_enum_and_string() -> None:
    config = lora()
    assert config.peft_type is PeftType.LORA and config.peft_type == "LORA" == peft.PeftType.LORA.value
    assert config.peft_type.value == "LORA" and config.to_dict()["peft_type"] == "LORA"
    assert peftcore.PromptEncoderConfig.peft_type == peft.PeftType.P_TUNING.value


def test_layer_attributes_match_hf() -> None:
    ours = get_peft_model(tiny.llama_lm(), lora())
    theirs = peft.get_peft_model(tiny.llama_lm(), hf_lora())
    hf_layers = {n: m for n, m in theirs.named_modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)}
    our_layers = {n: m for n, m in ours.named_modules() if isinstance(m, AdapterLayer)}
    assert set(our_layers) == set(hf_layers) and our_layers
    for name, layer in our_layers.items():
        assert (layer.in_features, layer.out_features) == (hf_layers[name].in_features, hf_layers[name].out_features)
        assert layer._all_available_adapter_names() == ["default"]
        assert layer.disable_adapters is False and layer.merged is False
    ours.merge_adapter()
    assert all(layer.merged and layer.merged_adapters == ["default"] for layer in our_layers.values())
    ours.unmerge_adapter()
    first = next(iter(our_layers.values()))
    first.enable_adapters(False)
    assert first.disable_adapters and not any(layer.disable_adapters for layer in list(our_layers.values())[1:])


def test_disable_adapter_context_restores_layer_states() -> None:
    model = get_peft_model(tiny.llama_lm(), lora())
    layers = adapter_layers(model)
    with model.disable_adapter():
        assert all(layer.disable_adapters for layer in layers)
    assert not any(layer.disable_adapters for layer in layers)
    model.disable_adapter_layers()
    with model.disable_adapter():
        pass
    assert all(layer.disable_adapters for layer in layers)  # disabled before, disabled after
    model.enable_adapter_layers()
    layers[0].enable_adapters(False)
    with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
        with model.disable_adapter():
            pass
    assert not any(layer.disable_adapters for layer in layers)


def test_base_model_is_hf_tuner_model() -> None:
    model = get_peft_model(tiny.llama_lm(), lora(), adapter_name="a")
    model.add_adapter("b", lora())
    assert model.base_model.prefix == peft.LoraModel.prefix == "lora_"
    assert model.base_model.peft_config is model.peft_config
    model.base_model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a", "b"] == model.base_model.active_adapters
    assert all(layer.active_adapters == ["a", "b"] for layer in adapter_layers(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if model.base_model.prefix in n}
    assert model.active_peft_config is model.peft_config["a"]
    prompt = get_peft_model(tiny.llama_lm(), peftcore.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(AttributeError):
        prompt.base_model.prefix  # noqa: B018  (HF's prompt-learning models have none either)


def test_delete_adapter_errors_as_hf() -> None:
    model = get_peft_model(tiny.llama_lm(), lora(), adapter_name="a")
    model.add_adapter("b", lora())
    with pytest.raises(ValueError, match="Adapter unknown does not exist"):
        model.delete_adapter("unknown")
    model.set_adapter("b")
    model.merge_adapter()
    before = logits(model)
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['b'\] while they are merged"):
        model.delete_adapter("b")
    assert set(model.peft_config) == {"a", "b"} and model.merged_adapters == ["b"]
    model.delete_adapter("a")  # the unmerged one may go; the merge stays
    torch.testing.assert_close(logits(model), before)
    assert all(layer._all_available_adapter_names() == ["b"] for layer in adapter_layers(model))


def test_load_adapter_result_and_from_pretrained_config_object(tmp_path: Any) -> None:
    trained = get_peft_model(tiny.llama_lm(), lora())
    trained.save_pretrained(str(tmp_path))
    config = lora()
    loaded = PeftModel.from_pretrained(tiny.llama_lm(), str(tmp_path), config=config, device_map={"": "cpu"})
    assert loaded.peft_config["default"] is config and config.inference_mode is True
    result = loaded.load_adapter(str(tmp_path), adapter_name="other")
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(logits(loaded), logits(trained))
    hf_result = peft.PeftModel.from_pretrained(tiny.llama_lm(), str(tmp_path)).load_adapter(str(tmp_path), "other")
    assert list(hf_result.missing_keys) == result.missing_keys


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_follows_autocast_as_hf(tmp_path: Any, dtype: torch.dtype, autocast: bool) -> None:
    def dtypes(model: Any) -> set[torch.dtype]:
        return {p.dtype for n, p in model.named_parameters() if "lora_" in n}

    theirs = peft.get_peft_model(tiny.llama_lm().to(dtype), hf_lora(), autocast_adapter_dtype=autocast)
    ours = get_peft_model(tiny.llama_lm().to(dtype), lora(), autocast_adapter_dtype=autocast)
    ours.add_adapter("other", lora(), autocast_adapter_dtype=autocast)
    assert dtypes(ours) == dtypes(theirs) == {torch.float32 if autocast else dtype}
    ours.save_pretrained(str(tmp_path))
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(
            tiny.llama_lm().to(dtype), str(tmp_path), autocast_adapter_dtype=autocast,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        loaded.load_adapter(
            str(tmp_path / "other"), "other", autocast_adapter_dtype=autocast, low_cpu_mem_usage=low_cpu_mem_usage
        )
        assert dtypes(loaded) == dtypes(theirs)
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}
        if dtype == torch.float32:  # half-precision CPU kernels differ in rounding; fp32 must be exact
            torch.testing.assert_close(logits(loaded), logits(ours))


def test_low_cpu_mem_usage_builds_on_meta_until_loaded(tmp_path: Any) -> None:
    trained = get_peft_model(tiny.llama_lm(), lora())
    trained.save_pretrained(str(tmp_path))
    empty = get_peft_model(tiny.llama_lm(), lora(), low_cpu_mem_usage=True)
    assert {p.device.type for n, p in empty.named_parameters() if "lora_" in n} == {"meta"}
    empty.load_adapter(str(tmp_path), "default")  # fills the adapter in place (HF's flow)
    assert {p.device.type for p in empty.parameters()} == {"cpu"}
    torch.testing.assert_close(logits(empty), logits(trained))
    assert all(p.requires_grad is False for n, p in empty.named_parameters() if "lora_" in n)


def test_inject_adapter_in_model_returns_the_model() -> None:
    base = tiny.llama_lm()
    injected = inject_adapter_in_model(lora(), base)
    assert injected is base and adapter_layers(base)
    hf_base = tiny.llama_lm()
    peft.inject_adapter_in_model(hf_lora(), hf_base)
    assert {n for n, _ in base.named_parameters()} == {n for n, _ in hf_base.named_parameters()}
    meta = inject_adapter_in_model(lora(), tiny.llama_lm(), low_cpu_mem_usage=True)
    assert "meta" in {p.device.type for p in meta.parameters()}
    with pytest.raises(ValueError, match="target_modules"):
        inject_adapter_in_model(lora(), tiny.llama_lm(), state_dict={})


def test_base_model_state_dict_round_trip_matches_hf() -> None:
    base = tiny.llama_lm()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, lora(modules_to_save=["lm_head"]))
    extracted = peftcore_torch.get_base_model_state_dict(model)
    hf_model = peft.get_peft_model(tiny.llama_lm(), hf_lora(modules_to_save=["lm_head"]))
    assert set(extracted) == set(original) == set(peft.get_base_model_state_dict(hf_model))
    for key, value in original.items():
        assert torch.equal(extracted[key], value), key
    with torch.no_grad():
        for param in model.get_base_model().parameters():
            param.add_(1.0)
    result = peftcore_torch.set_base_model_state_dict(model, original, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    restored = peftcore_torch.get_base_model_state_dict(model)
    assert all(torch.equal(restored[k], v) for k, v in original.items())
    with pytest.raises(RuntimeError, match="unexpected keys"):
        peftcore_torch.set_base_model_state_dict(model, {**original, "nope.weight": torch.zeros(1)})
    parent, module, name = peftcore_torch.get_submodules(model, "base_model.model.model.layers.0.self_attn.q_proj")
    assert getattr(parent, name) is module and isinstance(module, AdapterLayer)


def test_push_to_hub_saves_and_uploads_the_adapter(monkeypatch: Any) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls: dict[str, Any] = {}

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> None:
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self: Any, repo_id: str, folder_path: str, **kwargs: Any) -> str:
        calls["files"] = sorted(os.listdir(folder_path))
        calls["upload"] = (repo_id, kwargs)
        return "commit"

    # the Hub is out of reach here: record what would be sent instead of sending it
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = get_peft_model(tiny.llama_lm(), lora())
    assert model.push_to_hub("me/adapter", private=True, commit_message="first") == "commit"
    assert calls["create_repo"] == ("me/adapter", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert calls["upload"][1]["commit_message"] == "first"


def test_deepcopy_keeps_the_tuner_link() -> None:
    model = get_peft_model(tiny.llama_lm(), lora())
    clone = copy.deepcopy(model)
    assert clone.base_model.peft_config is clone.peft_config is not model.peft_config
    clone.base_model.set_adapter("default")
    torch.testing.assert_close(logits(clone), logits(model))


def test_prompt_enums_as_hf() -> None:
    assert [m.value for m in peftcore.PromptTuningInit] == [m.value for m in peft.PromptTuningInit]
    assert [m.value for m in peftcore.PromptEncoderReparameterizationType] == [
        m.value for m in peft.PromptEncoderReparameterizationType
    ]
    config = peftcore.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init=peftcore.PromptTuningInit.RANDOM)
    assert type(config.prompt_tuning_init) is str and config.to_dict()["prompt_tuning_init"] == "RANDOM"
    encoder = peftcore.PromptEncoderConfig(
        num_virtual_tokens=2, token_dim=8,
        encoder_reparameterization_type=peftcore.PromptEncoderReparameterizationType.LSTM,
    )
    assert encoder.encoder_reparameterization_type == "LSTM"


def test_load_peft_weights_matches_hf(tmp_path: Any) -> None:
    get_peft_model(tiny.llama_lm(), lora()).save_pretrained(str(tmp_path))
    ours = peftcore_torch.load_peft_weights(str(tmp_path))
    theirs = peft.utils.load_peft_weights(str(tmp_path), device="cpu")
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
