import json

import pytest

import peftcore
from peftcore import ConfigError, LoraConfig, PeftCoreError, PeftRegistry, UnknownMethodError


def test_unknown_field_is_named_with_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"no field 'lora_alfa'.*'lora_alpha'"):
        LoraConfig(lora_alfa=16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -3}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be int"),
        ({"r": True}, "r must be int"),
        ({"lora_alpha": 0}, "lora_alpha must be positive"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"init_lora_weights": "pissa_niter_"}, "init_lora_weights"),
        ({"target_modules": 3}, "target_modules must be"),
        ({"target_modules": "("}, "not a valid regular expression"),
        ({"layers_to_transform": ["0"]}, "layers_to_transform"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern"),
        ({"modules_to_save": "classifier"}, "modules_to_save"),
    ],
)
def test_bad_values_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_positional_arguments_are_rejected() -> None:
    with pytest.raises(ConfigError, match="keyword arguments only"):
        LoraConfig(8)  # type: ignore[misc]


def test_json_round_trip_uses_hf_keys() -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], use_rslora=True, backend="torch")
    data = json.loads(config.to_json())
    assert data["peft_type"] == "LORA" and data["r"] == 4 and data["target_modules"] == ["q", "v"]
    assert "backend" not in data  # runtime choice, not saved
    again = LoraConfig.from_json(config.to_json())
    assert again.replace(backend="torch") == config


def test_reads_hf_peft_config_keys() -> None:
    hf = {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none",
        "use_dora": False, "megatron_core": "megatron.core", "loftq_config": {}, "peft_version": "0.21.2",
        "revision": None, "auto_mapping": None, "task_type": "CAUSAL_LM",
    }
    config = PeftRegistry.config_from_dict(hf)
    assert isinstance(config, LoraConfig) and config.r == 4


def test_unsupported_hf_feature_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="use_qalora=True is an HF PEFT feature"):
        LoraConfig.from_dict({"peft_type": "LORA", "use_qalora": True})
    assert LoraConfig.from_dict({"peft_type": "LORA", "use_dora": True}).use_dora  # DoRA is built


def test_unknown_key_in_file_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no field 'rank'"):
        LoraConfig.from_dict({"peft_type": "LORA", "rank": 4})


def test_unknown_method() -> None:
    with pytest.raises(UnknownMethodError, match="unknown PEFT method 'lorra'.*'lora'"):
        PeftRegistry.get("lorra")
    with pytest.raises(PeftCoreError):
        PeftRegistry.config_from_dict({"peft_type": "NOPE"})


def test_register_method_decorator() -> None:
    @peftcore.register_method("unit_test_method")
    @peftcore.config_class
    class UnitConfig(peftcore.PeftConfig):
        width: int = 3

    assert PeftRegistry.get("unit_test_method") is UnitConfig
    assert UnitConfig.peft_type == "UNIT_TEST_METHOD"
    assert isinstance(PeftRegistry.config_from_dict({"peft_type": "UNIT_TEST_METHOD", "width": 5}), UnitConfig)
    with pytest.raises(ConfigError, match="already registered"):
        PeftRegistry.add("unit_test_method", LoraConfig)
