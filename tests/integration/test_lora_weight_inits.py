"""PiSSA, OLoRA and orthogonal LoRA initialisations, against real HF PEFT.

Each init leaves the model's output unchanged; PiSSA (full SVD) and OLoRA give the same
``B @ A`` and residual base weight as HF PEFT on the same weights; a trained adapter
saved by peftcore loads on the original base model (peftcore and HF PEFT) and gives the
trained outputs; and ``path_initial_model_for_weight_conversion`` saves it as a plain
LoRA that does the same with no change to the base.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from tiny import llama_lm, random_ids, train_steps  # noqa: E402

import peftcore  # noqa: E402
from peftcore.errors import AdapterError, ConfigError  # noqa: E402
from peftcore.methods.lora_init import pissa_factors  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

TARGETS = ["q_proj", "v_proj", "down_proj"]
LAYER = "model.layers.0.self_attn.q_proj"


def _logits(model: Any, ids: Any) -> np.ndarray:
    with torch.no_grad():
        return model(ids).logits.numpy()


def _ours(base: Any, init: Any, r: int = 4, **extra: Any) -> Any:
    config = peftcore.LoraConfig(r=r, lora_alpha=8, init_lora_weights=init, target_modules=TARGETS, **extra)
    return peftcore.get_peft_model(copy.deepcopy(base), config)


def _hf(base: Any, init: Any, r: int = 4) -> Any:
    config = peft.LoraConfig(r=r, lora_alpha=8, init_lora_weights=init, target_modules=TARGETS)
    return peft.get_peft_model(copy.deepcopy(base), config)


def _base_weight(model: Any, path: str = LAYER) -> np.ndarray:
    return dict(model.named_modules())[[n for n, _ in model.named_modules() if n.endswith(path)][0]].base_layer.weight.detach().numpy()


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "orthogonal"])
def test_output_is_unchanged_at_init(init: str) -> None:
    base, ids = llama_lm(), random_ids(2, 8)
    model = _ours(base, init)
    assert_close_to_scale(_logits(model, ids), _logits(base, ids), err_msg=init)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_and_residual_match_hf_peft(init: str) -> None:
    base = llama_lm()
    ours, theirs = _ours(base, init), _hf(base, init)
    tensors = ours.export_adapter("default")
    hf_state = peft.get_peft_model_state_dict(theirs)
    for path in [n for n, _ in base.named_modules() if n.split(".")[-1] in TARGETS]:
        a, b = tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"]
        hf_a = hf_state[f"base_model.model.{path}.lora_A.weight"].numpy()
        hf_b = hf_state[f"base_model.model.{path}.lora_B.weight"].numpy()
        # the factors are unique up to the signs of singular/Q vectors; their product is not
        assert_close_to_scale(b @ a, hf_b @ hf_a, err_msg=path)
        assert_close_to_scale(_base_weight(ours, path), _base_weight(theirs, path), err_msg=path)


def test_pissa_is_the_top_singular_part() -> None:
    rng = np.random.default_rng(0)
    left, _ = np.linalg.qr(rng.standard_normal((12, 9)))
    right, _ = np.linalg.qr(rng.standard_normal((9, 9)))
    weight = (left * 0.5 ** np.arange(9)) @ right  # a decaying spectrum, as trained weights have
    a, b = pissa_factors(weight, 3, 2.0)
    u, s, vh = np.linalg.svd(weight)
    assert_close_to_scale(2.0 * b @ a, (u[:, :3] * s[:3]) @ vh[:3])
    a_fast, b_fast = pissa_factors(weight, 3, 2.0, niter=8, rng=np.random.default_rng(1))
    assert_close_to_scale(2.0 * b_fast @ a_fast, (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-4)


def test_orthogonal_factors_are_orthogonal_and_seeded_by_torch() -> None:
    base = llama_lm()
    torch.manual_seed(3)
    first = _ours(base, "orthogonal", r=6).export_adapter("default")
    torch.manual_seed(3)
    again = _ours(base, "orthogonal", r=6).export_adapter("default")
    a, b = first[f"{LAYER}.lora_A"], first[f"{LAYER}.lora_B"]
    np.testing.assert_array_equal(a, again[f"{LAYER}.lora_A"])
    assert np.abs(b @ a).max() <= 1e-6 * np.abs(a).max() * np.abs(b).max() * a.shape[1]
    assert np.abs(a).max() > 0 and np.abs(b).max() > 0
    singular = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    assert (singular > 1e-5 * singular[0]).sum() == 3  # r/2 random directions mixed by half of Q


def test_bad_inits_are_refused() -> None:
    with pytest.raises(ConfigError, match="init_lora_weights"):
        peftcore.LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(AdapterError, match="even rank"):
        _ours(llama_lm(), "orthogonal", r=3)


def test_pissa_is_refused_over_a_merged_adapter() -> None:
    base, ids = llama_lm(), random_ids(2, 8)
    model = _ours(base, False)
    model.merge_adapter()
    merged = _logits(model, ids)
    with pytest.raises(AdapterError, match="unmerge them"):
        model.add_adapter("p", peftcore.LoraConfig(r=4, init_lora_weights="pissa", target_modules=TARGETS))
    assert "p" not in model.peft_config
    assert_close_to_scale(_logits(model, ids), merged)


def _train(model: Any, steps: int = 4) -> None:
    ids = random_ids(2, 8, seed=5)
    losses = train_steps(model, {"input_ids": ids, "labels": ids}, steps, lr=1e-2, dropout=False)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_adapter_reloads_on_the_original_base(tmp_path: Path, init: str) -> None:
    base, ids = llama_lm(), random_ids(2, 8)
    model = _ours(base, init)
    _train(model)
    trained = _logits(model, ids)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
    ours = peftcore.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert_close_to_scale(_logits(ours, ids), trained, rtol=1e-5)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert_close_to_scale(_logits(theirs, ids), trained, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_to_plain_lora(tmp_path: Path, init: str) -> None:
    base, ids = llama_lm(), random_ids(2, 8)
    model = _ours(base, init)
    model.save_pretrained(tmp_path / "initial")
    _train(model)
    trained = _logits(model, ids)
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (saved["init_lora_weights"], saved["r"], saved["lora_alpha"]) == (True, 8, 16)
    for load in (peftcore.PeftModel.from_pretrained, peft.PeftModel.from_pretrained):
        original = copy.deepcopy(base)
        loaded = load(original, str(tmp_path / "lora"))
        assert_close_to_scale(_logits(loaded, ids), trained, rtol=1e-5, err_msg=load.__qualname__)
        assert_close_to_scale(_base_weight(loaded), dict(base.named_modules())[LAYER].weight.detach().numpy())
    # the live model is untouched by the conversion: it still saves its own PiSSA/OLoRA adapter
    assert_close_to_scale(_logits(model, ids), trained)


def test_conversion_refuses_a_missing_initial_adapter(tmp_path: Path) -> None:
    model = _ours(llama_lm(), "pissa")
    with pytest.raises(AdapterError, match="does not exist"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "nowhere"))
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_hf_peft_adapter_loads_on_the_original_base(tmp_path: Path, init: str) -> None:
    base, ids = llama_lm(), random_ids(2, 8)
    theirs = _hf(base, init)
    _train(theirs)
    trained = _logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    ours = peftcore.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert_close_to_scale(_logits(ours, ids), trained, rtol=1e-5)
