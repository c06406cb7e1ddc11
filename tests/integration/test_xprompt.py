"""XPrompt: token- and piece-level pruning of a trained prompt, on a tiny Llama (torch)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import peftcore  # noqa: E402
from peftcore import PeftModel, PromptTuningConfig, XPromptConfig, xprompt_prune  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from peftcore.xprompt import token_importance  # noqa: E402
from tests.integration.tiny import llama_lm, random_ids  # noqa: E402

N = 8


def _batches(count=3):
    return [random_ids(4, 6, seed=10 + i) for i in range(count)]


def _loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def _trained_prompt_model(steps=4):
    model = peftcore.get_peft_model(llama_lm(), PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB", task_type="CAUSAL_LM"))
    _train(model, steps)
    return model


def _train(model, steps, lr=0.05):
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    model.train()
    for step in range(steps):
        batch = _batches()[step % 3]
        loss = _loss(model, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()


def _prompt(model):
    layer = model.get_input_embeddings()
    return layer.prompt_embeddings["default"].detach().clone(), layer.prompt("default").detach().clone()


def test_pruning_hits_the_ratios_rewinds_and_stays_pruned_through_retraining():
    model = _trained_prompt_model()
    trained, _ = _prompt(model)
    config = XPromptConfig(token_ratio=0.25, piece_ratio=0.5, num_pieces=4, rounds=2)
    result = xprompt_prune(model, _batches(), _loss, config, progress=False)
    assert result.num_pruned_tokens == 2 and result.token_mask.sum() == N - 2
    assert (result.piece_mask == 0).sum() == 0.5 * (N - 2) * 4
    stored, effective = _prompt(model)
    kept = torch.from_numpy(result.token_mask).bool()
    entries = torch.from_numpy(result.piece_mask).repeat_interleave(32 // 4, dim=1).bool()
    assert stored.shape == (N - 2, 32)
    assert torch.equal(stored[~entries], torch.zeros(int((~entries).sum())))
    assert torch.equal(stored[entries], trained[kept][entries])  # rewound to the trained values
    assert model.get_nb_trainable_parameters()[0] == (N - 2) * 32
    _train(model, steps=3)
    stored_after, effective_after = _prompt(model)
    assert torch.equal(stored_after[~entries], torch.zeros(int((~entries).sum())))
    assert torch.equal(effective_after[~entries], torch.zeros(int((~entries).sum())))
    assert not torch.equal(stored_after[entries], stored[entries])


def test_score_through_a_mask_equals_the_score_from_the_prompt_gradient():
    model = _trained_prompt_model(steps=2)
    layer = model.get_input_embeddings()
    prompt = layer.prompt_embeddings["default"].detach()
    via_mask = torch.zeros(N)
    via_gradient = torch.zeros(N)
    for batch in _batches():
        mask = torch.ones(N, requires_grad=True)
        with model.disable_adapter():
            embeds = layer.base_layer(batch)
            inputs = torch.cat([(mask[:, None] * prompt).expand(len(batch), -1, -1), embeds], dim=1)
            labels = torch.cat([torch.full((len(batch), N), -100), batch], dim=1)
            loss = model(inputs_embeds=inputs, labels=labels).loss
        (grad_mask,) = torch.autograd.grad(loss, mask)
        via_mask += grad_mask.abs()
        grads = model.adapter_gradients("default", _loss(model, batch))
        via_gradient += torch.from_numpy(token_importance(prompt.numpy(), grads["model.embed_tokens.prompt_embeddings"]))
    assert_close_to_scale(via_gradient.float(), via_mask)


def test_pruned_adapter_shortens_the_sequence_saves_its_masks_and_loads_in_hf_peft(tmp_path):
    model = _trained_prompt_model(steps=2)
    ids = random_ids(2, 5)
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[1] == N + 5
    result = xprompt_prune(model, _batches(2), _loss, XPromptConfig(token_ratio=0.5, piece_ratio=0.25), progress=False)
    with torch.no_grad():
        pruned = model(input_ids=ids).logits
    assert pruned.shape[1] == N - result.num_pruned_tokens + 5 == 4 + 5
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(llama_lm(), str(tmp_path), is_trainable=True)
    op = loaded.plans["default"].ops_of("prompt_embedding")[0]
    assert op.token_mask == tuple(int(m) for m in result.token_mask)
    assert op.piece_mask == tuple(tuple(int(m) for m in row) for row in result.piece_mask)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pruned)
    hf_model = peft.PeftModel.from_pretrained(llama_lm(), str(tmp_path))
    with torch.no_grad():
        assert_close_to_scale(hf_model(input_ids=ids).logits, pruned)


def test_xprompt_refuses_what_it_cannot_prune():
    lora = peftcore.get_peft_model(llama_lm(), peftcore.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(peftcore.AdapterError, match="not a prompt-tuning adapter"):
        xprompt_prune(lora, _batches(1), _loss, progress=False)
    residual = peftcore.get_peft_model(llama_lm(), peftcore.ResidualPromptTuningConfig(num_virtual_tokens=4, bottleneck_size=4))
    with pytest.raises(peftcore.AdapterError, match="bake"):
        xprompt_prune(residual, _batches(1), _loss, progress=False)
    with pytest.raises(peftcore.ConfigError, match="token_ratio"):
        XPromptConfig(token_ratio=1.0)
    model = _trained_prompt_model(steps=1)
    with pytest.raises(peftcore.ConfigError, match="at least one batch"):
        xprompt_prune(model, [], _loss, progress=False)
    before = _prompt(model)[0]

    def failing(model, batch):
        raise RuntimeError("loss blew up")

    with pytest.raises(RuntimeError, match="blew up"):
        xprompt_prune(model, _batches(1), failing, progress=False)
    assert torch.equal(_prompt(model)[0], before)
    xprompt_prune(model, _batches(1), _loss, progress=False)
    with pytest.raises(peftcore.AdapterError, match="already pruned"):
        xprompt_prune(model, _batches(1), _loss, progress=False)
