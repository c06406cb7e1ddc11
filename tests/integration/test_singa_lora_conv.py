"""LoRA on SINGA's ``layer.Conv2d`` (a CNN in the shape of SINGA's ``examples/cnn``,
written here), with the canonical tensors of torch's and Hugging Face PEFT's conv LoRA:
outputs equal a torch twin's with the same adapter, adapters move torch -> SINGA -> torch,
merge/unmerge is exact, training lowers the loss and changes only the adapter.

Everything skips, with the reason, where ``import singa`` fails (the torch parts also
where torch is not installed next to SINGA).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peftcore import LoraConfig, PeftModel, get_peft_model
from peftcore.errors import BackendError
from peftcore.testing.numerics import FLOAT32_RTOL, assert_close_to_scale

BATCH, SIDE = 4, 8


def _singa_cnn(stride: int = 2, padding: Any = 1, fused_relu: bool = False) -> Any:
    from singa import autograd, layer, model

    class CNN(model.Model):
        """conv -> relu -> conv (adapted) -> relu -> flatten -> linear, as examples/cnn's."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = layer.Conv2d(4, 3, padding=1, activation="RELU" if fused_relu else "NOTSET")
            self.conv2 = layer.Conv2d(6, 3, stride=stride, padding=padding, activation="RELU" if fused_relu else "NOTSET")
            self.flatten = layer.Flatten()
            self.fc = layer.Linear(5)

        def forward(self, x: Any) -> Any:
            hidden = autograd.relu(self.conv2(autograd.relu(self.conv1(x))))
            return self.fc(self.flatten(hidden))

        def set_optimizer(self, optimizer: Any) -> None:
            self.optimizer = optimizer

        def train_one_batch(self, x: Any, y: Any) -> Any:
            out = self.forward(x)
            loss = autograd.mse_loss(out, y)
            self.optimizer(loss)
            return out, loss

    return CNN()


def _weights(rng: np.random.Generator, flat: int) -> dict[str, np.ndarray]:
    """Canonical (torch-layout) weights of the CNN."""
    shapes = {"conv1.weight": (4, 2, 3, 3), "conv1.bias": (4,), "conv2.weight": (6, 4, 3, 3), "conv2.bias": (6,),
              "fc.weight": (5, flat), "fc.bias": (5,)}
    return {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in shapes.items()}


def _flat(stride: int, padding: int) -> int:
    side = (SIDE + 2 * padding - 3) // stride + 1
    return 6 * side * side


def _built_singa(weights: dict[str, np.ndarray], x: np.ndarray, stride: int = 2, padding: int = 1,
                 fused_relu: bool = False) -> Any:
    from singa import tensor

    net = _singa_cnn(stride, padding, fused_relu)
    net.compile([tensor.from_numpy(x)], is_train=False, use_graph=False)
    for name in ("conv1", "conv2"):
        getattr(net, name).W.copy_from_numpy(weights[f"{name}.weight"])
        getattr(net, name).b.copy_from_numpy(weights[f"{name}.bias"])
    net.fc.W.copy_from_numpy(np.ascontiguousarray(weights["fc.weight"].T))
    net.fc.b.copy_from_numpy(weights["fc.bias"])
    return net


def _torch_twin(weights: dict[str, np.ndarray], stride: int = 2, padding: int = 1) -> Any:
    import torch

    net = torch.nn.Sequential()
    net.add_module("conv1", torch.nn.Conv2d(2, 4, 3, padding=1))
    net.add_module("relu1", torch.nn.ReLU())
    net.add_module("conv2", torch.nn.Conv2d(4, 6, 3, stride=stride, padding=padding))
    net.add_module("relu2", torch.nn.ReLU())
    net.add_module("flatten", torch.nn.Flatten())
    net.add_module("fc", torch.nn.Linear(_flat(stride, padding), 5))
    net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return net.eval()


def _singa_out(net: Any, x: np.ndarray) -> np.ndarray:
    from singa import tensor

    net.eval()
    return tensor.to_numpy(net.forward(tensor.from_numpy(x))).astype(np.float64)


def _torch_out(net: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(x)).double().numpy()


def _setup(seed: int = 0, stride: int = 2, padding: int = 1) -> tuple:
    rng = np.random.default_rng(seed)
    weights = _weights(rng, _flat(stride, padding))
    x = rng.standard_normal((BATCH, 2, SIDE, SIDE)).astype(np.float32)
    return rng, weights, x


CONFIG = {"target_modules": ["conv1", "conv2"], "r": 4, "lora_alpha": 8}


