"""The adapted model scores the prompt's last position with one matrix product
(:mod:`peftcore_torch.output_head`).

Wrapping a model in adapters freezes its weights, and torch then runs transformers'
``lm_head(hidden_states[:, -1:, :])`` as a batched product over the vocabulary matrix
expanded to every row. What must hold: during ``generate`` on the adapted model no
batched product touches the vocabulary matrix, the scores are those of the base model
(the adapters start as no-ops), and unloading gives the model back without the hook.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import peftcore  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from peftcore_torch.output_head import contiguous_input  # noqa: E402
from tests.integration.tiny import VOCAB, gpt2_lm, random_ids  # noqa: E402


class BatchedVocabProducts(TorchDispatchMode):
    """Counts batched matrix products one of whose operands has a vocabulary-sized dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm):
            if any(isinstance(a, torch.Tensor) and VOCAB in a.shape for a in args):
                self.count += 1
        return func(*args, **(kwargs or {}))


def adapted(base: Any) -> Any:
    config = peftcore.LoraConfig(r=4, target_modules=["c_attn", "c_fc"])
    return peftcore.get_peft_model(base, config).eval()


def greedy_scores(model: Any, ids: Any) -> Any:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
            do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.scores)


def head_hooks(model: Any) -> list[Any]:
    """Our hooks on ``model``'s output embeddings (or on ``model`` itself, a layer)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model
    return [h for h in head._forward_pre_hooks.values() if h is contiguous_input]


def test_frozen_model_scores_the_prompt_with_one_product() -> None:
    base = gpt2_lm()
    reference = greedy_scores(base, random_ids(4, 6))
    model = adapted(copy.deepcopy(base))
    assert not any(p.requires_grad for p in model.get_output_embeddings().parameters())
    counting = BatchedVocabProducts()
    with counting:
        sequences, scores = greedy_scores(model, random_ids(4, 6))
    assert counting.count == 0
    assert torch.equal(sequences, reference[0])
    assert_close_to_scale(scores, reference[1])


def test_without_the_hook_torch_would_batch_the_product() -> None:
    """The hazard the hook removes is real on this torch: the same frozen model, hook
    removed, runs a batched product over the vocabulary matrix."""
    model = adapted(gpt2_lm())
    model._output_head_hook.remove()
    counting = BatchedVocabProducts()
    with counting:
        greedy_scores(model, random_ids(4, 6))
    if counting.count == 0:
        pytest.skip(f"torch {torch.__version__} folds a sliced input into one product on a frozen weight itself")
    assert counting.count >= 1


@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_unload_takes_the_hook_away(how: str) -> None:
    model = adapted(gpt2_lm())
    assert len(head_hooks(model.get_base_model())) == 1
    plain = getattr(model, how)()
    assert head_hooks(plain) == []


def test_copies_keep_their_own_hook() -> None:
    model = adapted(gpt2_lm())
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert len(head_hooks(copied.get_base_model())) == 1
        plain = copied.unload()
        assert head_hooks(plain) == []
    assert len(head_hooks(model.get_base_model())) == 1


def test_a_model_wrapped_twice_is_hooked_once() -> None:
    base = gpt2_lm()
    adapted(base)
    config = peftcore.LoraConfig(r=2, target_modules=["c_proj"])
    peftcore.get_peft_model(base, config, adapter_name="other")
    assert len(head_hooks(base)) == 1


def test_an_adapted_output_layer_keeps_its_one_node_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA on ``lm_head`` wraps the hooked layer: the hook must not push the adapter layer
    off its fused product (which reshapes the input itself)."""
    from peftcore_torch import lora

    config = peftcore.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)
    model = peftcore.get_peft_model(gpt2_lm(), config).eval()
    head = model.get_base_model().lm_head
    assert len(head_hooks(head.base_layer)) == 1
    fused = lora.fused_lora_linear
    calls: list[Any] = []
    monkeypatch.setattr(lora, "fused_lora_linear", lambda *args: calls.append(args) or fused(*args))
    hidden = torch.randn(3, 5, 32)[:, -1:, :]  # a sliced input, as generate's prompt step gives
    with torch.no_grad():
        out = head(hidden)
        expected = head.base_layer(hidden.contiguous()) + head.update("default", hidden)
    assert len(calls) == 1
    assert_close_to_scale(out, expected)
