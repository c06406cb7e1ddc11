"""HF PEFT's config-level API: configs built without ``num_virtual_tokens``, a config's
own ``save_pretrained`` / ``from_pretrained`` / ``from_json_file``, the ``peft_type=``
keyword, and ``PrefixTuningConfig(init_weights=...)``, each against the real ``peft``."""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import peftcore  # noqa: E402
from peftcore.errors import ConfigError  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from tests.integration.tiny import llama_lm, random_ids  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

PROMPT_CONFIGS = ["PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig"]
ALL_CONFIGS = [*PROMPT_CONFIGS, "LoraConfig"]


def _hf_keys(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in ("peft_version", "auto_mapping", "revision")}


@pytest.mark.parametrize("name", PROMPT_CONFIGS)
def test_prompt_configs_build_without_num_virtual_tokens_as_hf_does(name):
    ours, theirs = getattr(peftcore, name)(), getattr(peft, name)()
    assert ours.num_virtual_tokens is None and theirs.num_virtual_tokens is None
    with pytest.raises(ConfigError, match="num_virtual_tokens is not set"):
        peftcore.get_peft_model(llama_lm(), getattr(peftcore, name)(task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match="num_virtual_tokens must be positive"):
        getattr(peftcore, name)(num_virtual_tokens=0)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_save_pretrained_round_trips_and_hf_reads_it(name, tmp_path):
    config = getattr(peftcore, name)(task_type="CAUSAL_LM", num_virtual_tokens=4) if name in PROMPT_CONFIGS else (
        peftcore.LoraConfig(r=4, target_modules=["q_proj"])
    )
    config.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == config.hf_dict()[0]
    assert getattr(peftcore, name).from_pretrained(str(tmp_path)).to_dict() == config.to_dict()
    loaded = peftcore.PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is getattr(peftcore, name) and loaded.to_dict() == config.to_dict()
    assert getattr(peftcore, name).from_json_file(str(tmp_path / "adapter_config.json")) == config.hf_dict()[0]
    hf = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert type(hf).__name__ == name
    shared = {key: value for key, value in config.to_dict().items() if hasattr(hf, key)}  # HF's own fields
    assert len(shared) >= 8
    for key, value in shared.items():
        hf_value = getattr(hf, key)
        assert (sorted(hf_value) if isinstance(hf_value, set) else hf_value) == value, key


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_saved_by_hf_loads_here(name, tmp_path):
    hf = getattr(peft, name)(task_type="CAUSAL_LM", num_virtual_tokens=4) if name in PROMPT_CONFIGS else (
        peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    hf.save_pretrained(str(tmp_path))
    ours = peftcore.PeftConfig.from_pretrained(str(tmp_path), revision="main")  # a download option: unused
    assert type(ours).__name__ == name
    assert ours.task_type == "CAUSAL_LM"
    overridden = peftcore.PeftConfig.from_pretrained(str(tmp_path), inference_mode=True)
    assert overridden.inference_mode is True
    hf_file = peft.PeftConfig.from_json_file(str(tmp_path / "adapter_config.json"))
    assert peftcore.PeftConfig.from_json_file(str(tmp_path / "adapter_config.json")) == hf_file


def test_config_files_are_local_only_and_checked(tmp_path):
    with pytest.raises(ConfigError, match="never downloads"):
        peftcore.PeftConfig.from_pretrained("someone/some-adapter")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"foo": "bar"}))
    with pytest.raises(TypeError, match="missing required keys: {'peft_type'}"):
        peftcore.LoraConfig.from_pretrained(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        peftcore.LoraConfig.from_json_file(str(tmp_path / "adapter_config.json"))
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        peftcore.LoraConfig().save_pretrained(str(afile))


def test_from_peft_type_and_the_peft_type_keyword():
    assert type(peftcore.PeftConfig.from_peft_type(peft_type="PREFIX_TUNING", num_virtual_tokens=3)) is peftcore.PrefixTuningConfig
    assert type(peft.PeftConfig.from_peft_type(peft_type="PREFIX_TUNING", num_virtual_tokens=3)).__name__ == "PrefixTuningConfig"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = peftcore.LoraConfig(peft_type="LORA", r=4)
    assert config.r == 4 and config.to_dict()["peft_type"] == "LORA"
    with pytest.warns(UserWarning, match="is ignored"):
        assert peftcore.LoraConfig(peft_type="test").to_dict()["peft_type"] == "LORA"


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_init_weights_zero_as_hf(projection, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(llama_lm(), peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=3, init_weights="zero", prefix_projection=projection))
    ours = peftcore.get_peft_model(llama_lm(), peftcore.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, init_weights="zero", prefix_projection=projection))
    assert hf.get_prompt(batch_size=1) is not None
    ids = random_ids(2, 5)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        expected, got = hf(**inputs).logits, ours(**inputs).logits
    assert_close_to_scale(got, expected)
    assert peftcore.PrefixTuningConfig(init_weights="zero").to_dict()["init_weights"] == "zero"
    with pytest.raises(ConfigError, match="init_weights"):
        peftcore.PrefixTuningConfig(init_weights="ones")


@pytest.mark.parametrize("keywords, message", [
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "`layers_to_transform` cannot be used when `target_modules` is a str"),
    ({"target_modules": ".*q_proj", "layers_pattern": ["layers"]}, "`layers_pattern` cannot be used when `target_modules` is a str"),
    ({"target_modules": ["q_proj"], "layers_pattern": "layers"}, "When `layers_pattern` is specified, `layers_to_transform` must also"),
])
def test_lora_layer_indexing_rules_as_hf(keywords, message):
    for library in (peft, peftcore):
        with pytest.raises(ValueError, match=message):
            library.LoraConfig(**keywords)
    assert peftcore.LoraConfig(target_modules=["q_proj"], layers_pattern="layers", layers_to_transform=[0]).layers_to_transform == [0]
    assert peftcore.LoraConfig(target_modules="all-linear", layers_to_transform=[0]).layers_to_transform == [0]  # peftcore's


def test_peftcore_fields_of_a_config_saved_alone_stay_out_of_hf_keys(tmp_path):
    config = peftcore.PrefixTuningConfig(num_virtual_tokens=3, attention_module="attn", key_module="attn.k_proj")
    config.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "attention_module" not in saved and saved["peftcore_config"] == {"attention_module": "attn", "key_module": "attn.k_proj"}
    assert peftcore.PeftConfig.from_pretrained(str(tmp_path)).to_dict() == config.to_dict()
    plain = tmp_path / "plain"
    peftcore.PrefixTuningConfig(num_virtual_tokens=3).save_pretrained(str(plain))
    assert "peftcore_config" not in json.loads((plain / "adapter_config.json").read_text())
