"""Defaults for every architecture HF PEFT knows: LoRA's and (IA)^3's target layers and
prefix tuning's layout, checked against the installed HF ``peft``."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from peft.utils import constants as hf_constants  # noqa: E402

import peftcore  # noqa: E402
from peftcore.architectures import ia3_defaults, lora_default  # noqa: E402
from peftcore.errors import PlanError  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from peftcore_ia3 import IA3Config  # noqa: E402
from tests.integration.tiny import random_ids  # noqa: E402
from tests.integration.tiny_architectures import BUILDS  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def _as_list(value):
    return sorted(value) if isinstance(value, (set, list)) else value


@pytest.mark.parametrize("model_type", sorted(hf_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING))
def test_lora_default_is_hf_peft_default(model_type):
    assert _as_list(lora_default(model_type)) == _as_list(hf_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])


@pytest.mark.parametrize("model_type", sorted(hf_constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING))
def test_ia3_defaults_are_hf_peft_defaults(model_type):
    targets, feedforward = ia3_defaults(model_type)
    assert _as_list(targets) == _as_list(hf_constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type])
    assert _as_list(feedforward) == _as_list(hf_constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type])


def test_no_default_for_an_unknown_model_type():
    assert lora_default("no-such-model") is None
    assert ia3_defaults("no-such-model") == (None, None)
    assert ia3_defaults("electra") == (None, None)  # HF has a LoRA default for it, no (IA)^3 one


def _hf_shapes(model):
    return {key: tuple(value.shape) for key, value in peft.get_peft_model_state_dict(model).items()}


def _ours_shapes(model):
    return {key: tuple(value.shape) for key, value in peftcore.get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize("model_type", sorted(BUILDS))
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_default_targets_adapt_the_layers_hf_peft_adapts(model_type, method):
    build, task = BUILDS[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = peft.LoraConfig(task_type=task) if method == "lora" else peft.IA3Config(task_type=task)
        hf = peft.get_peft_model(build(), hf_config)
    config = peftcore.LoraConfig(task_type=task) if method == "lora" else IA3Config(task_type=task)
    ours = peftcore.get_peft_model(build(), config)
    assert _ours_shapes(ours) == _hf_shapes(hf)


@pytest.mark.parametrize("model_type", ["opt", "gptj", "gemma3_text", "mistral", "qwen2", "bart"])
def test_hf_prefix_adapter_gives_the_same_outputs_here(model_type, tmp_path):
    build, task = BUILDS[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(build(), peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3))
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for parameter in hf.prompt_encoder.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        hf.save_pretrained(tmp_path)
        ids = random_ids(2, 5)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if task == "SEQ_2_SEQ_LM":
            inputs["decoder_input_ids"] = random_ids(2, 4, seed=3)
        with torch.no_grad():
            expected = hf(**inputs).logits
    ours = peftcore.PeftModel.from_pretrained(build(), str(tmp_path))
    with torch.no_grad():
        got = ours(**inputs).logits
    scale = float(expected.abs().max())
    assert_close_to_scale(got, expected)
    base = build()
    with torch.no_grad():
        plain = base(**inputs).logits
    assert float((plain - expected).abs().max()) > 1e-3 * scale  # the prefix changed the outputs


@pytest.mark.parametrize("model_type, attention", [("deberta", "DisentangledSelfAttention"), ("gpt_neo", "GPTNeoSelfAttention")])
def test_prefix_where_attention_is_not_reachable_is_refused_by_name(model_type, attention):
    """Attention computed by the module's own code (not transformers' attention functions)
    would ignore the prefix: refused, naming the module, never silently unchanged."""
    build, task = BUILDS[model_type]
    with pytest.raises(PlanError, match=attention):
        peftcore.get_peft_model(build(), peftcore.PrefixTuningConfig(task_type=task, num_virtual_tokens=3))
