"""``adapter_config.json`` as Hugging Face PEFT writes it, checked key by key against the
file real HF PEFT saves for the same model and config, for every method both have."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import peftcore  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from tests.integration import tiny  # noqa: E402

#: keys HF PEFT writes as a set (their order in the file follows Python's hashing)
SET_KEYS = {"target_modules", "modules_to_save", "feedforward_modules"}
#: keys that say which program wrote the file
VERSION_KEYS = {"peft_version", "revision"}

CASES: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]] = {
    "lora-defaults-seq-cls-bert": (tiny.bert_cls, lambda lib: lib.LoraConfig(task_type="SEQ_CLS")),
    "lora-defaults-causal-llama": (tiny.llama_lm, lambda lib: lib.LoraConfig(task_type="CAUSAL_LM", r=4)),
    "lora-no-task-type": (tiny.gpt2_lm, lambda lib: lib.LoraConfig(target_modules=["c_attn"], lora_dropout=0.1)),
    "lora-seq2seq-t5": (tiny.t5_lm, lambda lib: lib.LoraConfig(task_type="SEQ_2_SEQ_LM")),
    "ia3-causal-llama": (tiny.llama_lm, lambda lib: lib.IA3Config(task_type="CAUSAL_LM")),
    "prompt-causal-llama": (tiny.llama_lm, lambda lib: lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "prompt-seq-cls-bert": (tiny.bert_cls, lambda lib: lib.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)),
    "prompt-seq2seq-t5": (tiny.t5_lm, lambda lib: lib.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)),
    "prefix-causal-llama-gqa": (tiny.llama_lm, lambda lib: lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "prefix-causal-gpt2": (
        tiny.gpt2_lm,
        lambda lib: lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True),
    ),
    "prefix-seq2seq-t5": (tiny.t5_lm, lambda lib: lib.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2)),
    "p-tuning-causal-llama": (tiny.llama_lm, lambda lib: lib.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
}


def saved_config(library: Any, build: Callable[[], Any], config: Any, directory: Path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        library.get_peft_model(build(), config).save_pretrained(str(directory))
    return json.loads((directory / "adapter_config.json").read_text())


def hf_default(config_cls: type, key: str) -> Any:
    """The value HF PEFT's config class has for ``key`` when it is not set."""
    field = {f.name: f for f in dataclasses.fields(config_cls)}[key]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


@pytest.mark.parametrize("case", list(CASES))
def test_saved_config_matches_hf_key_by_key(case: str, tmp_path: Path) -> None:
    build, make = CASES[case]
    ours = saved_config(peftcore, build, make(peftcore), tmp_path / "ours")
    theirs = saved_config(peft, build, make(peft), tmp_path / "theirs")
    hf_class = type(make(peft))
    assert not set(ours) - set(theirs), f"keys HF PEFT does not write: {sorted(set(ours) - set(theirs))}"
    for key in sorted(set(theirs) - VERSION_KEYS):
        if key not in ours:  # an HF feature peftcore lacks: HF writes it switched off
            assert theirs[key] == json.loads(json.dumps(hf_default(hf_class, key))), (key, theirs[key])
        elif key in SET_KEYS and isinstance(theirs[key], list):
            assert set(ours[key]) == set(theirs[key]), (key, ours[key], theirs[key])
        else:
            assert ours[key] == theirs[key], (key, ours[key], theirs[key])
    assert ours["inference_mode"] is True
    # HF PEFT reads the file without a word
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))
    assert not [str(w.message) for w in caught if "Unexpected" in str(w.message)]


def test_prefix_layout_fields_travel_with_the_weights_not_in_hf_keys(tmp_path: Path) -> None:
    config = peftcore.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, attention_module="self_attn", key_module="self_attn.k_proj"
    )
    model = peftcore.get_peft_model(tiny.llama_lm(), config)
    model.save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "attention_module" not in written and "key_module" not in written
    loaded = peftcore.PeftModel.from_pretrained(tiny.llama_lm(), str(tmp_path))
    assert (loaded.peft_config["default"].attention_module, loaded.peft_config["default"].key_module) == (
        "self_attn", "self_attn.k_proj",
    )
    ids = tiny.random_ids(2, 5)
    with torch.no_grad():  # the same tensors in the same layers: bit for bit
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_resolved_defaults_reload_to_the_same_adapter(tmp_path: Path) -> None:
    model = peftcore.get_peft_model(tiny.bert_cls(), peftcore.LoraConfig(task_type="SEQ_CLS", init_lora_weights=False))
    assert model.peft_config["default"].target_modules is None  # the user's config is left as given
    model.save_pretrained(str(tmp_path))
    for library in (peftcore, peft):
        loaded = library.PeftModel.from_pretrained(tiny.bert_cls(), str(tmp_path))
        ids = tiny.random_ids(2, 5)
        with torch.no_grad():
            assert_close_to_scale(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