@pytest.mark.parametrize(("stride", "padding"), [(1, 0), (2, 1)])
def test_singa_conv_lora_matches_the_torch_twin(sg: Any, stride: int, padding: int) -> None:
    pytest.importorskip("torch", reason="torch is not installed next to SINGA in this interpreter")
    rng, weights, x = _setup(1, stride, padding)
    singa_peft = get_peft_model(_built_singa(weights, x, stride, padding), LoraConfig(**CONFIG), example_inputs=x)
    torch_peft = get_peft_model(_torch_twin(weights, stride, padding), LoraConfig(**CONFIG))
    specs = singa_peft.plans["default"].tensor_specs()
    assert specs["conv2.lora_A"].shape == (4, 4, 3, 3) and specs["conv2.lora_B"].shape == (6, 4, 1, 1)
    assert specs == torch_peft.plans["default"].tensor_specs()
    tensors = {k: (rng.standard_normal(s.shape) * 0.2).astype(np.float32) for k, s in specs.items()}
    singa_peft.import_adapter("default", tensors)
    torch_peft.import_adapter("default", tensors)
    expected = _torch_out(torch_peft.model, x)
    assert np.abs(expected - _torch_out(_torch_twin(weights, stride, padding), x)).max() > 1e-3
    assert_close_to_scale(_singa_out(singa_peft.model, x), expected, FLOAT32_RTOL)


@pytest.mark.parametrize("fused_relu", [False, True])
def test_merge_unmerge_is_exact(sg: Any, fused_relu: bool) -> None:
    """Also on convs built with ``activation="RELU"`` (examples/cnn's): the adapters'
    change goes before the conv's own ReLU, as merged."""
    from singa import tensor

    rng, weights, x = _setup(2)
    net = _built_singa(weights, x, fused_relu=fused_relu)
    peft_model = get_peft_model(net, LoraConfig(**CONFIG, init_lora_weights=False), example_inputs=x)
    original = tensor.to_numpy(net.conv2.base_layer.W).copy()
    unmerged = _singa_out(net, x)
    for _ in range(3):
        peft_model.merge_adapter()
        assert_close_to_scale(_singa_out(net, x), unmerged, FLOAT32_RTOL)
        peft_model.unmerge_adapter()
    np.testing.assert_array_equal(tensor.to_numpy(net.conv2.base_layer.W), original)
    np.testing.assert_array_equal(_singa_out(net, x), unmerged)
    merged = peft_model.merge_and_unload()
    assert type(merged.conv2).__name__ == "Conv2d"
    assert_close_to_scale(_singa_out(merged, x), unmerged, FLOAT32_RTOL)


@pytest.mark.parametrize("use_graph", [False, True])
def test_training_lowers_the_loss_and_changes_only_the_adapter(sg: Any, use_graph: bool) -> None:
    """Eager, and in graph mode (the factors' convolutions carry a zero bias of their own:
    SINGA's conv op gives a bias-free handle a temporary one, which a replayed graph would
    read after it is freed)."""
    from singa import opt, tensor

    rng, weights, x = _setup(3)
    net = _built_singa(weights, x)
    get_peft_model(net, LoraConfig(**CONFIG, lora_dropout=0.1), example_inputs=x)
    before = {name: tensor.to_numpy(t).copy() for name, t in net.get_params().items()}
    y = rng.standard_normal((BATCH, 5)).astype(np.float32)
    net.set_optimizer(opt.SGD(lr=0.05))
    tx, ty = tensor.from_numpy(x), tensor.from_numpy(y)
    net.compile([tx], is_train=True, use_graph=use_graph)
    net.train()
    losses = [float(tensor.to_numpy(net(tx, ty)[1]).item()) for _ in range(20)]
    assert losses[-1] < 0.9 * losses[0]
    after = {name: tensor.to_numpy(t) for name, t in net.get_params().items()}
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert changed == {f"conv{i}.lora_{ab}.default" for i in (1, 2) for ab in "AB"}


