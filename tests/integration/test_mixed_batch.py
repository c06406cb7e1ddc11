"""Mixed-adapter batches: ``peft_model(inputs, adapter_names=[...])`` runs each row through
the adapter it names (``"__base__"``: none), as Hugging Face PEFT's argument does.

Every row of a mixed batch must equal that row run alone with its adapter active, on
each route the torch layers take: for inference, folding each adapter into a temporary
weight (long batches whose rows are grouped by adapter) or adding every row's update at
once from stacked factors; under autograd (and for embeddings), adding each adapter's
update on its rows. On GPT-2 (``Conv1D``), Linear and Embedding layers; ``modules_to_save``
copies route rows too, ``generate(adapter_names=...)`` decodes each row through its own
adapter, and a model in training mode refuses ``adapter_names``, all as in HF PEFT.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, List, Sequence

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402

import peftcore  # noqa: E402
from peftcore import AdapterError, BackendError, LoraConfig  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402

VOCAB = 50
ADAPTERS = ["one", "two", "three"]


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel(config).eval()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def lora(targets: Any, r: int = 4, **changes: Any) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **changes)


def with_adapters(model: nn.Module, targets: Any, ranks: Sequence[int] = (4, 2, 8)) -> Any:
    peft_model = peftcore.get_peft_model(model, lora(targets, ranks[0]), adapter_name=ADAPTERS[0])
    for name, r in zip(ADAPTERS[1:], ranks[1:]):
        peft_model.add_adapter(name, lora(targets, r))
    return peft_model


def outputs(peft_model: Any, tokens: Any, **kwargs: Any) -> Any:
    out = peft_model(tokens, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def one_by_one(peft_model: Any, tokens: Any, names: List[str]) -> Any:
    """Each row run alone with its adapter active (or with adapters disabled)."""
    rows = []
    for row, name in enumerate(names):
        if name == "__base__":
            with peft_model.disable_adapter():
                rows.append(outputs(peft_model, tokens[row:row + 1]))
        else:
            peft_model.set_adapter(name)
            rows.append(outputs(peft_model, tokens[row:row + 1]))
    peft_model.set_adapter(ADAPTERS[0])
    return torch.cat(rows)


ROW_ORDERS = {
    "interleaved": ["one", "two", "__base__", "three", "one", "two", "three", "__base__"],
    "grouped": ["one", "one", "two", "two", "three", "three", "__base__", "__base__"],
    "one adapter": ["two"] * 8,
}


@pytest.mark.parametrize("order", list(ROW_ORDERS))
@pytest.mark.parametrize("length", [3, 48], ids=["short (updates added)", "long (adapters folded)"])
def test_each_row_matches_its_adapter_run_alone_gpt2(order: str, length: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import peftcore_torch.lora as torch_lora

    folded_calls = []
    real = torch_lora.routed_folded_linear
    monkeypatch.setattr(torch_lora, "routed_folded_linear", lambda *a, **k: folded_calls.append(1) or real(*a, **k))
    peft_model = with_adapters(gpt2(), ["c_attn", "c_proj", "c_fc"])
    tokens = torch.randint(0, VOCAB, (8, length), generator=torch.Generator().manual_seed(1))
    names = ROW_ORDERS[order]
    with torch.no_grad():
        mixed = outputs(peft_model, tokens, adapter_names=names)
        expected = one_by_one(peft_model, tokens, names)
        base_only = outputs(peft_model, tokens, adapter_names=["__base__"] * 8)
        with peft_model.disable_adapter():
            assert_close_to_scale(base_only, outputs(peft_model, tokens))
    assert_close_to_scale(mixed, expected)
    assert not torch.allclose(mixed, base_only, atol=1e-3), "the adapters must change the output"
    # folding needs enough tokens per adapter (interleaved rows: on the narrow-output layers only);
    # one adapter for all rows runs unrouted
    assert bool(folded_calls) == (length > 3 and order != "one adapter"), "every route is covered"


@pytest.mark.parametrize("length", [2, 40])
@pytest.mark.parametrize("names", [["three", "__base__", "one", "three"], ["three", "three", "one", "__base__"]],
                         ids=["interleaved", "grouped"])
def test_linear_and_embedding_layers_route_rows(length: int, names: List[str]) -> None:
    peft_model = with_adapters(mlp(), ["0", "1", "3"])
    tokens = torch.randint(0, VOCAB, (4, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mixed = outputs(peft_model, tokens, adapter_names=names)
        expected = one_by_one(peft_model, tokens, names)
    assert_close_to_scale(mixed, expected)


def test_an_adapter_only_on_some_layers_leaves_the_others_as_base() -> None:
    peft_model = peftcore.get_peft_model(mlp(), lora(["1", "3"]), adapter_name="one")
    peft_model.add_adapter("two", lora(["3"]))
    tokens = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    names = ["two", "one", "__base__"]
    with torch.no_grad():
        assert_close_to_scale(outputs(peft_model, tokens, adapter_names=names), one_by_one(peft_model, tokens, names))


def test_gradients_of_a_mixed_batch_match_each_adapter_trained_on_its_rows() -> None:
    peft_model = with_adapters(mlp(), ["1", "3"])
    peft_model.set_adapter(ADAPTERS)  # every adapter trainable; rows still use only the adapter they name
    tokens = torch.randint(0, VOCAB, (6, 4), generator=torch.Generator().manual_seed(4))
    names = ["one", "two", "one", "three", "__base__", "two"]
    params = {n: p for n, p in peft_model.model.named_parameters() if "lora_" in n}
    tracked = outputs(peft_model, tokens, adapter_names=names)
    with torch.no_grad():  # inference takes another route (stacked factors); same numbers
        untracked = outputs(peft_model, tokens, adapter_names=names)
    assert_close_to_scale(tracked.detach(), untracked)
    tracked.pow(2).sum().backward()
    mixed = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    for row, name in enumerate(names):
        if name != "__base__":  # a base row reaches no adapter factor
            outputs(peft_model, tokens[row:row + 1], adapter_names=[name]).pow(2).sum().backward()
    for n, p in params.items():
        assert_close_to_scale(mixed[n], p.grad)
    assert all(mixed[n].abs().sum() > 0 for n in params), "every adapter has rows, so every factor gets a gradient"


def test_mixed_batches_agree_with_hf_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    ours = with_adapters(gpt2(), ["c_attn", "c_proj", "c_fc"])
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(gpt2(), tmp_path / ADAPTERS[0], adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    theirs.eval()
    tokens = torch.randint(0, VOCAB, (8, 40), generator=torch.Generator().manual_seed(5))
    names = ROW_ORDERS["interleaved"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs(input_ids=tokens, adapter_names=names).logits
        got = ours(input_ids=tokens, adapter_names=names).logits
    assert_close_to_scale(got, expected)


def test_routing_ends_with_the_call_even_when_it_fails() -> None:
    peft_model = with_adapters(mlp(), ["1", "3"])
    tokens = torch.randint(0, VOCAB, (2, 3))
    with torch.no_grad():
        plain = outputs(peft_model, tokens)
        outputs(peft_model, tokens, adapter_names=["two", "three"])
        assert torch.equal(outputs(peft_model, tokens), plain)
        layer = peft_model.model[1]
        with pytest.raises(RuntimeError):
            # the embedding rejects float inputs: the call fails after routing was set
            peft_model(torch.randint(0, VOCAB, (2, 3)).float(), adapter_names=["two", "one"])
        assert layer.batch_routing is None
        assert torch.equal(outputs(peft_model, tokens), plain)


def test_disabled_adapters_give_the_base_output_for_every_row() -> None:
    peft_model = with_adapters(mlp(), ["1", "3"])
    tokens = torch.randint(0, VOCAB, (3, 4))
    with torch.no_grad(), peft_model.disable_adapter():
        base = outputs(peft_model, tokens)
        assert torch.equal(outputs(peft_model, tokens, adapter_names=["one", "two", "three"]), base)


# -- errors -------------------------------------------------------------------------------
def test_an_unknown_adapter_name_is_named_with_a_suggestion() -> None:
    peft_model = with_adapters(mlp(), ["1"])
    with pytest.raises(AdapterError, match=r"'thre'.*did you mean 'three'"):
        peft_model(torch.zeros(2, 3, dtype=torch.long), adapter_names=["one", "thre"])


def test_one_name_per_row() -> None:
    peft_model = with_adapters(mlp(), ["1"])
    with pytest.raises(AdapterError, match="but got 3 and 2 respectively"):
        peft_model(torch.zeros(2, 3, dtype=torch.long), adapter_names=["one", "two", "one"])
    with pytest.raises(AdapterError, match="one per row"):
        peft_model(torch.zeros(1, 3, dtype=torch.long), adapter_names="one")


def test_a_batch_size_mismatch_seen_only_inside_the_model_is_caught_by_the_layer() -> None:
    peft_model = with_adapters(mlp(), ["1"])
    with pytest.raises(AdapterError, match="but got 2 and 4 respectively"):
        # ``input`` is not a name the API inspects: only the layers see the batch
        peft_model(input=torch.zeros(4, 3, dtype=torch.long), adapter_names=["one", "two"])


def test_merged_adapters_cannot_be_mixed() -> None:
    peft_model = with_adapters(mlp(), ["1"])
    peft_model.merge_adapter(["one"])
    with pytest.raises(AdapterError, match="merged"):
        peft_model(torch.zeros(2, 3, dtype=torch.long), adapter_names=["one", "two"])
    peft_model.unmerge_adapter()
    peft_model(torch.zeros(2, 3, dtype=torch.long), adapter_names=["one", "two"])


def test_a_layer_that_cannot_route_rows_is_refused_and_nothing_is_routed() -> None:
    peft_model = peftcore.get_peft_model(mlp(), lora(["1"]), adapter_name="one")
    peft_model.add_adapter("two", peftcore.BitFitConfig(target_modules=["3"]))
    with pytest.raises(BackendError, match=r"'3'.*cannot run a batch whose rows use different adapters"):
        peft_model(torch.zeros(2, 3, dtype=torch.long), adapter_names=["one", "two"])
    assert peft_model.model[1].batch_routing is None


def test_adapter_names_in_training_mode_is_refused_as_hf_does() -> None:
    peft_model = with_adapters(mlp(), ["1"]).train()
    with pytest.raises(ValueError, match="training mode"):
        peft_model(torch.zeros(2, 3, dtype=torch.long), adapter_names=["one", "two"])
    assert peft_model.model[1].batch_routing is None
    peft_model.eval()
    peft_model(torch.zeros(2, 3, dtype=torch.long), adapter_names=["one", "two"])


# -- modules_to_save ----------------------------------------------------------------------
def _saved_copies_differ(peft_model: Any) -> None:
    """Give each adapter's copy of the saved module (``mlp()[3]``) its own weights."""
    with torch.no_grad():
        for i, copy in enumerate(peft_model.model[3].modules_to_save.values()):
            copy.weight.add_(0.1 * (i + 1))


