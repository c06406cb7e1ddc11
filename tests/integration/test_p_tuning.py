"""P-tuning (PromptEncoderConfig, MLP and LSTM encoders) on tiny models, and interop with HF PEFT."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import peftcore  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from tests.integration.tiny import bert_cls, gpt2_lm, llama_lm, random_ids, t5_lm, train_steps  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
N = 3
KINDS = ("MLP", "LSTM")


def _config(kind, task="CAUSAL_LM", **fields):
    return peftcore.PromptEncoderConfig(
        num_virtual_tokens=N, encoder_reparameterization_type=kind, encoder_hidden_size=16, task_type=task, **fields
    )


def _batch(build):
    ids = random_ids(2, 6)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    if build is bert_cls:
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": torch.tensor([0, 2])}
    if build is t5_lm:
        return {"input_ids": ids, "attention_mask": mask, "labels": random_ids(2, 4, seed=3)}
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


def _losses(model, batch, steps=5):
    return train_steps(model, batch, steps, lr=0.02)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "build,task",
    [(llama_lm, "CAUSAL_LM"), (gpt2_lm, "CAUSAL_LM"), (t5_lm, "SEQ_2_SEQ_LM"), (bert_cls, "SEQ_CLS")],
    ids=["llama", "gpt2", "t5", "bert"],
)
def test_p_tuning_trains(build, task, kind):
    model = peftcore.get_peft_model(build(), _config(kind, task=task))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("prompt_encoder.default.mlp_head" in n for n in names)
    assert any("lstm_head" in n for n in names) == (kind == "LSTM")
    losses = _losses(model, _batch(build))
    assert losses[-1] < losses[0]


def test_p_tuning_llama_generate_cached_equals_uncached():
    model = peftcore.get_peft_model(llama_lm(), _config("MLP"))
    ids = random_ids(1, 5)

    def run(use_cache):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=use_cache,
                                 output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        return out.sequences, torch.stack(out.scores, dim=1)

    (tokens, scores), (tokens2, scores2) = run(True), run(False)
    assert torch.equal(tokens, tokens2)
    assert_close_to_scale(scores, scores2)


@pytest.mark.parametrize("kind", KINDS)
def test_own_round_trip_keeps_the_encoder(kind, tmp_path):
    model = peftcore.get_peft_model(llama_lm(), _config(kind))
    batch = _batch(llama_lm)
    _losses(model, batch, steps=2)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
    model.save_pretrained(str(tmp_path))
    loaded = peftcore.PeftModel.from_pretrained(llama_lm(), str(tmp_path), is_trainable=True)
    assert any("prompt_encoder.default" in n for n, p in loaded.named_parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch["input_ids"]).logits, expected)


# -- Hugging Face PEFT interoperability --------------------------------------------------------

CASES = {f"{name}-{kind}": (build, task, kind) for name, build, task in (("llama", llama_lm, "CAUSAL_LM"), ("bert", bert_cls, "SEQ_CLS")) for kind in KINDS}


def _logits(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**inputs).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftcore_p_tuning_loads_in_hf_peft(case, tmp_path):
    peft = pytest.importorskip("peft")
    build, task, kind = CASES[case]
    model = peftcore.get_peft_model(build(), _config(kind, task=task))
    batch = _batch(build)
    _losses(model, batch, steps=2)
    expected = _logits(model, batch)
    model.save_pretrained(str(tmp_path))
    hf_model = peft.PeftModel.from_pretrained(build(), str(tmp_path))
    assert_close_to_scale(_logits(hf_model, batch), expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_peft_p_tuning_loads_in_peftcore(case, tmp_path):
    peft = pytest.importorskip("peft")
    build, task, kind = CASES[case]
    hf_model = peft.get_peft_model(
        build(), peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=N, encoder_reparameterization_type=kind,
                                          encoder_hidden_size=16)
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in hf_model.prompt_encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    batch = _batch(build)
    expected = _logits(hf_model, batch)
    hf_model.save_pretrained(str(tmp_path))
    ours = peftcore.PeftModel.from_pretrained(build(), str(tmp_path))
    assert_close_to_scale(_logits(ours, batch), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_plan_counts_what_trains(kind):
    model = peftcore.get_peft_model(llama_lm(), _config(kind))
    assert model.get_nb_trainable_parameters()[0] == model.plans["default"].num_trainable()
