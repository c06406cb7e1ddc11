"""Adapter files from newer HF PEFT versions: unknown keys that change nothing load with
a warning naming them; keys that change the computation are refused. HF adapters that
carry their embedding matrices (``save_embedding_layers``) load with ``strict=True``."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from peftcore import AdapterError, LoraConfig, PeftModel, get_peft_model
from tests.integration import tiny

peft = pytest.importorskip("peft")


def out(model: Any) -> torch.Tensor:
    ids = tiny.random_ids(2, 6)
    with torch.no_grad():
        return model(input_ids=ids).logits


def saved(tmp_path: Any) -> tuple[Any, str]:
    model = get_peft_model(tiny.llama_lm(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path))
    return model, str(tmp_path)


def edit_config(directory: str, **changes: Any) -> None:
    path = f"{directory}/adapter_config.json"
    with open(path) as handle:
        data = json.load(handle)
    data.update(changes)
    with open(path, "w") as handle:
        json.dump(data, handle)


def hf_saved(tmp_path: Any, **changes: Any) -> str:
    """An HF PEFT adapter (no peftcore metadata), its config edited as a newer version would write it."""
    hf = peft.get_peft_model(tiny.llama_lm(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    hf.save_pretrained(str(tmp_path))
    edit_config(str(tmp_path), **changes)
    return str(tmp_path)


def test_unknown_keys_at_neutral_values_warn_and_load(tmp_path: Any) -> None:
    directory = hf_saved(tmp_path, future_feature=None, use_future_thing=False, future_options={})
    with pytest.warns(UserWarning, match="future_feature.*future_options.*use_future_thing"):
        loaded = PeftModel.from_pretrained(tiny.llama_lm(), directory)
    hf = peft.PeftModel.from_pretrained(tiny.llama_lm(), directory)
    torch.testing.assert_close(out(loaded), out(hf))


@pytest.mark.parametrize("changes", [{"use_qalora": True}, {"future_feature": True}, {"future_scale": 0.5}])
def test_keys_that_change_the_computation_are_refused(tmp_path: Any, changes: dict) -> None:
    directory = hf_saved(tmp_path, **changes)
    key = next(iter(changes))
    with pytest.raises(AdapterError, match=key):
        PeftModel.from_pretrained(tiny.llama_lm(), directory)


def test_newer_keys_in_a_peftcore_file_too(tmp_path: Any) -> None:
    model, directory = saved(tmp_path)
    edit_config(directory, future_feature=None)
    with pytest.warns(UserWarning):  # the edited config differs from the copy in the weights; both rules apply
        PeftModel.from_pretrained(tiny.llama_lm(), directory)


def test_hf_adapter_with_embedding_layers_loads_strictly(tmp_path: Any) -> None:
    hf = peft.get_peft_model(
        tiny.llama_lm(), peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    )
    with torch.no_grad():  # a base matrix that differs from the fresh model's, as after resizing and training
        hf.base_model.model.model.embed_tokens.base_layer.weight.mul_(1.5)
    hf.save_pretrained(str(tmp_path), save_embedding_layers=True)
    loaded = PeftModel.from_pretrained(tiny.llama_lm(), str(tmp_path))  # strict=True, the default
    torch.testing.assert_close(out(loaded), out(hf.eval()))


def test_embedding_matrix_of_another_shape_is_refused(tmp_path: Any) -> None:
    hf = peft.get_peft_model(tiny.llama_lm(), peft.LoraConfig(r=4, target_modules=["embed_tokens"]))
    hf.save_pretrained(str(tmp_path), save_embedding_layers=True)
    small = tiny.llama_lm()
    small.resize_token_embeddings(tiny.VOCAB + 4)
    with pytest.raises(AdapterError, match="embed_tokens"):
        PeftModel.from_pretrained(small, str(tmp_path))
