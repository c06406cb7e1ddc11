"""HF PEFT's ``prepare_model_for_kbit_training`` and
``PeftModel.prepare_model_for_gradient_checkpointing``, without quantisation, against ``peft``."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import peftcore  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from peftcore_torch import prepare_model_for_kbit_training  # noqa: E402
from tests.integration.tiny import llama_lm, random_ids  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def _state(model):
    return {name: (p.dtype, p.requires_grad) for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prepare_model_for_kbit_training_matches_hf(dtype):
    ours = prepare_model_for_kbit_training(llama_lm().to(dtype))
    theirs = peft.prepare_model_for_kbit_training(llama_lm().to(dtype))
    assert _state(ours) == _state(theirs)
    assert all(dt == torch.float32 and not grad for dt, grad in _state(ours).values())
    assert not ours.is_gradient_checkpointing  # only a quantised model gets checkpointing switched on
    model = peftcore.get_peft_model(ours, peftcore.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    ids = random_ids(2, 5)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)


def test_quantised_model_gets_checkpointing_and_grad_inputs():
    model = llama_lm()
    model.is_loaded_in_8bit = True  # what a bitsandbytes load marks; the weights stay as they are here
    prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert model.is_gradient_checkpointing
    embedded = model.get_input_embeddings()(random_ids(1, 3))
    assert embedded.requires_grad  # enable_input_require_grads' hook, though the embedding is frozen


def test_wrapping_a_checkpointed_model_makes_inputs_require_grad_as_hf():
    def wrapped(library, config):
        base = llama_lm()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        base.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return library.get_peft_model(base, config(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    grads = {}
    for name, library in (("hf", peft), ("ours", peftcore)):
        model = wrapped(library, library.LoraConfig)
        ids = random_ids(2, 5)
        assert model.get_base_model().get_input_embeddings()(ids).requires_grad
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=ids, labels=ids).loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads[name].values())
    hf_norm = sum(float(g.norm()) for g in grads["hf"].values())
    ours_norm = sum(float(g.norm()) for g in grads["ours"].values())
    assert_close_to_scale(ours_norm, hf_norm)
    plain = llama_lm()
    peftcore.get_peft_model(plain, peftcore.LoraConfig(r=2, target_modules=["q_proj"]))
    assert not plain.get_input_embeddings()(random_ids(1, 3)).requires_grad  # checkpointing off: nothing changed
