"""Prefix tuning of encoder-decoder models (T5, BART; ``task_type="SEQ_2_SEQ_LM"``), and
its interop with HF PEFT, whose prefix goes into the decoder's self-attention only."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import peftcore  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from tests.integration.tiny import VOCAB, bart_lm, random_ids, seeded, t5_lm, train_steps  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
N = 3


def t5_three_layers(seed: int = 0, attn_implementation: str = "eager"):
    """A T5 with 3 layers: HF's table layout maps decoder layer ``l`` to entry ``4l mod 6``."""
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=3, num_heads=4,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )
    config._attn_implementation = attn_implementation
    return seeded(lambda: transformers.T5ForConditionalGeneration(config), seed)


BUILDS = {"t5": t5_lm, "bart": bart_lm, "t5-3-layers-eager": t5_three_layers}


def _config(projection=False, **fields):
    return peftcore.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=projection, task_type="SEQ_2_SEQ_LM", **fields)


def _batch():
    """Padded encoder inputs, and a decoder side with labels, ids and a padded mask."""
    ids = random_ids(2, 6)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    labels = random_ids(2, 4, seed=2)
    decoder_ids = random_ids(2, 4, seed=3)
    decoder_mask = torch.tensor([[1] * 4, [1, 1, 1, 0]])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, {
        "input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids, "decoder_attention_mask": decoder_mask,
    }


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _train(model, batch, steps=5):
    return train_steps(model, batch, steps, lr=0.1, dropout=False)  # the tiny BART's loss moves less than its dropout noise


@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_prefix_tuning_trains_seq2seq(name, projection):
    model = peftcore.get_peft_model(BUILDS[name](), _config(projection))
    width, layers = 32, 2
    trainable = model.get_nb_trainable_parameters()[0]
    if projection:
        table = layers * 2 * width
        assert trainable == N * width + width * width + width + table * width + table
    else:
        assert trainable == N * layers * 2 * width
    assert trainable == model.plans["default"].num_trainable()
    labelled, _ = _batch()
    losses = _train(model, labelled)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_prefix_reaches_only_the_decoder_and_disabling_restores_the_base(name):
    model = peftcore.get_peft_model(BUILDS[name](), _config())
    base = BUILDS[name]()
    labelled, decoded = _batch()
    with torch.no_grad():
        encoded = model.get_base_model().get_encoder()(input_ids=decoded["input_ids"], attention_mask=decoded["attention_mask"])
        base_encoded = base.get_encoder()(input_ids=decoded["input_ids"], attention_mask=decoded["attention_mask"])
        with model.disable_adapter():
            torch.testing.assert_close(_logits(model, decoded), _logits(base, decoded))
    torch.testing.assert_close(encoded.last_hidden_state, base_encoded.last_hidden_state)
    assert not torch.allclose(_logits(model, decoded), _logits(base, decoded))


@pytest.mark.parametrize(("name", "self_attention"), [("t5", "layer.0.SelfAttention"), ("bart", "self_attn")])
def test_prefix_sits_in_the_decoders_self_attention(name, self_attention):
    model = peftcore.get_peft_model(BUILDS[name](), _config())
    holders = [path for path, module in model.get_base_model().named_modules() if path.endswith(".prefix")]
    assert len(holders) == 2
    assert all(".decoder." in f".{path}" and path.endswith(f"{self_attention}.prefix") for path in holders)


# -- Hugging Face PEFT interoperability --------------------------------------------------------

HF_CASES = {
    "t5-table": ("t5", False),
    "t5-projection": ("t5", True),
    "t5-3-layers-table": ("t5-3-layers-eager", False),
    "bart-table": ("bart", False),
    "bart-projection": ("bart", True),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_peft_seq2seq_prefix_loads_in_peftcore(case, tmp_path):
    peft = pytest.importorskip("peft")
    name, projection = HF_CASES[case]
    build = BUILDS[name]
    hf_model = peft.get_peft_model(
        build(), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N, prefix_projection=projection)
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in hf_model.prompt_encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    labelled, decoded = _batch()
    expected = [_logits(hf_model, labelled), _logits(hf_model, decoded)]
    hf_model.save_pretrained(str(tmp_path))
    ours = peftcore.PeftModel.from_pretrained(build(), str(tmp_path))
    got = [_logits(ours, labelled), _logits(ours, decoded)]
    assert_close_to_scale(got[0], expected[0])
    assert_close_to_scale(got[1], expected[1])
    assert not torch.allclose(got[0], _logits(build(), labelled))  # the prefix does something


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_peftcore_seq2seq_prefix_loads_in_hf_peft(case, tmp_path):
    peft = pytest.importorskip("peft")
    name, projection = HF_CASES[case]
    build = BUILDS[name]
    model = peftcore.get_peft_model(build(), _config(projection))
    labelled, decoded = _batch()
    _train(model, labelled, steps=2)
    expected = [_logits(model, labelled), _logits(model, decoded)]
    model.save_pretrained(str(tmp_path))
    hf_model = peft.PeftModel.from_pretrained(build(), str(tmp_path))
    assert type(hf_model).__name__ == "PeftModelForSeq2SeqLM"
    got = [_logits(hf_model, labelled), _logits(hf_model, decoded)]
    assert_close_to_scale(got[0], expected[0])
    assert_close_to_scale(got[1], expected[1])


# -- generation -------------------------------------------------------------------------------


def _generate(model, ids, mask, use_cache):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=use_cache,
            output_scores=True, return_dict_in_generate=True, eos_token_id=None,
        )
    return out.sequences, torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_seq2seq_prefix_generate_cached_equals_uncached(name, projection):
    model = peftcore.get_peft_model(BUILDS[name](), _config(projection))
    _, decoded = _batch()
    ids, mask = decoded["input_ids"], decoded["attention_mask"]
    tokens, scores = _generate(model, ids, mask, use_cache=True)
    uncached_tokens, uncached_scores = _generate(model, ids, mask, use_cache=False)
    assert torch.equal(tokens, uncached_tokens)
    assert_close_to_scale(scores, uncached_scores)
    # and both are the model's forward over the generated decoder input, which the prefix changes
    logits = _logits(model, {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": tokens[:, :-1]})
    assert_close_to_scale(scores, logits)
    with model.disable_adapter():
        base_tokens, _ = _generate(model, ids, mask, use_cache=True)
    assert torch.equal(base_tokens, _generate(BUILDS[name](), ids, mask, use_cache=True)[0])


# -- bad input --------------------------------------------------------------------------------


def test_encoder_decoder_needs_the_seq2seq_task():
    config = peftcore.PrefixTuningConfig(
        num_virtual_tokens=N, task_type="CAUSAL_LM", attention_module="layer.0.SelfAttention", key_module="layer.0.SelfAttention.k"
    )
    with pytest.raises(peftcore.PeftCoreError, match="SEQ_2_SEQ_LM"):
        peftcore.get_peft_model(t5_lm(), config)


def test_seq2seq_with_one_submodule_is_refused():
    with pytest.raises(peftcore.PeftCoreError, match="num_transformer_submodules=1"):
        _config(num_transformer_submodules=1)


def test_unequal_encoder_and_decoder_depths_are_refused():
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )
    model = seeded(lambda: transformers.T5ForConditionalGeneration(config))
    with pytest.raises(peftcore.PeftCoreError, match="encoder has 2 layers and the decoder 3"):
        peftcore.get_peft_model(model, _config())