@pytest.mark.parametrize("names", [["two", "__base__", "one", "two"], ["one", "one", "two", "two"], ["two"] * 4],
                         ids=["interleaved", "grouped", "one adapter"])
def test_modules_to_save_route_each_row_to_its_adapters_copy(names: List[str]) -> None:
    peft_model = peftcore.get_peft_model(mlp(), lora(["1"], modules_to_save=["3"]), adapter_name="one")
    peft_model.add_adapter("two", lora(["1"], modules_to_save=["3"]))
    _saved_copies_differ(peft_model)
    tokens = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        mixed = outputs(peft_model, tokens, adapter_names=names)
        expected = one_by_one(peft_model, tokens, names)
    assert_close_to_scale(mixed, expected)
    assert peft_model.model[3].batch_routing is None


def test_an_adapter_without_a_saved_copy_runs_the_original_module_on_its_rows() -> None:
    peft_model = peftcore.get_peft_model(mlp(), lora(["1"], modules_to_save=["3"]), adapter_name="one")
    peft_model.add_adapter("two", lora(["1"]))  # no copy of "3": its rows use the original
    _saved_copies_differ(peft_model)
    tokens = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(7))
    names = ["two", "one", "__base__"]
    with torch.no_grad():
        assert_close_to_scale(outputs(peft_model, tokens, adapter_names=names), one_by_one(peft_model, tokens, names))


