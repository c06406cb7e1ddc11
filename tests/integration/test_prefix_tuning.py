"""Prefix tuning (PrefixTuningConfig) on tiny transformers models, and its interop with HF PEFT."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import peftcore  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from tests.integration.tiny import bert_cls, gpt2_lm, llama_lm, random_ids, train_steps  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
N = 3
BUILDS = {"llama": llama_lm, "gpt2": gpt2_lm}


def _config(projection=False, task="CAUSAL_LM", **fields):
    return peftcore.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=projection, task_type=task, **fields)


def _inputs():
    ids = random_ids(2, 6)
    return ids, torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])


def _scores(model, ids, mask, use_cache):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=use_cache,
            output_scores=True, return_dict_in_generate=True, pad_token_id=0,
        )
    return out.sequences, torch.stack(out.scores, dim=1)


def _train(model, batch, steps=5):
    return train_steps(model, batch, steps, lr=0.05)


@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_prefix_tuning_trains_causal_lm(name, projection):
    model = peftcore.get_peft_model(BUILDS[name](), _config(projection))
    ids, mask = _inputs()
    layers, width = 2, 16 if name == "llama" else 32  # Llama's 2 key/value heads of 8
    trainable = model.get_nb_trainable_parameters()[0]
    if projection:
        h, table = width, layers * 2 * width
        assert trainable == N * width + h * width + h + table * h + table
    else:
        assert trainable == N * layers * 2 * width
    losses = _train(model, {"input_ids": ids, "attention_mask": mask, "labels": ids})
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
def test_prefix_tuning_trains_bert_classifier(projection):
    model = peftcore.get_peft_model(bert_cls(), _config(projection, task="SEQ_CLS"))
    ids, mask = _inputs()
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": torch.tensor([0, 2])}
    assert any("classifier" in n for n, p in model.named_parameters() if p.requires_grad)
    losses = _train(model, batch)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_prefix_changes_outputs_and_disabling_restores_the_base(name):
    model = peftcore.get_peft_model(BUILDS[name](), _config())
    ids, mask = _inputs()
    with torch.no_grad():
        base = BUILDS[name]()(input_ids=ids, attention_mask=mask).logits
        prefixed = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base)
        # padding is respected: the padded row's real tokens see what they see alone
        alone = model(input_ids=ids[1:, :4], attention_mask=mask[1:, :4]).logits
    assert not torch.allclose(prefixed, base)
    assert_close_to_scale(prefixed[1:, :4], alone)


@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_prefix_generate_cached_equals_uncached(name, projection):
    model = peftcore.get_peft_model(BUILDS[name](), _config(projection))
    ids, mask = _inputs()
    tokens, scores = _scores(model, ids, mask, use_cache=True)
    uncached_tokens, uncached_scores = _scores(model, ids, mask, use_cache=False)
    assert torch.equal(tokens, uncached_tokens)
    assert_close_to_scale(scores, uncached_scores)
    # and both are the model's forward, step by step
    with torch.no_grad():
        full = torch.ones_like(tokens)
        full[:, : mask.shape[1]] = mask
        logits = model(input_ids=tokens, attention_mask=full).logits[:, mask.shape[1] - 1 : -1]
    assert_close_to_scale(scores[:1], logits[:1])


def test_own_round_trip_keeps_the_projection(tmp_path):
    model = peftcore.get_peft_model(llama_lm(), _config(True))
    ids, mask = _inputs()
    _train(model, {"input_ids": ids, "attention_mask": mask, "labels": ids}, steps=2)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(str(tmp_path))
    loaded = peftcore.PeftModel.from_pretrained(llama_lm(), str(tmp_path), is_trainable=True)
    names = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert any("proj_up_weight" in n for n in names)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected)


# -- Hugging Face PEFT interoperability --------------------------------------------------------

HF_CASES = {"llama-table": (llama_lm, False), "llama-projection": (llama_lm, True), "gpt2-table": (gpt2_lm, False)}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_peftcore_prefix_loads_in_hf_peft(case, tmp_path):
    peft = pytest.importorskip("peft")
    build, projection = HF_CASES[case]
    model = peftcore.get_peft_model(build(), _config(projection))
    ids, mask = _inputs()
    _train(model, {"input_ids": ids, "attention_mask": mask, "labels": ids}, steps=2)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(str(tmp_path))
    hf_model = peft.PeftModel.from_pretrained(build(), str(tmp_path))
    with torch.no_grad():
        assert_close_to_scale(hf_model(input_ids=ids, attention_mask=mask).logits, ours)
    # (generate is not compared: HF PEFT 0.21's prefix-tuning generate on transformers 5
    # does not even agree with itself between cached and uncached decoding)


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_peft_prefix_loads_in_peftcore(case, tmp_path):
    peft = pytest.importorskip("peft")
    build, projection = HF_CASES[case]
    hf_model = peft.get_peft_model(
        build(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection)
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in hf_model.prompt_encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    ids, mask = _inputs()
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask).logits
    hf_model.save_pretrained(str(tmp_path))
    ours = peftcore.PeftModel.from_pretrained(build(), str(tmp_path))
    with torch.no_grad():
        assert_close_to_scale(ours(input_ids=ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
def test_plan_counts_what_trains(projection):
    model = peftcore.get_peft_model(llama_lm(), _config(projection))
    assert model.get_nb_trainable_parameters()[0] == model.plans["default"].num_trainable()
