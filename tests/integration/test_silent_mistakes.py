"""Mistakes Hugging Face PEFT accepts silently, which peftcore names: a ``target_modules``
entry that matches nothing, a classifier wrapped without ``task_type``, and HF config
fields for features peftcore lacks. Each is checked against real HF PEFT's behaviour."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import peftcore  # noqa: E402
from peftcore import PeftWarning  # noqa: E402
from tests.integration import tiny  # noqa: E402


def adapted(model: Any) -> set[str]:
    return {name.split(".lora_A")[0].removeprefix("base_model.model.") for name, _ in model.named_parameters() if ".lora_A." in name}


def trainable(model: Any) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def peft_warnings(record: list) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, PeftWarning)]


def test_a_target_entry_matching_nothing_warns_with_the_closest_short_names() -> None:
    with pytest.warns(PeftWarning, match=r"entry 'v_prj' matches no layer.*closest layer names: v_proj") as record:
        ours = peftcore.get_peft_model(tiny.llama_lm(), peftcore.LoraConfig(target_modules=["q_proj", "v_prj"]))
    message = peft_warnings(record.list)[0]
    assert "self_attn" not in message  # short names, as target_modules takes them
    assert record.list[0].filename == __file__  # it points at the user's line
    # HF PEFT adapts the same layers and says nothing
    with warnings.catch_warnings(record=True) as hf_record:
        warnings.simplefilter("always")
        theirs = peft.get_peft_model(tiny.llama_lm(), peft.LoraConfig(target_modules=["q_proj", "v_prj"]))
    assert not [w for w in hf_record if "v_prj" in str(w.message)]
    assert adapted(ours) == adapted(theirs) == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}


def test_any_unmatched_name_gets_suggestions_not_only_near_misses() -> None:
    with pytest.warns(PeftWarning, match=r"'attention' matches no layer.*layer names it can adapt: .*q_proj"):
        peftcore.get_peft_model(tiny.llama_lm(), peftcore.LoraConfig(target_modules=["q_proj", "attention"]))
    with pytest.raises(peftcore.TargetNotFoundError, match=r"closest layer names: q_proj") as info:
        peftcore.get_peft_model(tiny.llama_lm(), peftcore.LoraConfig(target_modules=["model.layers.0.self_attn.q_prj"]))
    assert "model.layers.0.self_attn.q_proj" not in str(info.value)
    with pytest.raises(ValueError):  # HF PEFT refuses it too, without suggestions
        peft.get_peft_model(tiny.llama_lm(), peft.LoraConfig(target_modules=["model.layers.0.self_attn.q_prj"]))


def test_matching_targets_and_defaults_say_nothing() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        peftcore.get_peft_model(tiny.llama_lm(), peftcore.LoraConfig(target_modules=["q_proj", "v_proj"]))
        peftcore.get_peft_model(tiny.bert_cls(), peftcore.LoraConfig(task_type="SEQ_CLS"))
        peftcore.get_peft_model(tiny.llama_lm(), peftcore.LoraConfig(target_modules=r".*\.(q|v)_proj"))
    assert not peft_warnings(record)


def test_a_classifier_without_task_type_warns_how_to_fix_it(tmp_path: Path) -> None:
    config = {"target_modules": ["query", "value"]}
    with pytest.warns(PeftWarning, match=r"no task_type.*'classifier' is neither trained nor saved.*task_type='SEQ_CLS'"):
        ours = peftcore.get_peft_model(tiny.bert_cls(), peftcore.LoraConfig(**config))
    theirs = peft.get_peft_model(tiny.bert_cls(), peft.LoraConfig(**config))
    # what the warning is about: HF PEFT leaves the head frozen and out of the file too
    assert trainable(ours) == trainable(theirs) and not any("classifier" in n for n in trainable(theirs))
    theirs.save_pretrained(str(tmp_path))
    assert "classifier" not in json.dumps(list(peft.load_peft_weights(str(tmp_path))))
    # the fixes it names say nothing
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        peftcore.get_peft_model(tiny.bert_cls(), peftcore.LoraConfig(task_type="SEQ_CLS", **config))
        peftcore.get_peft_model(tiny.bert_cls(), peftcore.LoraConfig(modules_to_save=["classifier"], **config))
        peftcore.get_peft_model(tiny.llama_lm(), peftcore.LoraConfig(target_modules=["q_proj"]))  # an LM head is no classifier
    assert not peft_warnings(record)
    with pytest.warns(PeftWarning, match="'classifier'"):
        peftcore.get_peft_model(tiny.bert_cls(), peftcore.PromptTuningConfig(num_virtual_tokens=2))


def test_an_hf_field_peftcore_lacks_gets_the_file_loader_s_message(tmp_path: Path) -> None:
    with pytest.raises(peftcore.ConfigError) as from_keyword:
        peftcore.LoraConfig(use_qalora=True)
    assert "did you mean" not in str(from_keyword.value)
    data = {**peftcore.LoraConfig(target_modules=["q_proj"]).to_dict(), "use_qalora": True}
    with pytest.raises(peftcore.ConfigError) as from_file:
        peftcore.LoraConfig.from_dict(data)
    assert str(from_keyword.value) == str(from_file.value) == (
        "LoraConfig: use_qalora=True is an HF PEFT feature peftcore does not support; leave use_qalora at its "
        "default (or remove it) to use this method without it"
    )
    # HF's "feature off" values are accepted, as in HF PEFT's own scripts
    config = peftcore.LoraConfig(use_qalora=False, lora_bias=False, loftq_config={}, megatron_core="megatron.core")
    assert config == peftcore.LoraConfig()
    assert peft.LoraConfig(use_qalora=True).use_qalora  # where HF has the feature
    with pytest.raises(TypeError, match="lora_alhpa"):  # an unknown name is still a did-you-mean TypeError
        peftcore.LoraConfig(lora_alhpa=8)
