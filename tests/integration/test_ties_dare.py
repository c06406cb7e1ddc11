"""``add_weighted_adapter`` with TIES, DARE and magnitude pruning, against real HF PEFT.

The deterministic combinations (TIES, magnitude pruning, and their ``_svd`` forms) are
compared with HF PEFT's on the same two trained-looking adapters; DARE draws its masks on
torch's RNG in HF's order, so with one seed both give the same adapter too. The pruning
rules are also checked on their own: the kept fraction, DARE's rescaling, and the sign
election.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from tiny import llama_lm  # noqa: E402

import peftcore  # noqa: E402
from peftcore.task_merging import combine, magnitude_pruned, majority_sign_mask, randomly_pruned  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

TARGETS = ["q_proj", "v_proj"]


def _two_adapters(make: Any, config_cls: Any) -> Any:
    """``make(model, config)`` with adapters ``a`` and ``b`` given the same random factors on each side."""
    model = make(copy.deepcopy(llama_lm()), config_cls(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    model.add_adapter("b", config_cls(r=4, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def _hf_models() -> tuple[Any, Any]:
    theirs = _two_adapters(peft.get_peft_model, peft.LoraConfig)
    ours = _two_adapters(peftcore.get_peft_model, peftcore.LoraConfig)
    for name, param in theirs.named_parameters():  # both sides hold the same factors
        if "lora_" in name:
            key = name.replace(".weight", "").replace("base_model.model.", "")
            path, factor, adapter = key.rsplit(".", 2)
            ours_param = dict(ours.named_parameters())[f"base_model.model.{path}.{factor}.{adapter}.weight"]
            with torch.no_grad():
                ours_param.copy_(param)
    return ours, theirs


def _hf_deltas(model: Any, adapter: str) -> dict[str, np.ndarray]:
    return {
        name: module.get_delta_weight(adapter).detach().numpy()
        for name, module in model.named_modules()
        if hasattr(module, "get_delta_weight") and adapter in getattr(module, "lora_A", {})
    }


KINDS = ["ties", "magnitude_prune", "ties_svd", "magnitude_prune_svd", "dare_linear", "dare_ties", "dare_ties_svd", "dare_linear_svd"]


@pytest.mark.parametrize(
    "kind, sign_method",
    [(kind, "total") for kind in KINDS] + [(kind, "frequency") for kind in KINDS if "ties" in kind],  # only TIES elects signs
)
def test_matches_hf_peft(kind: str, sign_method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ours, theirs = _hf_models()
    assert all(
        np.allclose(_hf_deltas(ours, a)[k], v) for a in ("default", "b") for k, v in _hf_deltas(theirs, a).items()
    )
    args = dict(adapters=["default", "b"], weights=[0.7, -1.3], adapter_name="m", combination_type=kind,
                density=0.5, majority_sign_method=sign_method)
    # both draw DARE's masks with torch.bernoulli, one per tensor in model order; a generator of
    # their own keeps the adapter inits (which HF runs before the masks, peftcore after) out of it
    draw, masks = torch.bernoulli, torch.Generator()
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: draw(p, generator=masks))
    masks.manual_seed(11)
    theirs.add_weighted_adapter(**args)
    masks.manual_seed(11)
    ours.add_weighted_adapter(**args)
    expected, actual = _hf_deltas(theirs, "m"), _hf_deltas(ours, "m")
    assert sorted(expected) == sorted(actual)
    for key, value in expected.items():
        scale = max(np.abs(value).max(), 1e-12)
        assert np.abs(actual[key] - value).max() <= 1e-4 * scale, (kind, key)


def test_density_is_required_and_checked() -> None:
    ours, _ = _hf_models()
    with pytest.raises(ValueError, match="density"):
        ours.add_weighted_adapter(["default", "b"], [1.0, 1.0], "m", combination_type="ties")
    with pytest.raises(ValueError, match="majority_sign_method"):
        ours.add_weighted_adapter(["default", "b"], [1.0, 1.0], "m", combination_type="ties", density=0.5,
                                  majority_sign_method="median")
    assert "m" not in ours.peft_config


def test_pruning_rules() -> None:
    rng = np.random.default_rng(0)
    tensor = rng.standard_normal((40, 50))
    kept = magnitude_pruned(tensor, 0.2)
    assert np.count_nonzero(kept) == 400
    assert np.abs(kept[kept != 0]).min() >= np.abs(tensor[kept == 0]).max()
    mask_rng = np.random.default_rng(1)
    dropped = randomly_pruned(tensor, 0.25, lambda shape, p: (mask_rng.random(shape) < p).astype(float))
    survivors = dropped != 0
    assert abs(survivors.mean() - 0.25) < 0.03
    np.testing.assert_allclose(dropped[survivors], tensor[survivors] / 0.25)
    stacked = np.array([[1.0, -3.0, 2.0], [-2.0, 1.0, 1.0], [-0.5, 1.0, -4.0]])
    np.testing.assert_array_equal(majority_sign_mask(stacked, "total")[:, 0], [False, True, True])  # sum -1.5
    np.testing.assert_array_equal(majority_sign_mask(stacked, "frequency")[:, 2], [True, True, False])  # 2 of 3 up
    merged = combine("ties", list(stacked), [1.0, 1.0, 1.0], 1.0)
    np.testing.assert_allclose(merged, [-1.25, -3.0, -4.0])  # total: column sums -1.5, -1, -1
