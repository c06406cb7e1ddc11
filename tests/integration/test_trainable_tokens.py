"""LoRA's ``trainable_token_indices`` against real HF PEFT.

Tiny Llama models (untied and tied embeddings) built from configs: files move both ways
under HF PEFT's keys (``...embed_tokens.token_adapter.trainable_tokens_delta``, once for
a tied head), outputs are equal, training changes only the chosen rows, merge equals the
unmerged forward and unmerge restores the table bit for bit, and new special tokens
(embeddings resized, then the new rows trained) work.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from tiny import seeded, train_steps  # noqa: E402

import peftcore  # noqa: E402
from peftcore.errors import AdapterError, ConfigError  # noqa: E402
from peftcore.testing.numerics import FLOAT32_RTOL, assert_close_to_scale  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

VOCAB = 60
ROWS = [1, 3, 5]
EMBED_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def llama(tied: bool, seed: int = 0) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied,
    )
    return seeded(lambda: transformers.LlamaForCausalLM(config), seed)


def _ids() -> Any:
    return torch.tensor([[1, 2, 3, 4, 5, 6, 7], [5, 9, 1, 1, 8, 3, 2]])


def _logits(model: Any, ids: Any) -> np.ndarray:
    with torch.no_grad():
        return model(ids).logits.numpy()


def _ours(base: Any, rows: Any = ROWS, **extra: Any) -> Any:
    config = peftcore.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=rows, **extra)
    return peftcore.get_peft_model(copy.deepcopy(base), config)


def _perturb_rows(model: Any, seed: int = 3) -> None:
    """Move the adapter's rows away from the table's, as training would."""
    delta = model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    with torch.no_grad():
        delta.add_(torch.randn(delta.shape, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("tied", [False, True])
def test_our_file_loads_in_hf_peft_with_equal_outputs(tied: bool, tmp_path: Any) -> None:
    base, ids = llama(tied), _ids()
    ours = _ours(base)
    _perturb_rows(ours)
    ours.save_pretrained(str(tmp_path))
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert EMBED_KEY in keys and not any("lm_head" in k for k in keys)  # a tied head's rows are saved once
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    expected = _logits(ours, ids)
    assert not np.allclose(expected, _logits(base, ids))
    np.testing.assert_array_equal(_logits(theirs, ids), expected)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_file_loads_in_peftcore_with_equal_outputs(tied: bool, tmp_path: Any) -> None:
    base, ids = llama(tied), _ids()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=ROWS)
    )
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].add_(1.0)
    theirs.save_pretrained(str(tmp_path))
    ours = peftcore.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    np.testing.assert_array_equal(_logits(ours, ids), _logits(theirs, ids))
    assert type(ours.base_model.model.lm_head).__name__ == ("TiedTokens" if tied else "Linear")


@pytest.mark.parametrize("tied", [False, True])
def test_training_changes_only_the_chosen_rows(tied: bool) -> None:
    base, ids = llama(tied), _ids()
    model = _ours(base)
    table = base.model.embed_tokens.weight.detach().clone()
    losses = train_steps(model, {"input_ids": ids, "labels": ids}, steps=6, lr=1e-2, dropout=False)
    assert losses[-1] < losses[0]
    layer = model.base_model.model.model.embed_tokens
    assert torch.equal(layer.base_layer.weight, table)  # the table itself is frozen
    with torch.no_grad():
        effective = layer.table(["default"])
    moved = sorted(int(i) for i in torch.nonzero((effective != table).any(dim=1)).flatten())
    assert moved == ROWS
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "embed" in n or "lm_head" in n} == {
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    }


@pytest.mark.parametrize("tied", [False, True])
def test_merge_equals_unmerged_and_unmerge_is_exact(tied: bool) -> None:
    base, ids = llama(tied), _ids()
    model = _ours(base)
    _perturb_rows(model)
    table = base.model.embed_tokens.weight.detach().clone()
    unmerged = _logits(model, ids)
    model.merge_adapter()
    # the merge adds (rows - table) to the table: the rows come back within float32 rounding
    merged_rows = model.base_model.model.model.embed_tokens.base_layer.weight[ROWS]
    rows = model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert_close_to_scale(merged_rows.detach().numpy(), rows.detach().numpy(), FLOAT32_RTOL)
    assert_close_to_scale(_logits(model, ids), unmerged, FLOAT32_RTOL)
    model.unmerge_adapter()
    assert torch.equal(model.base_model.model.model.embed_tokens.base_layer.weight, table)
    plain = copy.deepcopy(model).merge_and_unload()
    assert_close_to_scale(_logits(plain, ids), unmerged, FLOAT32_RTOL)
    assert type(plain.lm_head) is torch.nn.Linear and type(plain.model.embed_tokens) is torch.nn.Embedding


def test_new_special_tokens_are_trained_alone(tmp_path: Any) -> None:
    base = llama(tied=False)
    base.resize_token_embeddings(VOCAB + 2)  # two new special tokens
    new = [VOCAB, VOCAB + 1]
    ids = torch.tensor([[1, VOCAB, 4, 5, VOCAB + 1, 2]])
    model = _ours(base, rows=new)
    table = base.model.embed_tokens.weight.detach().clone()
    losses = train_steps(model, {"input_ids": ids, "labels": ids}, steps=6, lr=5e-2, dropout=False)
    assert losses[-1] < losses[0]
    rows = model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert not torch.equal(rows, table[new])
    model.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    np.testing.assert_array_equal(_logits(theirs, ids), _logits(model, ids))


def test_a_dict_names_the_modules() -> None:
    base, ids = llama(tied=False), _ids()
    model = _ours(base, rows={"embed_tokens": [2, 4], "lm_head": [7]})
    kinds = {op.path: op.op for op in model.plans["default"].ops if op.op == "trainable_tokens"}
    assert kinds == {"model.embed_tokens": "trainable_tokens", "lm_head": "trainable_tokens"}
    assert model.export_adapter("default")["lm_head.trainable_tokens_delta"].shape == (1, 16)
    assert_close_to_scale(_logits(model, ids), _logits(base, ids), FLOAT32_RTOL)  # init: the rows' own values


def test_adapters_with_overlapping_rows_are_not_merged_together() -> None:
    model = _ours(llama(tied=False))
    model.add_adapter("other", peftcore.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[5, 6]))
    with pytest.raises(AdapterError, match="overlap"):
        model.merge_adapter(["default", "other"])


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        ([], "non-empty"),
        ([1, -2], "non-negative"),
        ({"no_such_layer": [1]}, "matches no layer"),
        ([VOCAB + 5], "outside"),
    ],
)
def test_bad_indices_are_refused(rows: Any, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        _ours(llama(tied=False), rows=rows)


def test_an_embedding_in_modules_to_save_is_refused() -> None:
    with pytest.raises(ConfigError, match="modules_to_save"):
        _ours(llama(tied=False), rows={"embed_tokens": [1]}, modules_to_save=["embed_tokens"])


@pytest.mark.parametrize("tied", [False, True])
def test_the_trainable_tokens_method_moves_both_ways(tied: bool, tmp_path: Any) -> None:
    """HF PEFT's ``TrainableTokensConfig``: keys without ``token_adapter.``, a tied head's
    rows saved under its own key too, as HF PEFT writes them."""
    base, ids = llama(tied), _ids()
    ours = peftcore.get_peft_model(copy.deepcopy(base), peftcore.TrainableTokensConfig(token_indices=ROWS))
    assert_close_to_scale(_logits(ours, ids), _logits(base, ids), FLOAT32_RTOL)  # unchanged until trained
    losses = train_steps(ours, {"input_ids": ids, "labels": ids}, steps=4, lr=5e-2, dropout=False)
    assert losses[-1] < losses[0]
    ours.save_pretrained(str(tmp_path / "ours"))
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    expected = {"base_model.model.model.embed_tokens.trainable_tokens_delta"}
    assert keys == (expected | {"base_model.model.lm_head.trainable_tokens_delta"} if tied else expected)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    np.testing.assert_array_equal(_logits(theirs, ids), _logits(ours, ids))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = peftcore.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "theirs"))
    np.testing.assert_array_equal(_logits(back, ids), _logits(theirs, ids))
    assert back.peft_config["default"].target_modules == "model.embed_tokens"
