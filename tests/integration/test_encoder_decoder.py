"""Prompt tuning and BitFit on encoder-decoder models (tiny T5 and BART), with HF PEFT's semantics."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import peftcore  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from tests.integration.tiny import VOCAB, bart_lm, random_ids, t5_lm  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
N = 4


def _prompted(build=t5_lm, **fields):
    config = peftcore.PromptTuningConfig(num_virtual_tokens=N, task_type="SEQ_2_SEQ_LM", **fields)
    return peftcore.get_peft_model(build(), config)


def _batch():
    ids = random_ids(2, 6)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    labels = random_ids(2, 5, seed=3)
    return ids, mask, labels


def _generate(model, ids, mask, use_cache):
    """Greedy tokens and the per-step logits."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=use_cache,
            output_scores=True, return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("build", [t5_lm, bart_lm], ids=["t5", "bart"])
def test_seq2seq_prompt_trains_with_labels(build):
    model = _prompted(build)
    ids, mask, labels = _batch()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("prompt_embeddings.default")
    # HF's layout: two blocks of rows (encoder, decoder), the first one used
    width = model.get_input_embeddings().base_layer.embedding_dim
    assert model.get_nb_trainable_parameters()[0] == 2 * N * width
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    losses = []
    for _ in range(6):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits.shape == (2, 5, VOCAB)  # the decoder's positions only
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0]


def test_encoder_sees_prompt_and_extended_mask_and_padding_is_respected():
    model = _prompted()
    seen = {}

    def capture(module, args, kwargs):
        seen["decoder_cross_mask"] = kwargs.get("encoder_attention_mask")

    encoder, decoder = model.model.get_encoder(), model.model.get_decoder()
    handle = decoder.register_forward_pre_hook(capture, with_kwargs=True)
    ids, mask, labels = _batch()
    with torch.no_grad():
        encoded = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        assert encoded.shape[1] == N + 6
        batched = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        handle.remove()
        assert seen["decoder_cross_mask"].tolist() == [[1] * N + row for row in mask.tolist()]
        alone = model(input_ids=ids[1:, :4], attention_mask=mask[1:, :4], labels=labels[1:]).logits
    assert_close_to_scale(batched[1:], alone)


def test_disabled_adapter_is_the_base_model():
    model = _prompted()
    ids, mask, labels = _batch()
    with torch.no_grad():
        expected = t5_lm()(input_ids=ids, attention_mask=mask, labels=labels).logits
        with model.disable_adapter():
            got = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("build", [t5_lm, bart_lm], ids=["t5", "bart"])
def test_seq2seq_prompt_generate_cached_equals_uncached(build):
    model = _prompted(build)
    with torch.no_grad():
        model.get_input_embeddings().prompt_embeddings["default"].mul_(3.0)
    ids, mask, _ = _batch()
    tokens, scores = _generate(model, ids, mask, use_cache=True)
    uncached_tokens, uncached_scores = _generate(model, ids, mask, use_cache=False)
    assert torch.equal(tokens, uncached_tokens)
    assert_close_to_scale(scores, uncached_scores)
    # the prompt changes what the decoder sees
    with model.disable_adapter():
        _, plain_scores = _generate(model, ids, mask, use_cache=True)
    assert not torch.allclose(scores, plain_scores)


def test_two_submodules_need_an_encoder_decoder_model():
    from tests.integration.tiny import llama_lm

    with pytest.raises(peftcore.PeftCoreError, match="encoder-decoder"):
        peftcore.get_peft_model(llama_lm(), peftcore.PromptTuningConfig(num_virtual_tokens=N, num_transformer_submodules=2))


def test_one_submodule_on_t5_saves_one_block(tmp_path):
    model = _prompted(num_transformer_submodules=1)
    model.save_pretrained(str(tmp_path))
    from safetensors.numpy import load_file

    assert load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"].shape == (N, 32)


def test_residual_prompt_on_t5_trains_and_bakes():
    config = peftcore.ResidualPromptTuningConfig(num_virtual_tokens=N, bottleneck_size=8, task_type="SEQ_2_SEQ_LM")
    model = peftcore.get_peft_model(t5_lm(), config)
    ids, mask, labels = _batch()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        model.bake()
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=labels).logits, before)


def test_t5_bitfit_with_added_biases_is_bit_exact_at_init_and_trains():
    model = peftcore.get_peft_model(t5_lm(), peftcore.BitFitConfig(add_missing_biases=True))
    ids, mask, labels = _batch()
    with torch.no_grad():
        expected = t5_lm()(input_ids=ids, attention_mask=mask, labels=labels)
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(got.logits, expected.logits)
    assert model.get_nb_trainable_parameters()[0] > 0
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    with torch.no_grad():
        trained = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        model.merge_adapter()
        assert_close_to_scale(model(input_ids=ids, attention_mask=mask, labels=labels).logits, trained)


# -- Hugging Face PEFT interoperability --------------------------------------------------------


def _randomise(parameters):
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def _hf_logits(model, **inputs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**inputs).logits


def test_peftcore_t5_prompt_loads_in_hf_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = _prompted()
    _randomise([p for p in model.parameters() if p.requires_grad])
    ids, mask, labels = _batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    _, our_scores = _generate(model, ids, mask, use_cache=True)
    model.save_pretrained(str(tmp_path))
    hf_model = peft.PeftModel.from_pretrained(t5_lm(), str(tmp_path))
    assert hf_model.peft_config["default"].num_transformer_submodules == 2
    assert_close_to_scale(_hf_logits(hf_model, input_ids=ids, attention_mask=mask, labels=labels), ours)
    _, hf_scores = _generate(hf_model, ids, mask, use_cache=True)
    assert_close_to_scale(hf_scores, our_scores)


