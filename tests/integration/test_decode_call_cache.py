"""Decoding with one LoRA adapter: each layer prepares its operands at the first step of
a ``generate`` call and reuses them at the next ones (:mod:`peftcore_torch.call_cache`).

What must hold: the tokens and scores equal those of the same model decoding without the
call cache; the preparation happens once per layer per call, not per token; a change to
the adapters made from inside the call (here by a logits processor) is seen at the next
step; and nothing outlives the call.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import peftcore  # noqa: E402
from peftcore.model_lock import model_lock  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from peftcore_torch import call_cache, lora, lora_kernels  # noqa: E402
from tests.integration.tiny import gpt2_lm, random_ids  # noqa: E402

TARGETS = ["c_attn", "c_proj", "c_fc"]
STEPS = 6


def adapted() -> Any:
    config = peftcore.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = peftcore.get_peft_model(gpt2_lm(), config, adapter_name="one")
    model.add_adapter("two", peftcore.LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():  # larger updates, so that the adapters pick different tokens
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(20.0)
    return model.eval()


def greedy(model: Any, ids: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS,
            do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kwargs,
        )


def assert_same_scores(actual: Any, expected: Any) -> None:
    """Scores agree where finite; the entries a processor set to -inf are the same."""
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual))
    assert_close_to_scale(actual[finite], expected[finite])


def lora_layers(model: Any) -> list[Any]:
    return [m for m in model.modules() if isinstance(m, lora.LoraLinear)]


@pytest.mark.parametrize("batch", [1, 3])
def test_cached_decoding_equals_uncached_and_prepares_each_layer_once(batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = adapted()
    ids = random_ids(batch, 5)
    prepared: list[Any] = []
    make = lora_kernels.PreparedLoraLinear.__init__

    def counting(self: Any, *args: Any) -> None:
        prepared.append(self)
        make(self, *args)

    monkeypatch.setattr(lora_kernels.PreparedLoraLinear, "__init__", counting)
    cached = greedy(model, ids)
    assert len(prepared) == len(lora_layers(model)) == 2 * 4, "one preparation per LoRA layer for the whole call"
    prepared.clear()
    uncached = greedy(model.get_base_model(), ids)  # the adapted model itself: no call cache
    assert not prepared
    assert torch.equal(cached.sequences, uncached.sequences)
    for ours, plain in zip(cached.scores, uncached.scores):
        assert_same_scores(ours, plain)
    with model.disable_adapter():
        base = greedy(model, ids)
    assert not torch.equal(base.sequences, cached.sequences), "the adapter must change the tokens"


def test_a_change_made_inside_the_call_is_seen_at_the_next_step() -> None:
    """A logits processor switches the active adapter after the third token: the steps
    after it are scored by the other adapter, those before by the first (without the
    key/value cache, whose entries from before the switch would mix the two)."""
    model = adapted()
    ids = random_ids(2, 5)
    seen: list[tuple[str, Any, Any]] = []

    class SwitchAfterThree(transformers.LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            seen.append((model.active_adapter, input_ids.clone(), scores.clone()))
            if len(seen) == 3:
                model.set_adapter("two")
            return scores

    changes = model_lock(model).changes
    greedy(model, ids, logits_processor=transformers.LogitsProcessorList([SwitchAfterThree()]), use_cache=False)
    assert model_lock(model).changes > changes
    assert [name for name, _, _ in seen] == ["one"] * 3 + ["two"] * (STEPS - 3)
    with torch.no_grad():
        for name, prefix, scores in seen:
            model.set_adapter(name)
            expected = model(input_ids=prefix, attention_mask=torch.ones_like(prefix)).logits[:, -1]
            assert_same_scores(scores, expected.masked_fill(~torch.isfinite(scores), float("-inf")))


def test_the_cache_lives_only_for_the_call() -> None:
    model = adapted()
    call_entries = call_cache.call_entries
    inside: list[Any] = []
    sizes: list[Any] = []

    class Look(transformers.LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            entries = call_entries()
            inside.append(entries)
            sizes.append(None if entries is None else len(entries))
            return scores

    assert call_cache.call_entries() is None
    greedy(model, random_ids(1, 4), logits_processor=transformers.LogitsProcessorList([Look()]))
    assert sizes == [8] * STEPS, "every LoRA layer keeps its prepared product during the call"
    assert call_cache.call_entries() is None
    assert inside[0] == {}, "the entries are dropped when the call ends"


def test_a_layer_that_cannot_use_the_prepared_product_keeps_its_own_route() -> None:
    """DoRA and dropout in training mode are not prepared (their forward differs); they
    decode exactly as without the cache."""
    config = peftcore.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
    model = peftcore.get_peft_model(gpt2_lm(), config).eval()
    ids = random_ids(1, 5)
    cached, uncached = greedy(model, ids), greedy(model.get_base_model(), ids)
    assert torch.equal(cached.sequences, uncached.sequences)
    for ours, plain in zip(cached.scores, uncached.scores):
        assert torch.equal(ours, plain)
