"""Prompt tuning and residual prompt tuning on tiny transformers models (torch backend)."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import peftcore  # noqa: E402
from peftcore import PeftModel, PromptTuningConfig, ResidualPromptTuningConfig  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from tests.integration.tiny import VOCAB, bert_cls, gpt2_cls, gpt2_lm, llama_lm, random_ids  # noqa: E402

N = 4


def prompt_model(build, config=None):
    return peftcore.get_peft_model(build(), config or PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB"))


@pytest.mark.parametrize("build", [llama_lm, gpt2_lm], ids=["llama", "gpt2"])
def test_trainable_count_is_tokens_times_width(build):
    model = prompt_model(build)
    width = model.get_input_embeddings().base_layer.embedding_dim
    assert model.get_nb_trainable_parameters()[0] == N * width
    trainable = [name for name, p in model.model.named_parameters() if p.requires_grad]
    assert trainable == ["model.embed_tokens.prompt_embeddings.default" if build is llama_lm else "transformer.wte.prompt_embeddings.default"]


@pytest.mark.parametrize("build", [llama_lm, gpt2_lm], ids=["llama", "gpt2"])
def test_causal_lm_loss_ignores_virtual_positions(build):
    model = prompt_model(build)
    ids = random_ids(3, 7)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert out.logits.shape == (3, N + 7, VOCAB)
    # virtual positions are never targets; the last one predicts the first real token
    predicting_real = out.logits[:, N - 1 : -1, :]
    expected = torch.nn.functional.cross_entropy(predicting_real.reshape(-1, VOCAB), ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_attention_mask_is_extended_and_padding_is_respected():
    model = prompt_model(llama_lm)
    seen = {}

    def capture(module, args, kwargs):
        seen["mask"] = kwargs.get("attention_mask")

    handle = model.model.model.register_forward_pre_hook(capture, with_kwargs=True)
    ids = random_ids(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        handle.remove()
        assert seen["mask"].tolist() == [[1] * N + row for row in mask.tolist()]
        alone = model(input_ids=ids[1:, :4], attention_mask=mask[1:, :4]).logits
    assert_close_to_scale(batched[1:, : N + 4], alone)


@pytest.mark.parametrize("build", [llama_lm, gpt2_lm], ids=["llama", "gpt2"])
@pytest.mark.parametrize("left_pad", [False, True], ids=["full", "left-padded"])
def test_generate_matches_step_by_step_decoding(build, left_pad):
    model = prompt_model(build)
    ids = random_ids(2, 5)
    mask = torch.ones_like(ids)
    if left_pad:
        ids[1, :2] = 0
        mask[1, :2] = 0
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        seq, seq_mask = ids, mask
        for _ in range(5):
            positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=seq, attention_mask=seq_mask, position_ids=positions, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], dim=1)
    assert torch.equal(generated, seq)


def test_inputs_embeds_path_matches_input_ids():
    model = prompt_model(llama_lm)
    ids = random_ids(2, 5)
    with torch.no_grad():
        from_ids = model(input_ids=ids).logits
        embeds = model.get_input_embeddings().base_layer(ids)
        from_embeds = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(from_ids, from_embeds)


def test_bert_classifier_extends_token_types_and_trains_its_head():
    model = prompt_model(bert_cls, PromptTuningConfig(num_virtual_tokens=N, task_type="SEQ_CLS"))
    width = 32
    assert model.get_nb_trainable_parameters()[0] == N * width + (3 * width + 3)
    ids = random_ids(2, 6)
    types = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    out = model(input_ids=ids, token_type_ids=types, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)


def test_gpt2_classifier_finds_the_last_real_token_under_right_padding():
    model = prompt_model(gpt2_cls)
    ids = random_ids(2, 6)
    ids[1, 4:] = 0
    mask = (ids != 0).long()
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, :4], attention_mask=mask[1:, :4]).logits
    assert_close_to_scale(batched[1:], alone)


def test_text_init_uses_the_given_tokenizer():
    words = {"classify": 5, "the": 6, "review": 7}

    def tokenizer(text):
        return {"input_ids": [words[w] for w in text.split()]}

    config = PromptTuningConfig(
        num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text="classify the review", tokenizer=tokenizer
    )
    model = peftcore.get_peft_model(llama_lm(), config)
    op = model.plans["default"].ops_of("prompt_embedding")[0]
    assert op.init_token_ids == (5, 6, 7, 5, 6)
    layer = model.get_input_embeddings()
    torch.testing.assert_close(layer.prompt_embeddings["default"].detach(), layer.base_layer.weight[[5, 6, 7, 5, 6]])
    assert "tokenizer" not in config.to_dict()
    with pytest.raises(peftcore.ConfigError, match="needs tokenizer_name_or_path"):
        peftcore.get_peft_model(llama_lm(), config.replace(tokenizer=None))


def _train(model, steps=8, lr=0.05):
    ids = random_ids(4, 8, seed=3)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize(
    "config",
    [PromptTuningConfig(num_virtual_tokens=N), ResidualPromptTuningConfig(num_virtual_tokens=N, bottleneck_size=8, dropout=0.1)],
    ids=["prompt", "residual"],
)
def test_training_lowers_the_loss_and_only_moves_the_prompt(config):
    model = peftcore.get_peft_model(llama_lm(), config)
    frozen = {name: p.detach().clone() for name, p in model.model.named_parameters() if not p.requires_grad}
    losses = _train(model)
    assert losses[-1] < losses[0]
    for name, p in model.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_residual_bake_keeps_outputs_and_shrinks_the_adapter(tmp_path):
    model = peftcore.get_peft_model(llama_lm(), ResidualPromptTuningConfig(num_virtual_tokens=N, bottleneck_size=16, separate_mlps=True))
    _train(model, steps=3)
    ids = random_ids(2, 6)
    with torch.no_grad():
        unbaked = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path / "unbaked"))
    model.bake()
    with torch.no_grad():
        assert_close_to_scale(model(input_ids=ids).logits, unbaked)
    model.save_pretrained(str(tmp_path / "baked"))
    sizes = {d: os.path.getsize(tmp_path / d / "adapter_model.safetensors") for d in ("unbaked", "baked")}
    assert sizes["baked"] < sizes["unbaked"] / 4
    loaded = PeftModel.from_pretrained(llama_lm(), str(tmp_path / "baked"))
    assert isinstance(loaded.peft_config["default"], PromptTuningConfig)
    with torch.no_grad():
        assert_close_to_scale(loaded(input_ids=ids).logits, unbaked)


def test_saved_adapter_resumes_training(tmp_path):
    model = prompt_model(llama_lm)
    _train(model, steps=2)
    model.save_pretrained(str(tmp_path))
    resumed = PeftModel.from_pretrained(llama_lm(), str(tmp_path), is_trainable=True)
    assert resumed.get_nb_trainable_parameters()[0] == N * 32
    before = resumed.get_input_embeddings().prompt_embeddings["default"].detach().clone()
    losses = _train(resumed, steps=4)
    assert losses[-1] < losses[0]
    assert not torch.equal(before, resumed.get_input_embeddings().prompt_embeddings["default"])


def test_unload_removes_the_prompt_and_its_hook():
    base_ids = random_ids(2, 5)
    reference = llama_lm()
    with torch.no_grad():
        expected = reference(input_ids=base_ids).logits
    model = prompt_model(llama_lm)
    with pytest.raises(AttributeError, match="prompt_learning=True"):  # HF PEFT has no unload for prompts
        model.unload()
    plain = model.unload(prompt_learning=True)
    assert type(plain.get_input_embeddings()).__name__ == "Embedding"
    assert not plain._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=base_ids).logits, expected)


@pytest.mark.parametrize("layer_norm", [True, False], ids=["norm", "no-norm"])
def test_residual_branch_starts_at_zero_so_the_init_survives(layer_norm):
    config = ResidualPromptTuningConfig(
        num_virtual_tokens=N, bottleneck_size=8, layer_norm=layer_norm, prompt_tuning_init="SAMPLE_VOCAB"
    )
    model = peftcore.get_peft_model(llama_lm(), config)
    layer = model.get_input_embeddings()
    assert torch.equal(layer.prompt("default"), layer.prompt_embeddings["default"])
    _train(model, steps=3)
    assert not torch.equal(layer.prompt("default"), layer.prompt_embeddings["default"])