def test_modules_to_save_mixed_batches_agree_with_hf_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    ours = peftcore.get_peft_model(gpt2(), lora(["c_attn"], modules_to_save=["lm_head"]), adapter_name="one")
    ours.add_adapter("two", lora(["c_attn"], r=2, modules_to_save=["lm_head"]))
    with torch.no_grad():
        for i, copy in enumerate(ours.base_model.model.lm_head.modules_to_save.values()):
            copy.weight.mul_(1.0 + 0.5 * (i + 1))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(gpt2(), tmp_path / "one", adapter_name="one")
    theirs.load_adapter(tmp_path / "two", adapter_name="two")
    theirs.eval()
    tokens = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(8))
    names = ["two", "__base__", "one", "two"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs(input_ids=tokens, adapter_names=names).logits
        got = ours(input_ids=tokens, adapter_names=names).logits
        alone = one_by_one(ours, tokens, names)
    assert_close_to_scale(got, expected)
    assert_close_to_scale(got, alone)


# -- generate -----------------------------------------------------------------------------
def enlarge_updates(peft_model: Any) -> None:
    """Scale every lora_B by 20, so that the adapters pick different tokens when decoding."""
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(20.0)


def _generate_alone(peft_model: Any, tokens: Any, names: List[str], **kwargs: Any) -> List[Any]:
    rows = []
    for row, name in enumerate(names):
        if name == "__base__":
            with peft_model.disable_adapter():
                rows.append(peft_model.generate(tokens[row:row + 1], **kwargs))
        else:
            peft_model.set_adapter(name)
            rows.append(peft_model.generate(tokens[row:row + 1], **kwargs))
    peft_model.set_adapter(ADAPTERS[0])
    return rows


@pytest.mark.parametrize("beams", [1, 2], ids=["greedy", "beam search"])
def test_generate_decodes_each_row_through_its_own_adapter(beams: int) -> None:
    peft_model = with_adapters(gpt2(), ["c_attn", "c_proj", "c_fc"])
    enlarge_updates(peft_model)
    tokens = torch.randint(1, VOCAB, (4, 5), generator=torch.Generator().manual_seed(9))
    names = ["three", "__base__", "one", "two"]
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=0,
                  attention_mask=torch.ones_like(tokens))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = peft_model.generate(tokens, adapter_names=names, **kwargs)
        kwargs["attention_mask"] = torch.ones_like(tokens[:1])
        alone = _generate_alone(peft_model, tokens, names, **kwargs)
        plain = peft_model.generate(tokens, **{**kwargs, "attention_mask": torch.ones_like(tokens)})
    assert mixed.shape[0] == 4
    for row, expected in enumerate(alone):
        assert torch.equal(mixed[row, : expected.shape[1]], expected[0]), f"row {row} ({names[row]})"
    assert len({tuple(row.tolist()) for row in mixed}) > 1, "the adapters must decode differently"
    assert not torch.equal(mixed, plain), "rows other than adapter 'one' decode differently from 'one'"
    for layer in peft_model.modules():
        if hasattr(layer, "batch_routing"):
            assert layer.batch_routing is None


