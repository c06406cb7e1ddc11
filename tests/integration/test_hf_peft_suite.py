"""The harness that runs HF PEFT's own test file against peftcore (benchmarks/hf_peft_suite):
which cases it keeps, and that its ``peft`` module only maps names onto peftcore's."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from benchmarks.hf_peft_suite import select_cases
from tests.subprocess_env import child_env

ROOT = Path(__file__).resolve().parents[2]


class LoraConfig:  # stand-ins named as HF's config classes: the rule reads names only
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


class VeraConfig(LoraConfig):
    pass


class IA3Config(LoraConfig):
    pass


@dataclass
class CallSpec:
    params: dict


class PromptTuningConfig(LoraConfig):
    pass


@dataclass
class Path_:
    basename: str


@dataclass
class Item:
    """What the selection rule reads of a collected pytest item."""

    params: Optional[dict] = None
    function: Optional[Callable[..., Any]] = None
    file: str = "test_custom_models.py"
    callspec: Optional[CallSpec] = field(init=False)
    fspath: Path_ = field(init=False)

    def __post_init__(self) -> None:
        self.callspec = CallSpec(self.params) if self.params is not None else None
        self.fspath = Path_(self.file)


def case(model_id: str, config_cls: type, **kwargs: Any) -> Item:
    return Item({"test_name": "x", "model_id": model_id, "config_cls": config_cls, "config_kwargs": kwargs})


def test_parametrised_cases_keep_claimed_methods_layers_and_no_variants() -> None:
    assert select_cases.kept(case("MLP", LoraConfig, target_modules=["lin0"]))
    assert select_cases.kept(case("EmbConv1D", LoraConfig, target_modules=["emb"]))
    assert select_cases.kept(case("Conv2d", LoraConfig, target_modules=["conv2d"]))  # LoRA on convolutions
    assert select_cases.kept(case("Conv2d", LoraConfig, target_modules=["conv2d"], use_dora=True))  # DoRA on convs
    assert not select_cases.kept(case("Conv2dGroups", LoraConfig, target_modules=["conv2d"], use_dora=True))  # grouped
    assert not select_cases.kept(case("Conv2d", IA3Config, target_modules=["conv2d"]))  # conv claimed for LoRA only
    assert not select_cases.kept(case("Conv2d1x1", LoraConfig, target_modules=["conv2d"]))  # not a claimed model
    assert not select_cases.kept(case("MLP", VeraConfig, target_modules=["lin0"]))  # a method not claimed
    assert not select_cases.kept(case("MLP", LoraConfig, target_modules=["lin0"], use_qalora=True))  # a LoRA variant
    assert select_cases.kept(case("MLP", LoraConfig, target_modules=["lin0"], use_dora=True))  # DoRA is claimed
    assert select_cases.kept(case("Conv3d", LoraConfig, target_modules=["conv3d"], use_dora=True))
    assert not select_cases.kept(case("MLP", LoraConfig, init_lora_weights="mica"))
    # LoRA on bare parameters and trainable tokens are built (issue 25, items 5 and 6)
    assert select_cases.kept(case("MlpUsingParameters", LoraConfig, target_parameters=["lin0.weight"]))
    assert select_cases.kept(case("EmbConv1D", LoraConfig, trainable_token_indices={"emb": [0, 10]}))


def test_unparametrised_tests_are_read_from_their_source() -> None:
    def lora_on_linears() -> None:
        LoraConfig(target_modules=["lin0"])

    def lora_on_a_conv2d() -> None:
        LoraConfig(target_modules=["conv2d"])

    def another_method() -> None:
        VeraConfig(target_modules=["lin0"])

    def config_instances(config0: Any, config1: Any) -> None:
        pass

    assert select_cases.kept(Item(function=lora_on_linears))
    assert not select_cases.kept(Item(function=lora_on_a_conv2d))
    assert not select_cases.kept(Item(function=another_method))
    # configs given as parameters: their class names, and variants switched on in them
    assert select_cases.kept(Item({"config0": LoraConfig(r=2), "config1": LoraConfig(r=4)}, lora_on_linears))
    assert not select_cases.kept(Item({"config0": LoraConfig(use_qalora=True)}, lora_on_linears))


def test_a_case_is_selected_by_its_own_config_not_by_its_skip_guards() -> None:
    def guarded(config_cls: Any) -> None:
        if config_cls == VeraConfig:
            pytest.skip("another method's guard names it")
        config_cls(target_modules=["lin0"])

    def switches_qalora_on(config_cls: Any) -> None:
        config_cls(target_modules=["lin0"], use_qalora=True)

    assert select_cases.kept(Item({"config_cls": LoraConfig}, guarded))
    assert not select_cases.kept(Item({"config_cls": VeraConfig}, guarded))
    assert not select_cases.kept(Item({"config_cls": LoraConfig}, switches_qalora_on))
    # HF's LoraConfig carries a runtime_config: a runtime knob, not a variant
    assert select_cases.kept(Item({"config": LoraConfig(runtime_config=object(), use_qalora=False)}, guarded))
    assert select_cases.kept(Item({"config_cls": LoraConfig, "config_kwargs": {"target_parameters": None}}, guarded))
    assert not select_cases.kept(Item({"config_cls": LoraConfig, "config_kwargs": {"alora_invocation_tokens": [1]}}, guarded))


def test_model_level_files_claim_the_prompt_methods_too() -> None:
    def body(config_cls: Any) -> None:
        config_cls()

    decoder = dict(model_id="peft-internal-testing/tiny-random-OPTForCausalLM")
    assert select_cases.kept(Item({**decoder, "config_cls": PromptTuningConfig, "config_kwargs": {}}, body, "test_decoder_models.py"))
    assert not select_cases.kept(Item({**decoder, "config_cls": VeraConfig, "config_kwargs": {}}, body, "test_decoder_models.py"))
    assert not select_cases.kept(Item({"config_cls": PromptTuningConfig}, body))  # not in test_custom_models' claim
    assert not select_cases.kept(Item({"config_cls": LoraConfig}, body, "test_other.py"))  # a file not measured


def test_junit_names_become_the_plugins_case_ids() -> None:
    from benchmarks.hf_peft_suite.run import case_name

    assert case_name("tests.test_decoder_models.TestDecoderModels", "test_x[a-b]") == (
        "test_decoder_models.py::TestDecoderModels::test_x[a-b]"
    )
    assert case_name("tests.test_custom_models", "test_y") == "test_custom_models.py::test_y"


def test_the_peft_module_maps_hf_names_onto_peftcore() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("peftcore_ia3")
    script = textwrap.dedent(
        """
        from benchmarks.hf_peft_suite import shim
        shim.install()
        import peft, peftcore, peftcore_ia3
        from peft import LoraConfig, IA3Config, get_peft_model, KasaConfig
        from peft.tuners import lora
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper, infer_device
        from peft.import_utils import is_bnb_available
        from peftcore_torch.layers import AdapterLayer
        from peftcore_torch.lora import LoraLinear
        assert LoraConfig is peftcore.LoraConfig and IA3Config is peftcore_ia3.IA3Config
        assert get_peft_model is peftcore.get_peft_model
        assert lora.Linear is LoraLinear and BaseTunerLayer is AdapterLayer
        assert infer_device() in ("cpu", "cuda") and is_bnb_available() is False
        KasaConfig(r=4)  # what peftcore lacks can be built (HF's module does at import) but holds nothing
        assert not hasattr(KasaConfig(), "plan")
        print("mapped")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=child_env(ROOT), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "mapped"


def test_local_models_stand_in_for_hub_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id loads the tiny local build (same class, seeded weights, a tokenizer), named
    as a hub load names it; nothing is downloaded."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from benchmarks.hf_peft_suite import local_models

    model_id = "peft-internal-testing/tiny-random-OPTForCausalLM"
    recipes = local_models._recipes()
    monkeypatch.setattr(local_models, "_recipes", lambda: {model_id: recipes[model_id]})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folders = local_models.prepare(tmp_path)
    assert local_models.prepare(tmp_path) == folders  # built once, then reused
    local_models.install(folders)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_id, revision="v2.0")
    again = transformers.OPTForCausalLM.from_pretrained(model_id)
    assert type(model).__name__ == "OPTForCausalLM" and model.config._name_or_path == model_id
    assert all(a.equal(b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_id)
    assert tokenizer("this is a test prompt")["input_ids"] == tokenizer("this is a test prompt")["input_ids"]
    assert len(set(tokenizer("this is a test prompt")["input_ids"])) == 5  # words of its vocabulary