def test_adapters_move_torch_to_singa_and_back(sg: Any, tmp_path: Any) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed next to SINGA in this interpreter")
    from singa import opt, tensor

    rng, weights, x = _setup(4)
    y = rng.standard_normal((BATCH, 5)).astype(np.float32)
    torch_model = _torch_twin(weights)
    torch_peft = get_peft_model(torch_model, LoraConfig(**CONFIG))
    optimizer = torch.optim.SGD([p for p in torch_model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(torch_model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()
    torch_peft.save_pretrained(str(tmp_path / "from_torch"))
    in_singa = PeftModel.from_pretrained(_built_singa(weights, x), str(tmp_path / "from_torch"), example_inputs=x,
                                         is_trainable=True)
    assert_close_to_scale(_singa_out(in_singa.model, x), _torch_out(torch_model, x), FLOAT32_RTOL)

    net = in_singa.model
    net.set_optimizer(opt.SGD(lr=0.05))
    tx, ty = tensor.from_numpy(x), tensor.from_numpy(y)
    net.compile([tx], is_train=True, use_graph=False)
    net.train()
    for _ in range(3):
        net(tx, ty)
    in_singa.save_pretrained(str(tmp_path / "from_singa"))
    back = PeftModel.from_pretrained(_torch_twin(weights), str(tmp_path / "from_singa"))
    assert_close_to_scale(_torch_out(back.model, x), _singa_out(net, x), FLOAT32_RTOL)
    assert np.abs(_torch_out(back.model, x) - _torch_out(torch_model, x)).max() > 1e-4  # SINGA trained it further


def test_another_batch_size_is_refused_before_singa_aborts(sg: Any) -> None:
    from singa import tensor

    _, weights, x = _setup(5)
    net = _built_singa(weights, x)
    get_peft_model(net, LoraConfig(**CONFIG), example_inputs=x)
    net.eval()
    with pytest.raises(BackendError, match=r"'conv1'.*batch 4"):
        net.forward(tensor.from_numpy(np.concatenate([x, x[:1]])))


def test_conv_lora_is_no_longer_listed_as_a_singa_limitation(sg: Any) -> None:
    from peftcore_singa.limitations import LIMITATIONS

    # what stays listed under "lora" is only its two torch-only fields (issue 25, items 5 and 6)
    assert "Conv2d" not in LIMITATIONS.get("lora", "")
    assert LIMITATIONS.get("lora", "").startswith("LoRA's target_parameters and trainable_token_indices")


def test_save_states_round_trips_and_converts_to_a_torch_adapter(sg: Any, tmp_path: Any) -> None:
    """SINGA's own checkpoint holds the conv factors under ``<layer>.lora_A.<adapter>`` in
    canonical layout: ``load_states`` restores them, and ``peftcore convert`` of the zip
    gives an HF-layout adapter a torch twin loads with the same outputs."""
    pytest.importorskip("torch", reason="torch is not installed next to SINGA in this interpreter")
    from peftcore.convert import convert

    rng, weights, x = _setup(6)
    net = _built_singa(weights, x)
    peft_model = get_peft_model(net, LoraConfig(**CONFIG, init_lora_weights=False), example_inputs=x)
    expected = _singa_out(net, x)
    assert {"conv2.lora_A.default", "conv2.lora_B.default"} <= set(net.get_states())
    net.save_states(str(tmp_path / "states.zip"))
    fresh = _built_singa(weights, x)
    get_peft_model(fresh, LoraConfig(**CONFIG), example_inputs=x)
    fresh.load_states(str(tmp_path / "states.zip"))
    np.testing.assert_array_equal(_singa_out(fresh, x), expected)
    convert(tmp_path / "states.zip", tmp_path / "hf", to="hf", config=peft_model.peft_config["default"],
            graph=peft_model.model_graph)
    in_torch = PeftModel.from_pretrained(_torch_twin(weights), str(tmp_path / "hf"))
    assert_close_to_scale(_torch_out(in_torch.model, x), expected, FLOAT32_RTOL)



def _with_weights(net: Any, changes: dict[str, np.ndarray]) -> Any:
    for name, weight in changes.items():
        getattr(net, name).W.copy_from_numpy(weight.astype(np.float32))
    return net


@pytest.mark.parametrize("fused_relu", [False, True])
def test_dora_computes_the_core_s_merged_weights_and_merges_exactly(sg: Any, fused_relu: bool) -> None:
    """DoRA on SINGA's Conv2d: the output at init is the base's; with trained-like tensors
    it is the output of the same CNN whose conv weights are the core's DoRA weights
    (``AddLoraConv.delta(tensors, W)``, which the torch tests hold to HF PEFT's merge);
    merge/unmerge is exact."""
    from singa import tensor

    from peftcore.methods.lora_conv import AddLoraConv

    rng, weights, x = _setup(7)
    net = _built_singa(weights, x, fused_relu=fused_relu)
    base_out = _singa_out(net, x)
    peft_model = get_peft_model(net, LoraConfig(**CONFIG, use_dora=True), example_inputs=x)
    assert_close_to_scale(_singa_out(net, x), base_out, FLOAT32_RTOL)
    specs = peft_model.plans["default"].tensor_specs()
    assert specs["conv2.lora_magnitude_vector"].shape == (1, 6, 1, 1)
    initial = peft_model.export_adapter("default")
    tensors = {k: (rng.standard_normal(s.shape) * 0.2).astype(np.float32) for k, s in specs.items() if "magnitude" not in k}
    for key in specs:
        if "magnitude" in key:  # near the initial norm, as after training
            tensors[key] = (initial[key] * rng.uniform(0.7, 1.3, initial[key].shape)).astype(np.float32)
    peft_model.import_adapter("default", tensors)
    ops = {op.path: op for op in peft_model.plans["default"].ops if isinstance(op, AddLoraConv)}
    merged_weights = {}
    for name, op in ops.items():
        own = {k.split(".", 1)[1]: v.astype(np.float64) for k, v in tensors.items() if k.startswith(name + ".")}
        weight = weights[f"{name}.weight"].astype(np.float64)
        merged_weights[name] = weight + op.delta(own, weight)
    expected = _singa_out(_with_weights(_built_singa(weights, x, fused_relu=fused_relu), merged_weights), x)
    unmerged = _singa_out(net, x)
    assert np.abs(unmerged - base_out).max() > 1e-3
    assert_close_to_scale(unmerged, expected, FLOAT32_RTOL)

    original = tensor.to_numpy(net.conv2.base_layer.W).copy()
    for _ in range(3):
        peft_model.merge_adapter()
        assert_close_to_scale(tensor.to_numpy(net.conv2.base_layer.W), merged_weights["conv2"], FLOAT32_RTOL)
        assert_close_to_scale(_singa_out(net, x), unmerged, FLOAT32_RTOL)
        peft_model.unmerge_adapter()
    np.testing.assert_array_equal(tensor.to_numpy(net.conv2.base_layer.W), original)
    np.testing.assert_array_equal(_singa_out(net, x), unmerged)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_training_lowers_the_loss_and_changes_only_the_adapter(sg: Any, dropout: float) -> None:
    from singa import opt, tensor

    rng, weights, x = _setup(8)
    net = _built_singa(weights, x)
    get_peft_model(net, LoraConfig(**CONFIG, use_dora=True, lora_dropout=dropout), example_inputs=x)
    before = {name: tensor.to_numpy(t).copy() for name, t in net.get_params().items()}
    y = rng.standard_normal((BATCH, 5)).astype(np.float32)
    net.set_optimizer(opt.SGD(lr=0.05))
    tx, ty = tensor.from_numpy(x), tensor.from_numpy(y)
    net.train()  # eager (compiled so by _built_singa): DoRA's norm is read on the host each step
    losses = [float(tensor.to_numpy(net(tx, ty)[1]).item()) for _ in range(20)]
    assert losses[-1] < 0.9 * losses[0]
    after = {name: tensor.to_numpy(t) for name, t in net.get_params().items()}
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert changed == {f"conv{i}.{part}.default" for i in (1, 2) for part in ("lora_A", "lora_B", "lora_magnitude_vector")}


def test_compiling_a_dora_model_is_refused_instead_of_aborting(sg: Any) -> None:
    """``model.compile`` records the forward as a graph, where the host-side norm cannot
    read the weights (SINGA would abort the process)."""
    from singa import tensor

    _, weights, x = _setup(10)
    net = _built_singa(weights, x)
    get_peft_model(net, LoraConfig(**CONFIG, use_dora=True), example_inputs=x)
    tx = tensor.from_numpy(x)
    with pytest.raises(BackendError, match="while SINGA records a graph"):
        net.compile([tx], is_train=True, use_graph=False)
    tx.device.EnableGraph(False)
    tx.device.ResetGraph()
    net.eval()
    assert np.isfinite(_singa_out(net, x)).all()  # still runs eagerly


def test_dora_adapters_move_torch_to_singa(sg: Any, tmp_path: Any) -> None:
    pytest.importorskip("torch", reason="torch is not installed next to SINGA in this interpreter")
    rng, weights, x = _setup(9)
    torch_peft = get_peft_model(_torch_twin(weights), LoraConfig(**CONFIG, use_dora=True))
    specs = torch_peft.plans["default"].tensor_specs()
    tensors = {k: (rng.standard_normal(s.shape) * 0.2).astype(np.float32) for k, s in specs.items() if "magnitude" not in k}
    initial = torch_peft.export_adapter("default")
    tensors.update({k: initial[k] * 1.2 for k in specs if "magnitude" in k})
    torch_peft.import_adapter("default", tensors)
    torch_peft.save_pretrained(str(tmp_path / "from_torch"))
    in_singa = PeftModel.from_pretrained(_built_singa(weights, x), str(tmp_path / "from_torch"), example_inputs=x)
    assert_close_to_scale(_singa_out(in_singa.model, x), _torch_out(torch_peft.model, x), FLOAT32_RTOL)
