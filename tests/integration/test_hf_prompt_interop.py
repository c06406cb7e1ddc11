"""Prompt-tuning adapters interoperate with the real Hugging Face ``peft`` package, both ways."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import peftcore  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from tests.integration.tiny import bert_cls, llama_lm, random_ids  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
N = 5


def _randomise_prompt(layer_or_encoder):
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in layer_or_encoder.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _hf_outputs(model, **inputs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**inputs).logits


CASES = {
    "llama-causal": (llama_lm, "CAUSAL_LM", lambda ids: {"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
    "bert-seq-cls": (
        bert_cls,
        "SEQ_CLS",
        lambda ids: {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftcore_prompt_loads_in_hf_peft(case, tmp_path):
    build, task, make_inputs = CASES[case]
    model = peftcore.get_peft_model(build(), peftcore.PromptTuningConfig(num_virtual_tokens=N, task_type=task))
    _randomise_prompt(model.get_input_embeddings())
    if task == "SEQ_CLS":
        _randomise_prompt(model.model.classifier)
    inputs = make_inputs(random_ids(2, 6))
    with torch.no_grad():
        ours = model(**inputs).logits
    model.save_pretrained(str(tmp_path))
    hf_model = peft.PeftModel.from_pretrained(build(), str(tmp_path))
    assert_close_to_scale(_hf_outputs(hf_model, **inputs), ours)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_peft_prompt_loads_in_peftcore(case, tmp_path):
    build, task, make_inputs = CASES[case]
    hf_model = peft.get_peft_model(build(), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N))
    _randomise_prompt(hf_model.prompt_encoder)
    if task == "SEQ_CLS":
        _randomise_prompt(hf_model.base_model.classifier)
    inputs = make_inputs(random_ids(2, 6))
    expected = _hf_outputs(hf_model, **inputs)
    hf_model.save_pretrained(str(tmp_path))
    ours = peftcore.PeftModel.from_pretrained(build(), str(tmp_path))
    with torch.no_grad():
        assert_close_to_scale(ours(**inputs).logits, expected)


def test_hf_text_initialised_prompt_loads_without_a_tokenizer(tmp_path):
    model = peftcore.get_peft_model(
        llama_lm(),
        peftcore.PromptTuningConfig(
            num_virtual_tokens=N, prompt_tuning_init="TEXT", prompt_tuning_init_text="a b", tokenizer=lambda t: [3, 4]
        ),
    )
    ids = random_ids(1, 4)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path))
    # drop peftcore's stored plan: the adapter is then planned from its config, like an HF one
    from safetensors.numpy import load_file, save_file

    weights = tmp_path / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
    loaded = peftcore.PeftModel.from_pretrained(llama_lm(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


def test_baked_residual_prompt_loads_in_hf_peft(tmp_path):
    config = peftcore.ResidualPromptTuningConfig(num_virtual_tokens=N, bottleneck_size=8, task_type="CAUSAL_LM")
    model = peftcore.get_peft_model(llama_lm(), config)
    ids = random_ids(2, 6)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.bake()
    model.save_pretrained(str(tmp_path))
    hf_model = peft.PeftModel.from_pretrained(llama_lm(), str(tmp_path))
    assert_close_to_scale(_hf_outputs(hf_model, input_ids=ids), expected)


def test_text_initialised_prompt_loads_in_hf_peft(tmp_path):
    config = peftcore.PromptTuningConfig(
        num_virtual_tokens=N, prompt_tuning_init="TEXT", prompt_tuning_init_text="a b",
        tokenizer=lambda text: [3, 4], task_type="CAUSAL_LM",
    )
    model = peftcore.get_peft_model(llama_lm(), config)
    ids = random_ids(2, 6)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path))
    # the saved prompt replaces any init, so the file says RANDOM and HF needs no tokenizer
    hf_model = peft.PeftModel.from_pretrained(llama_lm(), str(tmp_path))
    assert_close_to_scale(_hf_outputs(hf_model, input_ids=ids), expected)
