"""The torch PeftModel is a ``torch.nn.Module``, laid out as Hugging Face PEFT's.

Everyday torch code must treat it as a module: chained ``.to()``/``.eval()``, deepcopy,
pickle, ``torch.save``; its state dict must be exchangeable with a real ``peft.PeftModel``
both ways; ``from_pretrained`` returns it in eval mode; ``forward`` shows the base model's
parameters to ``inspect.signature``.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import peftcore  # noqa: E402
from peftcore import LoraConfig, PeftModel  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from tests.integration.tiny import gpt2_lm, llama_lm, random_ids  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Linear (Llama), Conv1D (GPT-2) and Embedding layers, as HF PEFT lays each out
TARGETS = {"llama": ["q_proj", "v_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc", "wte"]}
BUILDS = {"llama": llama_lm, "gpt2": gpt2_lm}


def adapted(family: str, seed: int = 0) -> Any:
    pm = peftcore.get_peft_model(BUILDS[family](), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family]))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 11)
        for parameter in pm.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return pm


def hf_adapted(family: str) -> Any:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(BUILDS[family](), config)


def logits(model: Any, ids: Any) -> Any:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_peft_model_is_a_torch_module_and_a_peftcore_peft_model() -> None:
    pm = adapted("llama")
    assert isinstance(pm, torch.nn.Module) and isinstance(pm, PeftModel)
    assert pm.base_model.model is pm.get_base_model()
    assert pm.config is pm.get_base_model().config  # attributes come from the model, as in HF PEFT


@pytest.mark.parametrize("chain", ["to", "eval", "train", "float", "requires_grad_", "cpu"])
def test_module_methods_return_the_peft_model(chain: str) -> None:
    pm = adapted("gpt2")
    call = {"to": lambda m: m.to("cpu"), "requires_grad_": lambda m: m.requires_grad_(False)}.get(
        chain, lambda m: getattr(m, chain)()
    )
    assert call(pm) is pm


def test_a_chained_to_eval_still_saves_only_the_adapter(tmp_path: Path) -> None:
    pm = adapted("llama").to(torch.device("cpu")).eval()
    assert isinstance(pm, PeftModel) and not pm.training and not pm.get_base_model().training
    pm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(llama_lm(), tmp_path)
    ids = random_ids(2, 6)
    torch.testing.assert_close(logits(loaded, ids), logits(pm, ids))


def _torch_save_round_trip(pm: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(pm, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copy_with", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)), _torch_save_round_trip],
                         ids=["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("family", list(BUILDS))
def test_copies_run_identically_and_keep_their_adapter_state(copy_with: Any, family: str, tmp_path: Path) -> None:
    pm = adapted(family).eval()
    ids = random_ids(2, 6)
    copied = copy_with(pm)
    assert copied is not pm and isinstance(copied, PeftModel)
    assert torch.equal(logits(copied, ids), logits(pm, ids))
    assert copied.active_adapters == ["default"] and list(copied.peft_config) == ["default"]
    with copied.disable_adapter():  # the copy's adapter state machine works on its own layers
        base = logits(copied, ids)
    assert torch.equal(base, logits(BUILDS[family](), ids))
    copied.save_pretrained(tmp_path)
    assert torch.equal(logits(PeftModel.from_pretrained(BUILDS[family](), tmp_path), ids), logits(pm, ids))


@pytest.mark.parametrize("family", list(BUILDS))
def test_state_dict_keys_are_hugging_face_peft_keys(family: str) -> None:
    ours, theirs = adapted(family).state_dict(), hf_adapted(family).state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape, key


@pytest.mark.parametrize("family", list(BUILDS))
def test_state_dicts_load_both_ways_with_equal_outputs(family: str) -> None:
    ids = random_ids(2, 6)
    ours = adapted(family, seed=1).eval()
    theirs = hf_adapted(family).eval()
    theirs.load_state_dict(ours.state_dict())
    assert_close_to_scale(logits(theirs, ids), logits(ours, ids))

    theirs_trained = hf_adapted(family).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        for name, parameter in theirs_trained.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    fresh = adapted(family, seed=2).eval()
    fresh.load_state_dict(theirs_trained.state_dict())
    assert_close_to_scale(logits(fresh, ids), logits(theirs_trained, ids))


def test_from_pretrained_is_in_eval_mode_unless_trainable(tmp_path: Path) -> None:
    config = LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5)
    peftcore.get_peft_model(llama_lm(), config).save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(llama_lm().train(), tmp_path)
    assert not frozen.training and not any(m.training for m in frozen.modules())
    assert frozen.get_nb_trainable_parameters()[0] == 0
    ids = random_ids(2, 6)
    assert torch.equal(logits(frozen, ids), logits(frozen, ids))  # dropout is off
    trainable = PeftModel.from_pretrained(llama_lm().train(), tmp_path, is_trainable=True)
    assert trainable.training and trainable.get_nb_trainable_parameters()[0] > 0


def test_forward_shows_the_base_models_parameters() -> None:
    pm = adapted("llama")
    parameters = inspect.signature(pm.forward).parameters
    base = inspect.signature(pm.get_base_model().forward).parameters
    assert list(base) == [name for name in parameters if name != "adapter_names"]
    assert {"input_ids", "attention_mask", "labels"} <= set(parameters) and "adapter_names" in parameters
    out = pm.forward(input_ids=random_ids(1, 4))  # and it still runs, called directly
    assert out.logits.shape[:2] == (1, 4)


def test_forward_is_bound_once_and_copies_call_their_own_model() -> None:
    pm = adapted("gpt2")
    assert pm.forward is pm.forward  # kept on the instance after the first lookup
    ids = random_ids(1, 5)
    expected = logits(pm, ids)
    for twin in (copy.deepcopy(pm), pickle.loads(pickle.dumps(pm))):
        assert twin.forward is not pm.forward and twin.forward.peft_model is twin
        with torch.no_grad():
            twin.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight.add_(1.0)
        assert torch.equal(logits(pm, ids), expected)  # the copy's change stays in the copy
        assert not torch.equal(twin.forward(input_ids=ids).logits, expected)
