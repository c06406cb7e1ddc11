"""Every prompt-family method and BitFit on both encoder-decoder families (tiny T5 and BART):
training with labels lowers the loss, cached ``generate`` equals uncached decoding, and the
adapters HF PEFT also has load both ways. HF computes LoRA in another order (``lora_B(lora_A(x)) *
scaling`` against peftcore's fused product), so float32 outputs agree to rounding, scaled to the largest
logit, and the same two models cast to float64 agree to 1e-10 of it: a difference in the maths would show
there. (The prompt methods are not checked in float64: HF loaded for inference reads the prompt table
saved in float32 instead of running the prompt encoder, which shows as float32 rounding in float64.)

The tests of one method in depth live beside it (``test_encoder_decoder.py``,
``test_prefix_tuning_seq2seq.py``); this file is the method x model matrix.
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import peftcore  # noqa: E402
from peftcore.testing.numerics import FLOAT64_RTOL, assert_close_to_scale, close_to_scale  # noqa: E402
from tests.integration.tiny import bart_lm, random_ids, t5_lm, train_steps  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
N = 3
BUILDS = {"t5": t5_lm, "bart": bart_lm}
SEQ2SEQ = {"task_type": "SEQ_2_SEQ_LM"}

CONFIGS = {
    "prompt": lambda: peftcore.PromptTuningConfig(num_virtual_tokens=N, **SEQ2SEQ),
    "residual": lambda: peftcore.ResidualPromptTuningConfig(num_virtual_tokens=N, bottleneck_size=8, **SEQ2SEQ),
    "p-tuning-mlp": lambda: peftcore.PromptEncoderConfig(num_virtual_tokens=N, encoder_hidden_size=16, **SEQ2SEQ),
    "p-tuning-lstm": lambda: peftcore.PromptEncoderConfig(
        num_virtual_tokens=N, encoder_reparameterization_type="LSTM", encoder_hidden_size=16, **SEQ2SEQ
    ),
    "prefix": lambda: peftcore.PrefixTuningConfig(num_virtual_tokens=N, **SEQ2SEQ),
    "prefix-projection": lambda: peftcore.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True, **SEQ2SEQ),
    "bitfit": lambda: peftcore.BitFitConfig(add_missing_biases=True, **SEQ2SEQ),
    "lora": lambda: peftcore.LoraConfig(r=4, target_modules="all-linear", **SEQ2SEQ),
}


def _batch():
    ids = random_ids(2, 6)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask, "labels": random_ids(2, 5, seed=3)}


def _randomise(parameters, seed=7, scale=0.3):
    """Move trainable tensors off their (often identity) init so a wrong path shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def _logits(model, batch):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**batch).logits


def _generate(model, batch, use_cache):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6, do_sample=False,
            use_cache=use_cache, output_scores=True, return_dict_in_generate=True, eos_token_id=None,
        )
    return out.sequences, torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_training_with_labels_lowers_the_loss(name, method):
    model = peftcore.get_peft_model(BUILDS[name](), CONFIGS[method]())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert model.get_nb_trainable_parameters()[0] == model.plans["default"].num_trainable() > 0
    losses = train_steps(model, _batch(), 5, lr=0.02, dropout=False)  # the tiny BART's loss moves less than its dropout noise
    assert losses[-1] < losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_generate_with_the_cache_equals_uncached_decoding(name, method):
    model = peftcore.get_peft_model(BUILDS[name](), CONFIGS[method]())
    _randomise([p for p in model.parameters() if p.requires_grad])
    batch = _batch()
    tokens, scores = _generate(model, batch, use_cache=True)
    uncached_tokens, uncached_scores = _generate(model, batch, use_cache=False)
    assert torch.equal(tokens, uncached_tokens)
    assert_close_to_scale(scores, uncached_scores)
    # both are the model's own forward over the decoder input generate produced
    forward = _logits(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                              "decoder_input_ids": tokens[:, :-1]})
    assert_close_to_scale(scores, forward)
    with model.disable_adapter():
        _, plain = _generate(model, batch, use_cache=True)
    assert not torch.allclose(scores, plain)  # the adapter changes what is decoded


