"""HF PEFT's model-level API, against the real ``peft``: loading adapters saved side by
side (prefix tuning, a RoBERTa head in modules_to_save, (IA)^3 SEQ_CLS), unload() of a
prompt, merge_and_unload(adapter_names=...), set_requires_grad, a layer's set_adapter,
set_adapter over shared modules_to_save, add_weighted_adapter with modules_to_save."""

from __future__ import annotations

import os
import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import peftcore  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from peftcore_ia3 import IA3Config  # noqa: E402
from tests.integration.tiny import llama_lm, random_ids  # noqa: E402
from tests.integration.tiny_architectures import BUILDS  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

roberta_cls = BUILDS["roberta"][0]


def _quiet(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


def _randomise(model):
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _logits(model, ids):
    with torch.no_grad():
        return _quiet(model, input_ids=ids, attention_mask=torch.ones_like(ids)).logits


SIDE_BY_SIDE = {
    "prefix-llama": (llama_lm, lambda: peftcore.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")),
    "lora-roberta-head": (roberta_cls, lambda: peftcore.LoraConfig(r=2, task_type="SEQ_CLS")),
    "ia3-roberta-head": (roberta_cls, lambda: IA3Config(task_type="SEQ_CLS")),
}


@pytest.mark.parametrize("case", sorted(SIDE_BY_SIDE))
def test_adapters_saved_side_by_side_load_back(case, tmp_path):
    build, config = SIDE_BY_SIDE[case]
    model = peftcore.get_peft_model(build(), config())
    model.add_adapter("new_adapter", config())
    for name in ("default", "new_adapter"):
        model.set_adapter(name)
        _randomise(model)
    model.save_pretrained(str(tmp_path))
    loaded = peftcore.PeftModel.from_pretrained(build(), str(tmp_path))
    loaded.load_adapter(os.path.join(tmp_path, "new_adapter"), "new_adapter")
    ids = random_ids(2, 5)
    for name in ("default", "new_adapter"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        original = peftcore.get_peft_model_state_dict(model, adapter_name=name)
        assert original.keys() == peftcore.get_peft_model_state_dict(loaded, adapter_name=name).keys()
        assert torch.equal(_logits(loaded, ids), _logits(model, ids))  # the same tensors, reloaded
        # HF PEFT reads the same directory: the same outputs
        hf = _quiet(peft.PeftModel.from_pretrained, build(), str(tmp_path) if name == "default" else str(tmp_path / name))
        assert_close_to_scale(_logits(hf, ids), _logits(model, ids))
    if case.endswith("head"):
        assert any(".classifier." in key for key in original)  # the SEQ_CLS head is trained and saved


@pytest.mark.parametrize("library", [peft, peftcore], ids=["hf", "peftcore"])
@pytest.mark.parametrize("config", ["PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig"])
def test_unload_of_a_prompt_raises_attribute_error(library, config):
    model = _quiet(library.get_peft_model, llama_lm(), getattr(library, config)(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    with pytest.raises(AttributeError):
        model.unload()
    if library is peftcore:
        plain = model.unload(prompt_learning=True)  # peftcore's way to take a prompt out
        ids = random_ids(2, 5)
        assert torch.equal(_logits(plain, ids), _logits(llama_lm(), ids))  # the base, untouched


def _two_lora_adapters(tmp_path):
    """An HF model with two random LoRA adapters saved, and the same loaded in peftcore."""
    config = dict(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    hf = _quiet(peft.get_peft_model, llama_lm(), peft.LoraConfig(**config))
    hf.add_adapter("adapter-2", peft.LoraConfig(**config))
    hf.save_pretrained(str(tmp_path))
    ours = peftcore.PeftModel.from_pretrained(llama_lm(), str(tmp_path))
    ours.load_adapter(str(tmp_path / "adapter-2"), "adapter-2")
    return hf, ours


@pytest.mark.parametrize("names", [["adapter-2"], ["default"], ["adapter-2", "default"]])
def test_merge_and_unload_given_adapters_as_hf(names, tmp_path):
    hf, ours = _two_lora_adapters(tmp_path)
    ids = random_ids(2, 5)
    expected = _logits(_quiet(hf.merge_and_unload, adapter_names=names), ids)
    got = _logits(ours.merge_and_unload(adapter_names=names), ids)
    assert_close_to_scale(got, expected)


def _grads(model, adapter):
    return {n: p.requires_grad for n, p in model.named_parameters() if f".{adapter}." in n or n.endswith(f".{adapter}")}


def test_set_requires_grad_as_hf():
    flags = {}
    for library in (peft, peftcore):
        model = _quiet(library.get_peft_model, llama_lm(), library.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="adapter0")
        model.add_adapter("adapter1", library.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
        before = _grads(model, "adapter1")
        model.set_requires_grad(adapter_names="adapter1")
        enabled = _grads(model, "adapter1")
        model.set_requires_grad(adapter_names=["adapter0", "adapter1"], requires_grad=False)
        flags[library.__name__] = (before, enabled, _grads(model, "adapter0"), _grads(model, "adapter1"))
    hf, ours = flags["peft"], flags["peftcore"]
    for hf_part, our_part in zip(hf, ours):
        assert sorted(set(hf_part.values())) == sorted(set(our_part.values()))
        assert len(our_part) > 0
    assert set(ours[1].values()) == {True} and set(ours[0].values()) == {False}
    prompt = peftcore.get_peft_model(llama_lm(), peftcore.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match="not supported for prompt learning methods like PROMPT_TUNING"):
        prompt.set_requires_grad(adapter_names="default")


def test_layer_set_adapter_with_a_list():
    model = peftcore.get_peft_model(llama_lm(), peftcore.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", peftcore.LoraConfig(r=2, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.set_adapter(["default", "other"])
    assert layer.active_adapters == ["default", "other"]
    assert all(p.requires_grad for n, p in layer.named_parameters() if "lora_" in n)
    layer.set_adapter("other")
    assert layer.active_adapters == ["other"]
    assert {n.split(".")[1]: p.requires_grad for n, p in layer.named_parameters() if "lora_A" in n} == {"default": False, "other": True}


@pytest.mark.parametrize("library", [peft, peftcore], ids=["hf", "peftcore"])
def test_active_adapters_sharing_a_modules_to_save_module_are_refused(library):
    model = _quiet(library.get_peft_model, llama_lm(), library.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model.add_adapter("other", library.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        model.base_model.set_adapter(["default", "other"])
    distinct = _quiet(library.get_peft_model, llama_lm(), library.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    distinct.add_adapter("other", library.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    distinct.base_model.set_adapter(["default", "other"])
    assert distinct.base_model.model.lm_head.active_adapters == ["default"]
    assert distinct.base_model.model.model.embed_tokens.active_adapters == ["other"]


def test_add_weighted_adapter_with_modules_to_save_as_hf(tmp_path):
    combined = {}
    for library in (peft, peftcore):
        torch.manual_seed(0)
        model = _quiet(library.get_peft_model, llama_lm(), library.LoraConfig(
            r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False))
        model.add_adapter("b", library.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        if library is peft:
            model.save_pretrained(str(tmp_path))
        else:  # the same adapters as HF's
            model = peftcore.PeftModel.from_pretrained(llama_lm(), str(tmp_path))
            model.load_adapter(str(tmp_path / "b"), "b")
        _quiet(model.add_weighted_adapter, ["default", "b"], [0.5, 0.8], "mix", combination_type="cat")
        combined[library.__name__] = library.get_peft_model_state_dict(model, adapter_name="mix")
        shared = _quiet(library.get_peft_model, llama_lm(), library.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
        shared.add_adapter("b", library.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
        with pytest.raises(ValueError, match="target the same module with modules_to_save"):
            shared.add_weighted_adapter(["default", "b"], [0.5, 0.8], "mix", combination_type="cat")
    assert combined["peft"].keys() == combined["peftcore"].keys()
    assert any("lm_head" in key for key in combined["peftcore"])
    for key, value in combined["peft"].items():
        assert_close_to_scale(combined["peftcore"][key], value, err_msg=key)


def test_add_weighted_ia3_adapters_as_hf(tmp_path):
    """(IA)^3 vectors combine as HF PEFT combines them: the weighted sum, over the layers
    any of the adapters scales (here one adapter scales more layers than the other)."""
    torch.manual_seed(0)
    hf = _quiet(peft.get_peft_model, llama_lm(), peft.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False))
    hf.add_adapter("b", peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[], init_ia3_weights=False))
    hf.save_pretrained(str(tmp_path))
    ours = peftcore.PeftModel.from_pretrained(llama_lm(), str(tmp_path))
    ours.load_adapter(str(tmp_path / "b"), "b")
    for model in (hf, ours):
        _quiet(model.add_weighted_adapter, ["default", "b"], [0.5, 1.5], "mix")
    expected = peft.get_peft_model_state_dict(hf, adapter_name="mix")
    got = peftcore.get_peft_model_state_dict(ours, adapter_name="mix")
    assert got.keys() == expected.keys() and any("down_proj" in key for key in got)
    for key, value in expected.items():
        assert_close_to_scale(got[key], value, err_msg=key)
    ids = random_ids(2, 5)
    hf.set_adapter("mix")
    ours.set_adapter("mix")
    expected_logits = _logits(hf, ids)
    got_logits = _logits(ours, ids)
    assert_close_to_scale(got_logits, expected_logits)


@pytest.mark.parametrize("config", ["PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig"])
def test_prompt_encoder_holds_the_trained_prompt_tensors(config):
    """HF PEFT's ``model.prompt_encoder``: each prompt adapter's trained tensors (the same
    parameter objects the model trains), and every one gets a gradient, as HF's tests ask."""
    hf = _quiet(peft.get_peft_model, llama_lm(), getattr(peft, config)(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    ours = peftcore.get_peft_model(llama_lm(), getattr(peftcore, config)(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    ids = random_ids(2, 4)
    for model in (hf, ours):
        _quiet(model, input_ids=ids)[0].sum().backward()
        assert all(p.grad is not None for p in model.prompt_encoder.parameters())
    trained = {id(p) for p in ours.parameters() if p.requires_grad}
    assert {id(p) for p in ours.prompt_encoder["default"].parameters()} == trained
    assert sum(p.numel() for p in ours.prompt_encoder.parameters()) >= 3 * 32
    with pytest.raises(AttributeError):
        _ = peftcore.get_peft_model(llama_lm(), peftcore.LoraConfig(r=2, target_modules=["q_proj"])).prompt_encoder
