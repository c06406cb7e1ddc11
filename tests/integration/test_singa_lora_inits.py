"""PiSSA/OLoRA/orthogonal inits and TIES/DARE merging on the SINGA backend.

Both are written once in the core (numpy over the backend's primitives), so SINGA gets
them with no SINGA-specific maths: these tests check that the wiring holds there (SINGA
stores a Linear's weight ``(in, out)`` and a Gemm's with ``alpha`` and ``transB``).
They skip where SINGA is not importable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peftcore import LoraConfig, get_peft_model
from peftcore.methods.lora_init import olora_factors, pissa_factors
from peftcore.task_merging import combine
from peftcore.testing.numerics import assert_close_to_scale
from peftcore.testing.toys import MLP


def _mlp(rng: np.random.Generator) -> tuple[Any, dict[str, np.ndarray]]:
    from peftcore_singa.toys import build_toy

    weights = {k: v * np.float32(0.3) for k, v in MLP.random_weights(rng).items()}
    return build_toy(MLP, weights), weights


def _forward(model: Any, inputs: np.ndarray) -> np.ndarray:
    from peftcore_singa.toys import toy_forward

    return toy_forward(model, inputs)


def _input(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(MLP.input_shape).astype(np.float32)


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal", "pissa_niter_3"])
def test_init_keeps_the_output(sg: Any, init: str) -> None:
    from singa import tensor

    rng = np.random.default_rng(0)
    model, _ = _mlp(rng)
    x = _input(rng)
    before = _forward(model, x)
    original = tensor.to_numpy(model.fc1.W).copy()  # (in, out)
    peft = get_peft_model(model, LoraConfig(target_modules=["fc1"], r=2, lora_alpha=4, init_lora_weights=init))
    assert_close_to_scale(_forward(model, x), before)
    exported = peft.export_adapter("default")
    a, b = exported["fc1.lora_A"], exported["fc1.lora_B"]
    if init in ("pissa", "olora"):
        expected_a, expected_b = (pissa_factors(original.T, 2, 2.0) if init == "pissa" else olora_factors(original.T, 2))
        assert_close_to_scale(b @ a, expected_b @ expected_a)
        assert_close_to_scale(tensor.to_numpy(model.fc1.base_layer.W), original - 2.0 * (b @ a).T)
    else:
        assert np.abs(a).max() > 0 and np.abs(b).max() > 0


@pytest.mark.parametrize("trans_b,alpha", [(True, 1.0), (False, 0.5)])
def test_pissa_on_a_gemm(sg: Any, trans_b: bool, alpha: float) -> None:
    from singa import layer, model

    class Net(model.Model):
        def __init__(self) -> None:
            super().__init__()
            self.proj = layer.Gemm(5, alpha=alpha, transB=trans_b)

        def forward(self, x: Any) -> Any:
            return self.proj(x)

    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 9)).astype(np.float32)
    net = Net()
    net.compile([__import__("singa").tensor.from_numpy(x)], is_train=False, use_graph=False)
    before = _forward(net, x)
    get_peft_model(net, LoraConfig(target_modules=["proj"], r=2, init_lora_weights="pissa"), example_inputs=x)
    assert_close_to_scale(_forward(net, x), before)


@pytest.mark.parametrize("kind", ["ties", "magnitude_prune_svd", "dare_ties"])
def test_pruned_combinations(sg: Any, kind: str) -> None:
    rng = np.random.default_rng(1)
    model, _ = _mlp(rng)
    peft = get_peft_model(model, LoraConfig(target_modules=["fc1", "fc2"], r=2, init_lora_weights=False))
    peft.add_adapter("b", LoraConfig(target_modules=["fc1", "fc2"], r=2, lora_alpha=4, init_lora_weights=False))
    peft.add_weighted_adapter(["default", "b"], [0.5, 1.5], "m", combination_type=kind, density=0.5)
    mixed = peft.export_adapter("m")
    first, second = peft.export_adapter("default"), peft.export_adapter("b")
    s1, s2 = (0.5 * _op(peft, "default").scaling, 1.5 * _op(peft, "b").scaling)
    if kind == "ties":  # deterministic: the core's rule on the two adapters' factors
        expected = combine("ties", [first["fc1.lora_A"], second["fc1.lora_A"]], [np.sqrt(s1), np.sqrt(s2)], 0.5)
        assert_close_to_scale(mixed["fc1.lora_A"], expected)
    elif kind == "magnitude_prune_svd":  # the pruned weighted deltas, truncated to rank 2
        deltas = [x["fc1.lora_B"] @ x["fc1.lora_A"] * s / w for x, s, w in ((first, s1, 0.5), (second, s2, 1.5))]
        u, sv, vh = np.linalg.svd(combine("magnitude_prune", deltas, [0.5, 1.5], 0.5))
        assert_close_to_scale(mixed["fc1.lora_B"] @ mixed["fc1.lora_A"], (u[:, :2] * sv[:2]) @ vh[:2], rtol=1e-4)
    else:  # random: about half of each factor survives, so the mix is sparse but not empty
        assert 0 < np.count_nonzero(mixed["fc1.lora_A"]) < mixed["fc1.lora_A"].size


def _op(peft: Any, adapter: str) -> Any:
    return next(op for op in peft.plans[adapter].ops if getattr(op, "path", "") == "fc1" and op.op == "lora")