def test_residual_prompt_bakes_on_bart_and_keeps_generating_the_same():
    model = peftcore.get_peft_model(bart_lm(), CONFIGS["residual"]())
    _randomise([p for p in model.parameters() if p.requires_grad])
    batch = _batch()
    before, (tokens, scores) = _logits(model, batch), _generate(model, batch, use_cache=True)
    model.bake()
    assert_close_to_scale(_logits(model, batch), before)
    baked_tokens, baked_scores = _generate(model, batch, use_cache=True)
    assert torch.equal(baked_tokens, tokens) and close_to_scale(baked_scores, scores)


def test_bart_bitfit_is_bit_exact_at_init():
    model = peftcore.get_peft_model(bart_lm(), CONFIGS["bitfit"]())
    batch = _batch()
    assert torch.equal(_logits(model, batch), _logits(bart_lm(), batch))


# -- Hugging Face PEFT, both ways ------------------------------------------------------------------

HF_METHODS = ("prompt", "p-tuning-mlp", "p-tuning-lstm", "prefix", "prefix-projection", "lora")


def _hf_config(peft, method):
    if method == "lora":
        return peft.LoraConfig(r=4, target_modules="all-linear", **SEQ2SEQ)
    if method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=N, **SEQ2SEQ)
    if method.startswith("prefix"):
        return peft.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=method.endswith("projection"), **SEQ2SEQ)
    kind = method.rsplit("-", 1)[1].upper()
    return peft.PromptEncoderConfig(num_virtual_tokens=N, encoder_reparameterization_type=kind, encoder_hidden_size=16, **SEQ2SEQ)


def _decoded(batch):
    """Inputs with a padded decoder side, so the decoder mask is extended and checked too."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "decoder_input_ids": random_ids(2, 4, seed=4), "decoder_attention_mask": torch.tensor([[1] * 4, [1, 1, 1, 0]])}


def _assert_same_maths_in_float64(ours, theirs, batch):
    """Float32 rounding hides nothing in float64: the two models then agree far below float32's epsilon."""
    ours.double(), theirs.double()
    assert_close_to_scale(_logits(ours, batch), _logits(theirs, batch), rtol=FLOAT64_RTOL)
    assert_close_to_scale(_logits(ours, _decoded(batch)), _logits(theirs, _decoded(batch)), rtol=FLOAT64_RTOL)


@pytest.mark.parametrize("method", HF_METHODS)
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_peftcore_adapter_loads_in_hf_peft(name, method, tmp_path):
    peft = pytest.importorskip("peft")
    model = peftcore.get_peft_model(BUILDS[name](), CONFIGS[method]())
    _randomise([p for p in model.parameters() if p.requires_grad])
    batch = _batch()
    expected = [_logits(model, batch), _logits(model, _decoded(batch)), _generate(model, batch, use_cache=True)]
    model.save_pretrained(str(tmp_path))
    hf_model = peft.PeftModel.from_pretrained(BUILDS[name](), str(tmp_path))
    assert type(hf_model).__name__ == "PeftModelForSeq2SeqLM"
    assert_close_to_scale(_logits(hf_model, batch), expected[0])
    assert_close_to_scale(_logits(hf_model, _decoded(batch)), expected[1])
    if not method.startswith("prefix"):  # HF PEFT 0.21's prefix generate on transformers 5 is not its own forward
        tokens, scores = _generate(hf_model, batch, use_cache=True)
        assert torch.equal(tokens, expected[2][0]) and close_to_scale(scores, expected[2][1])
    if method == "lora":
        _assert_same_maths_in_float64(model, hf_model, batch)


@pytest.mark.parametrize("method", HF_METHODS)
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_hf_peft_adapter_loads_in_peftcore(name, method, tmp_path):
    peft = pytest.importorskip("peft")
    hf_model = peft.get_peft_model(BUILDS[name](), _hf_config(peft, method))
    _randomise([p for p in hf_model.parameters() if p.requires_grad], seed=5)
    batch = _batch()
    expected = [_logits(hf_model, batch), _logits(hf_model, _decoded(batch))]
    hf_model.save_pretrained(str(tmp_path))
    ours = peftcore.PeftModel.from_pretrained(BUILDS[name](), str(tmp_path))
    assert_close_to_scale(_logits(ours, batch), expected[0])
    assert_close_to_scale(_logits(ours, _decoded(batch)), expected[1])
    assert not torch.allclose(_logits(ours, batch), _logits(BUILDS[name](), batch))  # the adapter does something
    if method == "lora":
        _assert_same_maths_in_float64(ours, hf_model, batch)
