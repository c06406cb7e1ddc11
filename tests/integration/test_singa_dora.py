"""DoRA on the SINGA backend: gradients and training (the conformance suite checks its
outputs, merges and files against the numpy reference).

The gradients SINGA's autograd gives A, B and the magnitude are checked against central
differences of the numpy reference with the weight norm held at its value (DoRA treats
the norm as a constant in training). Skips where SINGA is not importable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peftcore import LoraConfig, get_peft_model
from peftcore.errors import PlanError
from peftcore.methods.lora import MAGNITUDE, dora_weight_norm
from peftcore.testing.numerics import assert_close_to_scale
from peftcore.testing.toys import MLP, TOKEN_MODEL, reference_forward

LAYER = "fc1"


def _reference_loss(weights: dict, inputs: np.ndarray, target: np.ndarray, tensors: dict, scaling: float, norm: np.ndarray) -> float:
    """The MLP's mean squared error with fc1's DoRA weight, its norm fixed at ``norm``."""
    a, b, m = (tensors[f"{LAYER}.{n}"] for n in ("lora_A", "lora_B", MAGNITUDE))
    base = weights[f"{LAYER}.weight"].astype(np.float64)
    adapted = dict(weights, **{f"{LAYER}.weight": (m / norm)[:, None] * (base + scaling * b @ a)})
    out = reference_forward(MLP, adapted, inputs)
    return float(np.mean((out - target) ** 2))


def test_dora_gradients_match_the_reference(sg: Any) -> None:
    from singa import autograd, tensor

    from peftcore_singa.toys import build_toy

    rng = np.random.default_rng(5)
    weights, inputs = MLP.random_weights(rng), MLP.random_inputs(rng)
    model = build_toy(MLP, weights)
    peft = get_peft_model(model, LoraConfig(target_modules=[LAYER], r=2, lora_alpha=3, use_dora=True))
    tensors = {k: v.astype(np.float64) for k, v in peft.export_adapter("default").items()}
    tensors[f"{LAYER}.lora_B"] = rng.standard_normal(tensors[f"{LAYER}.lora_B"].shape) * 0.3
    tensors[f"{LAYER}.{MAGNITUDE}"] *= 1 + 0.3 * rng.random(tensors[f"{LAYER}.{MAGNITUDE}"].shape)
    peft.import_adapter("default", {k: v.astype(np.float32) for k, v in tensors.items()})
    target = rng.standard_normal((MLP.input_shape[0], MLP.layers[-1].out_dim))

    x, t = tensor.from_numpy(inputs), tensor.from_numpy(target.astype(np.float32))
    x.requires_grad = False
    previous = autograd.training
    try:
        autograd.training = True
        loss = autograd.mse_loss(model.forward(x), t)
        grads = {p.name: tensor.to_numpy(g).astype(np.float64) for p, g in autograd.backward(loss)}
    finally:
        autograd.training = previous
    assert set(grads) == {f"{LAYER}.lora_A.default", f"{LAYER}.lora_B.default", f"{LAYER}.{MAGNITUDE}.default"}

    scaling = 3 / 2
    base = weights[f"{LAYER}.weight"].astype(np.float64)
    a, b = tensors[f"{LAYER}.lora_A"], tensors[f"{LAYER}.lora_B"]
    norm = dora_weight_norm(base + scaling * b @ a)
    for name, stored_transposed in (("lora_A", True), ("lora_B", True), (MAGNITUDE, False)):
        key = f"{LAYER}.{name}"
        numeric = np.zeros_like(tensors[key])
        for index in np.ndindex(numeric.shape):
            step = 1e-6
            plus, minus = dict(tensors), dict(tensors)
            plus[key], minus[key] = tensors[key].copy(), tensors[key].copy()
            plus[key][index] += step
            minus[key][index] -= step
            numeric[index] = (
                _reference_loss(weights, inputs, target, plus, scaling, norm)
                - _reference_loss(weights, inputs, target, minus, scaling, norm)
            ) / (2 * step)
        got = grads[f"{key}.default"]
        assert_close_to_scale(got.T if stored_transposed else got, numeric, 1e-3, err_msg=name)


def test_dora_trains_the_magnitude_and_leaves_the_base(sg: Any) -> None:
    from singa import opt, tensor

    from peftcore_singa.toys import build_toy, toy_forward

    rng = np.random.default_rng(6)
    weights, tokens = TOKEN_MODEL.random_weights(rng), TOKEN_MODEL.random_inputs(rng)
    model = build_toy(TOKEN_MODEL, weights)
    model.set_optimizer(opt.SGD(lr=0.05))
    peft = get_peft_model(model, LoraConfig(target_modules=["embed", "proj"], r=2, use_dora=True))
    before = peft.export_adapter("default")
    base_before = toy_forward(model, tokens)
    with peft.disable_adapter():
        assert_close_to_scale(toy_forward(model, tokens), base_before)
    tx, target = tensor.from_numpy(tokens), tensor.from_numpy(np.ones((4, 3), np.float32))
    tx.requires_grad = False
    model.train()
    for _ in range(3):
        model(tx, target)
    model.eval()
    after = peft.export_adapter("default")
    for key in ("embed", "proj"):
        assert not np.array_equal(before[f"{key}.{MAGNITUDE}"], after[f"{key}.{MAGNITUDE}"]), key
    with peft.disable_adapter():
        assert_close_to_scale(toy_forward(model, tokens), base_before)


def test_dora_on_a_gemm_is_refused(sg: Any) -> None:
    from singa import layer
    from singa import model as singa_model

    class GemmNet(singa_model.Model):
        def __init__(self) -> None:
            super().__init__()
            self.proj = layer.Gemm(4)

        def forward(self, x: Any) -> Any:
            return self.proj(x)

    net = GemmNet()
    x = np.ones((2, 3), np.float32)
    with pytest.raises(PlanError, match="DoRA on SINGA takes layer.Linear and layer.Embedding"):
        get_peft_model(net, LoraConfig(target_modules=["proj"], r=2, use_dora=True), example_inputs=x)
    assert type(net.proj).__name__ == "Gemm"  # nothing left half-built
