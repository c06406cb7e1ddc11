"""``adapter_model.bin``: written on ``save_pretrained(safe_serialization=False)`` as HF
PEFT writes it, read with ``torch.load(weights_only=True)`` under the same checks as
safetensors, and nothing else ever unpickled."""

from __future__ import annotations

import pickle
import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import peftcore  # noqa: E402
from peftcore.errors import AdapterError  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from tests.integration.tiny import llama_lm, random_ids  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def _lora(model):
    config = peftcore.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peftcore.get_peft_model(model, config)


def _logits(model):
    ids = random_ids(2, 5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_safe_serialization_false_writes_a_bin_both_libraries_load(tmp_path):
    ours = _lora(llama_lm())
    expected = _logits(ours)
    ours.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert_close_to_scale(_logits(peft.PeftModel.from_pretrained(llama_lm(), str(tmp_path))), expected)
    assert torch.equal(_logits(peftcore.PeftModel.from_pretrained(llama_lm(), str(tmp_path))), expected)  # the same tensors
    ours.save_pretrained(str(tmp_path))  # safetensors again: the .bin goes, so the two never disagree
    assert (tmp_path / "adapter_model.safetensors").is_file() and not (tmp_path / "adapter_model.bin").exists()


def test_hf_bin_adapter_loads(tmp_path):
    hf = peft.get_peft_model(llama_lm(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    expected = _logits(hf)
    hf.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    assert_close_to_scale(_logits(peftcore.PeftModel.from_pretrained(llama_lm(), str(tmp_path))), expected)


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def _hostile_dirs(tmp_path):
    _lora(llama_lm()).save_pretrained(str(tmp_path / "good"), safe_serialization=False)
    state = torch.load(tmp_path / "good" / "adapter_model.bin", weights_only=True)
    key = next(iter(state))
    variants = {
        "code": lambda path: path.write_bytes(pickle.dumps({key: _Payload()})),
        "list": lambda path: torch.save([state[key]], path),
        "shape": lambda path: torch.save({**state, key: torch.zeros(3, 3)}, path),
        "nan": lambda path: torch.save({**state, key: torch.full_like(state[key], float("nan"))}, path),
        "sparse": lambda path: torch.save({**state, key: state[key].to_sparse()}, path),
    }
    for name, write in variants.items():
        directory = tmp_path / name
        directory.mkdir()
        (directory / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
        write(directory / "adapter_model.bin")
        yield name, directory


def test_hostile_bin_files_are_refused_by_name(tmp_path, capsys):
    messages = {
        "code": "loads safely",
        "list": "expected a dict of tensors",
        "shape": "shape",
        "nan": "finite",
        "sparse": "dense tensor",
    }
    for name, directory in _hostile_dirs(tmp_path):
        with pytest.raises(AdapterError, match=messages[name]):
            peftcore.PeftModel.from_pretrained(llama_lm(), str(directory))
    assert "unpickled!" not in capsys.readouterr().out


@pytest.mark.parametrize("config", [
    lambda: peftcore.PromptEncoderConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    lambda: peftcore.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM", prefix_projection=True),
], ids=["p_tuning-encoder", "prefix-projection"])
def test_a_bin_with_a_training_reparameterisation_reloads_it(config, tmp_path):
    """A .bin holds no plan: its tensors say which to rebuild (the encoder saved beside the
    table means the training plan, so training can go on)."""
    model = peftcore.get_peft_model(llama_lm(), config())
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    expected = _logits(model)
    model.save_pretrained(str(tmp_path), safe_serialization=False)
    loaded = peftcore.PeftModel.from_pretrained(llama_lm(), str(tmp_path), is_trainable=True)
    assert_close_to_scale(_logits(loaded), expected)
    assert loaded.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]