def test_hf_peft_t5_prompt_loads_in_peftcore(tmp_path):
    peft = pytest.importorskip("peft")
    hf_model = peft.get_peft_model(t5_lm(), peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N))
    _randomise(hf_model.prompt_encoder.parameters())
    ids, mask, labels = _batch()
    expected = _hf_logits(hf_model, input_ids=ids, attention_mask=mask, labels=labels)
    hf_model.save_pretrained(str(tmp_path))
    ours = peftcore.PeftModel.from_pretrained(t5_lm(), str(tmp_path))
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask, labels=labels).logits
    assert_close_to_scale(got, expected)


def test_t5_lora_round_trips_with_hf_peft(tmp_path):
    peft = pytest.importorskip("peft")
    ids, mask, labels = _batch()
    config = peftcore.LoraConfig(r=4, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    model = peftcore.get_peft_model(t5_lm(), config)
    _randomise([p for p in model.parameters() if p.requires_grad])
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    model.save_pretrained(str(tmp_path / "ours"))
    hf_model = peft.PeftModel.from_pretrained(t5_lm(), str(tmp_path / "ours"))
    assert_close_to_scale(_hf_logits(hf_model, input_ids=ids, attention_mask=mask, labels=labels), ours)
    hf_model.save_pretrained(str(tmp_path / "hf"))
    back = peftcore.PeftModel.from_pretrained(t5_lm(), str(tmp_path / "hf"))
    with torch.no_grad():
        assert_close_to_scale(back(input_ids=ids, attention_mask=mask, labels=labels).logits, ours)


@pytest.mark.parametrize("submodules", [1, 2], ids=["one-block", "hf-layout"])
def test_xprompt_prunes_a_t5_prompt(submodules, tmp_path):
    """Either layout prunes; with HF's (a second, decoder block of rows) that block is cut
    to the same tokens and pieces, so the pruned adapter still loads in HF PEFT."""
    model = _prompted(num_transformer_submodules=submodules)
    _randomise([p for p in model.parameters() if p.requires_grad])
    ids, mask, labels = _batch()
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": labels}]

    def loss_fn(peft_model, batch):
        return peft_model(**batch).loss

    trained = model.get_input_embeddings().prompt_embeddings["default"].detach().clone()
    config = peftcore.XPromptConfig(token_ratio=0.5, piece_ratio=0.25, num_pieces=4)
    result = peftcore.xprompt_prune(model, batches, loss_fn, config, progress=False)
    kept = torch.from_numpy(result.token_mask).nonzero().flatten()
    assert len(kept) == N // 2 and int((result.piece_mask == 0).sum()) == round(0.25 * len(kept) * 4)
    spread = torch.from_numpy(result.piece_mask).float().repeat_interleave(32 // 4, dim=1)
    pruned = model.get_input_embeddings().prompt_embeddings["default"].detach().clone()
    assert pruned.shape == (submodules * len(kept), 32)
    for block in range(submodules):  # every block: the trained kept rows, pruned pieces zero
        torch.testing.assert_close(pruned[block * len(kept) : (block + 1) * len(kept)], trained[block * N + kept] * spread)
    with torch.no_grad():
        assert model(**batches[0]).logits.shape == (2, 5, VOCAB)
    # retraining keeps the pruned pieces at zero
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        loss = loss_fn(model, batches[0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    retrained = model.get_input_embeddings().prompt_embeddings["default"].detach()
    assert torch.all(retrained[spread.repeat(submodules, 1) == 0] == 0) and not torch.equal(retrained, pruned)
    with torch.no_grad():
        expected = model(**batches[0]).logits
    model.save_pretrained(str(tmp_path))
    loaded = peftcore.PeftModel.from_pretrained(t5_lm(), str(tmp_path), is_trainable=True)
    assert loaded.plans["default"] == model.plans["default"]  # the masks come back with the plan
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, expected)
    if submodules == 2:
        peft = pytest.importorskip("peft")
        hf_model = peft.PeftModel.from_pretrained(t5_lm(), str(tmp_path))
        assert_close_to_scale(_hf_logits(hf_model, **batches[0]), expected)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_t5_p_tuning_round_trips_with_hf_peft(kind, tmp_path):
    peft = pytest.importorskip("peft")
    ids, mask, labels = _batch()
    config = peftcore.PromptEncoderConfig(
        num_virtual_tokens=N, encoder_reparameterization_type=kind, encoder_hidden_size=16, task_type="SEQ_2_SEQ_LM"
    )
    model = peftcore.get_peft_model(t5_lm(), config)
    _randomise([p for p in model.parameters() if p.requires_grad])
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    model.save_pretrained(str(tmp_path / "ours"))
    hf_model = peft.PeftModel.from_pretrained(t5_lm(), str(tmp_path / "ours"))
    assert_close_to_scale(_hf_logits(hf_model, input_ids=ids, attention_mask=mask, labels=labels), ours)
    hf_model.save_pretrained(str(tmp_path / "hf"))
    back = peftcore.PeftModel.from_pretrained(t5_lm(), str(tmp_path / "hf"))
    with torch.no_grad():
        assert_close_to_scale(back(input_ids=ids, attention_mask=mask, labels=labels).logits, ours)