def test_generate_checks_adapter_names_as_forward_does() -> None:
    peft_model = with_adapters(gpt2(), ["c_attn"])
    tokens = torch.randint(1, VOCAB, (2, 3))
    with pytest.raises(AdapterError, match="got 1 and 2 respectively"):
        peft_model.generate(tokens, adapter_names=["one"], max_new_tokens=2, pad_token_id=0)
    peft_model.train()
    with pytest.raises(ValueError, match="training mode"):
        peft_model.generate(tokens, adapter_names=["one", "two"], max_new_tokens=2, pad_token_id=0)


def test_a_backend_without_row_routing_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftcore.runtime import BackendRuntime

    peft_model = with_adapters(mlp(), ["1"])
    monkeypatch.setattr(type(peft_model.runtime), "row_routing", BackendRuntime.row_routing)
    with pytest.raises(BackendError, match="cannot run mixed-adapter batches"):
        peft_model(torch.zeros(2, 3, dtype=torch.long), adapter_names=["one", "two"])


def test_256_distinct_adapters_in_one_batch_equal_each_row_alone() -> None:
    """Many adapters (issue 27): 256 adapters, 64 rows naming 64 of them (and the base), in a
    forward and in ``generate``, where a decoding step reuses the rows' stacked factors."""
    names = [ADAPTERS[0]] + [f"a{i}" for i in range(1, 256)]  # the helpers end on adapter "one"
    peft_model = peftcore.get_peft_model(gpt2(), lora(["c_attn", "c_fc"], r=2), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, lora(["c_attn", "c_fc"], r=2))
    enlarge_updates(peft_model)
    rows = [names[(37 * row) % 256] for row in range(63)] + ["__base__"]
    tokens = torch.randint(1, VOCAB, (64, 4), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert_close_to_scale(outputs(peft_model, tokens, adapter_names=rows), one_by_one(peft_model, tokens, rows))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = peft_model.generate(tokens, adapter_names=rows, attention_mask=torch.ones_like(tokens), **kwargs)
        alone = _generate_alone(peft_model, tokens[::9], rows[::9], attention_mask=torch.ones_like(tokens[:1]), **kwargs)
    for expected, got in zip(alone, mixed[::9]):
        assert torch.equal(got[: expected.shape[1]], expected[0])
    assert len({tuple(row.tolist()) for row in mixed}) > 8, "the adapters must decode differently"


def test_generate_with_equal_groups_applies_each_adapter_to_its_rows_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every adapter on the same number of rows (and base rows beside them): a decoding
    step gathers the rows adapter by adapter (each adapter's factors read once); the
    rows still decode as each does alone. Ranks differ (4, 2, 8), so ranks are padded."""
    from peftcore_torch import row_routing

    peft_model = with_adapters(gpt2(), ["c_attn", "c_proj", "c_fc"])
    enlarge_updates(peft_model)
    routes: list[bool] = []
    apply = row_routing.StackedRowFactors.add_updates

    def recording(self: Any, result: Any, x: Any) -> Any:
        routes.append(self.order is not None and x.reshape(x.shape[0], -1, x.shape[-1]).shape[1] == 1)
        return apply(self, result, x)

    monkeypatch.setattr(row_routing.StackedRowFactors, "add_updates", recording)
    names = ["two", "one", "__base__", "three", "one", "three", "two", "__base__"]
    tokens = torch.randint(1, VOCAB, (8, 5), generator=torch.Generator().manual_seed(12))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = peft_model.generate(tokens, adapter_names=names, attention_mask=torch.ones_like(tokens), **kwargs)
        alone = _generate_alone(peft_model, tokens, names, attention_mask=torch.ones_like(tokens[:1]), **kwargs)
    assert any(routes), "the decoding steps must take the by-adapter route"
    assert not all(routes), "the prompt (several tokens a row) takes the by-row route"
    for row, expected in enumerate(alone):
        assert torch.equal(mixed[row, : expected.shape[1]], expected[0]), f"row {row} ({names[row]})"
    assert len({tuple(row.tolist()) for row in mixed}) > 2, "the adapters must decode differently"


@pytest.mark.parametrize("names", [["two", "one", "three"], ["two", "one", "two", "one"]], ids=["own", "grouped"])
def test_generate_keeps_no_copy_of_the_rows_factors_it_does_not_need(
    names: List[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row with its own adapter, in row order: the stacked factors are the rows'
    factors already, nothing is copied. Equal groups: the decoding steps go adapter by
    adapter, so the prompt's per-row copies are not kept for them. Either way each row
    decodes as it does alone."""
    from peftcore_torch import row_routing

    peft_model = with_adapters(gpt2(), ["c_attn", "c_fc"])
    enlarge_updates(peft_model)
    kept: list[Any] = []
    apply = row_routing.StackedRowFactors.add_updates

    def recording(self: Any, result: Any, x: Any) -> Any:
        out = apply(self, result, x)
        kept.append(self._rows)
        return out

    monkeypatch.setattr(row_routing.StackedRowFactors, "add_updates", recording)
    tokens = torch.randint(1, VOCAB, (len(names), 5), generator=torch.Generator().manual_seed(13))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = peft_model.generate(tokens, adapter_names=names, attention_mask=torch.ones_like(tokens), **kwargs)
        alone = _generate_alone(peft_model, tokens, names, attention_mask=torch.ones_like(tokens[:1]), **kwargs)
    for row, expected in enumerate(alone):
        assert torch.equal(mixed[row, : expected.shape[1]], expected[0]), f"row {row} ({names[row]})"
    assert kept
    if len(set(names)) == len(names):
        assert all(rows is not None and rows[0]._base is not None for rows in kept), "views of the stacks"
    else:
        assert all(rows is None for rows in kept)
