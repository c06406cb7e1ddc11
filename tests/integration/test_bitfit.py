"""BitFit on tiny transformers models (torch backend)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import peftcore  # noqa: E402
from peftcore import BitFitConfig, PeftModel  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from tests.integration.tiny import bert_cls, llama_lm, random_ids  # noqa: E402


def _outputs(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def test_paper_subset_trains_query_and_intermediate_biases_only():
    model = peftcore.get_peft_model(bert_cls(), BitFitConfig(target_modules=["query", "intermediate.dense"]))
    base = bert_cls()
    expected = sum(
        module.bias.numel()
        for name, module in base.named_modules()
        if name.endswith(("attention.self.query", "intermediate.dense"))
    )
    assert model.get_nb_trainable_parameters()[0] == expected == 2 * (32 + 64)
    names = sorted(name for name, p in model.model.named_parameters() if p.requires_grad)
    assert all(name.endswith("bitfit_bias.default") for name in names)
    assert len(names) == 4


def test_all_biases_by_default_and_output_unchanged_at_init():
    base = bert_cls()
    ids = random_ids(2, 6)
    expected = _outputs(base, ids)
    model = peftcore.get_peft_model(bert_cls(), BitFitConfig())
    biases = sum(p.numel() for name, p in base.named_parameters() if name.endswith(".bias"))
    assert model.get_nb_trainable_parameters()[0] == biases
    assert torch.equal(_outputs(model, ids), expected)


def test_llama_gets_new_zero_biases_and_exact_outputs_at_init():
    ids = random_ids(2, 6)
    expected = _outputs(llama_lm(), ids)
    model = peftcore.get_peft_model(llama_lm(), BitFitConfig(add_missing_biases=True))
    plan = model.plans["default"]
    added = [op for op in plan.ops_of("bitfit_bias") if op.added]
    assert added and all("lm_head" not in op.path for op in added)
    # every linear but the head: 2 layers x (q, k, v, o, gate, up, down)
    assert len(added) == 14
    assert model.get_nb_trainable_parameters()[0] == sum(op.size for op in added)
    assert torch.equal(_outputs(model, ids), expected)
    with pytest.raises(peftcore.TargetNotFoundError, match="add_missing_biases"):
        peftcore.get_peft_model(llama_lm(), BitFitConfig())


def test_training_moves_only_biases_and_merge_folds_added_ones(tmp_path):
    model = peftcore.get_peft_model(llama_lm(), BitFitConfig(add_missing_biases=True, target_modules=["q_proj", "down_proj"]))
    ids = random_ids(4, 8, seed=3)
    frozen = {name: p.detach().clone() for name, p in model.model.named_parameters() if not p.requires_grad}
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    for name, p in model.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    trained = _outputs(model, ids)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(llama_lm(), str(tmp_path))
    torch.testing.assert_close(_outputs(loaded, ids), trained)
    merged = loaded.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.bias is not None
    assert_close_to_scale(_outputs(merged, ids), trained)


def test_merge_unmerge_restores_biases_bit_for_bit():
    model = peftcore.get_peft_model(bert_cls(), BitFitConfig())
    originals = {name: p.detach().clone() for name, p in model.model.named_parameters() if name.endswith("base_layer.bias")}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    for _ in range(5):
        model.merge_adapter()
        model.unmerge_adapter()
    for name, p in model.model.named_parameters():
        if name in originals:
            assert torch.equal(p, originals[name]), name
