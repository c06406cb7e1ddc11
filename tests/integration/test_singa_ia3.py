"""(IA)^3 (the third-party plugin in ``examples/peftcore-ia3``) on SINGA: the plugin's
SINGA builder, checked against a numpy computation from the exported vectors, trained,
merged and unmerged, saved and loaded. Skips with the reason where ``import singa`` fails."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peftcore import PeftModel, get_peft_model, get_peft_model_state_dict
from peftcore.testing.numerics import assert_close_to_scale

ia3 = pytest.importorskip("peftcore_ia3", reason="the peftcore-ia3 example plugin is not importable")


def _net() -> Any:
    from singa import autograd, layer, model

    class Net(model.Model):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.relu, self.fc2 = layer.Linear(6), layer.ReLU(), layer.Linear(3)

        def forward(self, x: Any) -> Any:
            return self.fc2(self.relu(self.fc1(x)))

        def train_one_batch(self, x: Any, y: Any) -> Any:
            out = self.forward(x)
            loss = autograd.softmax_cross_entropy(out, y)
            self.optimizer(loss)
            return out, loss

    return Net()


def _run(peft_model: Any, x: np.ndarray) -> np.ndarray:
    from singa import device, tensor

    t = tensor.Tensor(x.shape, device.get_default_device(), requires_grad=False, stores_grad=False)
    t.copy_from_numpy(x)
    peft_model.eval()
    return np.array(tensor.to_numpy(peft_model(t)), copy=True)


def test_ia3_on_singa_scales_trains_merges_and_round_trips(sg: Any, tmp_path: Any) -> None:
    from singa import device, opt, tensor

    device.get_default_device().SetRandSeed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    net = _net()
    config = ia3.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"], init_ia3_weights=False)
    peft_model = get_peft_model(net, config, example_inputs=x)
    assert type(net.fc1).__name__ == "IA3SingaLinear"

    w1, b1 = tensor.to_numpy(net.fc1.base_layer.W), tensor.to_numpy(net.fc1.base_layer.b)  # (in, out)
    w2, b2 = tensor.to_numpy(net.fc2.base_layer.W), tensor.to_numpy(net.fc2.base_layer.b)
    vectors = {k: np.asarray(v) for k, v in get_peft_model_state_dict(peft_model).items()}
    s1 = vectors["base_model.model.fc1.ia3_l"].reshape(-1)  # output scale, (6, 1)
    s2 = vectors["base_model.model.fc2.ia3_l"].reshape(-1)  # feed-forward input scale, (1, 6)
    assert vectors["base_model.model.fc1.ia3_l"].shape == (6, 1) and vectors["base_model.model.fc2.ia3_l"].shape == (1, 6)
    hidden = np.maximum((x @ w1 + b1) * s1, 0)
    expected = (hidden * s2) @ w2 + b2
    out = _run(peft_model, x)
    assert_close_to_scale(out, expected)

    peft_model.merge_adapter()
    assert_close_to_scale(_run(peft_model, x), out)
    peft_model.unmerge_adapter()
    np.testing.assert_array_equal(tensor.to_numpy(net.fc1.base_layer.W), w1)
    np.testing.assert_array_equal(tensor.to_numpy(net.fc1.base_layer.b), b1)

    params = lambda: {k: tensor.to_numpy(v).copy() for k, v in peft_model.get_params().items()}  # noqa: E731
    before = params()
    peft_model.set_optimizer(opt.SGD(lr=0.5))
    peft_model.graph(False)
    peft_model.train()
    tx = tensor.Tensor(x.shape, device.get_default_device())
    tx.copy_from_numpy(x)
    ty = tensor.Tensor((4, 3), device.get_default_device())
    ty.copy_from_numpy(np.eye(3, dtype=np.float32)[[0, 1, 2, 0]])
    for _ in range(3):
        peft_model(tx, ty)
    after = params()
    changed = {k for k in after if not np.array_equal(after[k], before[k])}
    assert changed == {"fc1.ia3_l.default", "fc2.ia3_l.default"}

    trained = _run(peft_model, x)
    peft_model.save_pretrained(tmp_path / "ia3")
    device.get_default_device().SetRandSeed(0)
    loaded = PeftModel.from_pretrained(_net(), tmp_path / "ia3", example_inputs=x)
    assert_close_to_scale(_run(loaded, x), trained)
