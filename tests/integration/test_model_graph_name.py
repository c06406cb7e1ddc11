"""The PeftModel's description of the model is ``model_graph`` on every backend, so
``graph`` is free for the framework: SINGA's ``Model.graph(mode, sequential)`` works on the
SINGA PeftModel, and the old name stays as a deprecated alias only where nothing else
answers to it (a torch model without a ``graph`` of its own)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peftcore import LoraConfig, get_peft_model
from peftcore.graph import ModelGraph


def test_torch_model_graph_and_deprecated_alias() -> None:
    torch = pytest.importorskip("torch")

    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    peft_model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"]), backend="torch")
    assert isinstance(peft_model.model_graph, ModelGraph) and peft_model.model_graph.get("0").kind == "linear"
    with pytest.warns(DeprecationWarning, match="model_graph"):
        assert peft_model.graph is peft_model.model_graph


def test_torch_model_with_its_own_graph_keeps_it() -> None:
    """A ``torch.fx.GraphModule`` has a ``graph``; the PeftModel passes it on, unshadowed."""
    torch = pytest.importorskip("torch")
    import warnings

    net = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)))
    peft_model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"]), backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert peft_model.graph is net.graph


@pytest.fixture(scope="module")
def sg() -> Any:
    from peftcore.errors import BackendError
    from peftcore.plugins import get_plugin_manager

    try:
        get_plugin_manager().get_backend("singa")
    except BackendError as exc:
        pytest.skip(f"peftcore backend 'singa' unavailable: {exc}")
    from peftcore_singa.compat import import_singa

    return import_singa()


def test_singa_graph_method_turns_graph_mode_on_for_the_wrapped_model(sg: Any) -> None:
    """As SINGA's ``char_rnn`` does: ``graph(True, False)`` right after building the model
    (no compile), then train; the steps are recorded once and replayed, only LoRA trains;
    ``graph(False)`` goes back to eager steps."""
    from singa import autograd, device, layer, model, opt, tensor

    class Net(model.Model):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.relu, self.fc2 = layer.Linear(8), layer.ReLU(), layer.Linear(3)

        def forward(self, x: Any) -> Any:
            return self.fc2(self.relu(self.fc1(x)))

        def train_one_batch(self, x: Any, y: Any) -> Any:
            out = self.forward(x)
            loss = autograd.softmax_cross_entropy(out, y)
            self.optimizer(loss)
            return out, loss

    dev = device.get_default_device()
    dev.SetRandSeed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 6)]
    tx, ty = tensor.Tensor(x.shape, dev), tensor.Tensor(labels.shape, dev)
    tx.copy_from_numpy(x)
    ty.copy_from_numpy(labels)

    net = Net()
    peft_model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    peft_model.graph(True, False)
    assert peft_model.graph_mode and net.graph_mode and not net.sequential
    peft_model.set_optimizer(opt.SGD(lr=0.1))
    peft_model.train()
    losses = [float(tensor.to_numpy(peft_model(tx, ty)[1])[0]) for _ in range(8)]
    assert net._buffered  # recorded, then replayed
    assert losses[-1] < losses[0]
    params = {k: tensor.to_numpy(v) for k, v in peft_model.get_params().items()}
    assert {k for k in params if ".lora_" in k} == {f"fc{i}.lora_{ab}.default" for i in (1, 2) for ab in "AB"}
    assert isinstance(peft_model.model_graph, ModelGraph)

    peft_model.graph(False)
    assert not net.graph_mode and not net._buffered  # the recorded graph is dropped
    before = tensor.to_numpy(peft_model.get_params()["fc2.lora_B.default"]).copy()
    peft_model(tx, ty)
    assert not net._buffered and not np.array_equal(before, tensor.to_numpy(peft_model.get_params()["fc2.lora_B.default"]))
