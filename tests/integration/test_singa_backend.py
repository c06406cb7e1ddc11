"""SINGA-specific checks of the singa backend, beyond the shared conformance suite.

Tests that need SINGA skip, with the reason, where it is not importable (SINGA can
never be installed in CI; run them in an environment that has it). Those that check the
plugin's behaviour *without* SINGA run everywhere. The torch <-> SINGA test also needs
torch in the same interpreter.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from peftcore import LoraConfig, get_peft_model
from peftcore.api import PeftModel
from peftcore.graph import LayerNode, ModelGraph
from peftcore.io import read_adapter, save_adapter
from peftcore.testing.numerics import assert_close_to_scale
from peftcore.testing.toys import MLP, TOKEN_MODEL, ToySpec, ToyStep, lora_deltas, reference_forward

BIG_MLP = ToySpec(
    name="mlp-64-256-10",
    steps=(ToyStep("linear", "fc1", 64, 256), ToyStep("relu"), ToyStep("linear", "fc2", 256, 10)),
    input_shape=(16, 64),
)


def _big_mlp_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Weights scaled like a real init (std about 1/sqrt(fan_in)), so outputs are O(1)."""
    return {k: v * np.float32(0.3) for k, v in BIG_MLP.random_weights(rng).items()}


def _toy(spec: ToySpec, weights: dict) -> Any:
    from peftcore_singa.toys import build_toy

    return build_toy(spec, weights)


def _params(model: Any) -> dict[str, np.ndarray]:
    from singa import tensor

    return {name: tensor.to_numpy(t).copy() for name, t in model.get_params().items()}


def _forward(model: Any, inputs: np.ndarray) -> np.ndarray:
    from peftcore_singa.toys import toy_forward

    return toy_forward(model, inputs)


def _fit_tensors(plan: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(s.shape) * 0.1).astype(np.float32) for k, s in plan.tensor_specs().items()}


# -- without SINGA -------------------------------------------------------------------------


def test_plugin_reports_unavailable_when_singa_import_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftcore_singa import plugin

    monkeypatch.setitem(sys.modules, "singa", None)  # makes `import singa` raise ImportError
    runtime = plugin.peftcore_backend()
    info = runtime.info()
    assert not info.available and info.name == "singa"
    assert "singa is not importable" in info.reason and "import of singa halted" in info.reason
    assert runtime.detect(object()) is False


def test_compat_shims_only_fill_missing_names() -> None:
    """In a subprocess, so this process's numpy and collections stay untouched."""
    code = (
        "import collections, warnings, numpy as np\n"
        "warnings.simplefilter('ignore')\n"
        "missing = [n for n, ok in [('collections.Iterable', hasattr(collections, 'Iterable')),"
        " ('numpy.float', hasattr(np, 'float')), ('numpy.int', hasattr(np, 'int'))] if not ok]\n"
        "from peftcore_singa.compat import apply_shims\n"
        "added = apply_shims()\n"
        "assert added == missing, (added, missing)\n"
        "assert apply_shims() == []\n"
        "import collections.abc\n"
        "assert collections.Iterable is collections.abc.Iterable and np.float is float and np.int is int\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backend_info_without_singa_applies_no_shims() -> None:
    code = (
        "import sys, collections, numpy as np\n"
        "sys.modules.pop('singa', None)\n"
        "import importlib.util\n"
        "if importlib.util.find_spec('singa') is not None: sys.exit(0)\n"
        "before = hasattr(collections, 'Iterable')\n"
        "from peftcore_singa.plugin import peftcore_backend\n"
        "info = peftcore_backend().info()\n"
        "assert not info.available and 'No module named' in info.reason, info\n"
        "assert hasattr(collections, 'Iterable') == before\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- with SINGA ----------------------------------------------------------------------------


def test_singa_imports_where_stderr_is_not_a_file(sg: Any) -> None:
    """SINGA's ``__init__`` enables faulthandler, which needs a real stderr: under pytest's
    ``capsys`` or a notebook console ``sys.stderr`` has no file descriptor, and the backend
    must still be available (in a subprocess: this process has imported singa already)."""
    code = (
        "import io, sys\n"
        "sys.stderr = io.StringIO()\n"
        "from peftcore_singa.plugin import peftcore_backend\n"
        "info = peftcore_backend().info()\n"
        "replaced, sys.stderr = sys.stderr, sys.__stderr__\n"
        "assert info.available, info.reason\n"
        "assert isinstance(replaced, io.StringIO)  # given back after the import\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_uninitialised_model_is_planned_at_its_first_forward(sg: Any) -> None:
    from singa import autograd, layer, model, tensor

    from peftcore.errors import UnsupportedLayerError

    class Net(model.Model):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = layer.Linear(8)
            self.fc2 = layer.Linear(3)
            self.unused = layer.Linear(2)  # never reached by forward

        def forward(self, x: Any) -> Any:
            return self.fc2(autograd.relu(self.fc1(x)))

    x = np.ones((2, 5), np.float32)
    pending = get_peft_model(Net(), LoraConfig(target_modules=["fc1"]), backend="singa")
    assert pending.model_graph is None and pending.pending_adapters == ["default"]
    peft = get_peft_model(Net(), LoraConfig(target_modules=["fc1"]), example_inputs=x)
    assert peft.backend.name == "singa"  # detected, not named
    assert peft.model_graph.get("fc1").params["weight"] == (8, 5)
    compiled = Net()
    compiled.compile([tensor.from_numpy(x)], is_train=False)
    peft = get_peft_model(compiled, LoraConfig(target_modules=["fc2"]))  # initialised: no inputs needed
    assert peft.model_graph.get("unused").kind == "other"
    with pytest.raises(UnsupportedLayerError, match="uninitialised"):
        get_peft_model(Net(), LoraConfig(target_modules=["unused"]), example_inputs=x)


@pytest.mark.parametrize("use_graph,steps_before", [(False, 0), (True, 0), (True, 2)])
def test_freezing_really_freezes(sg: Any, use_graph: bool, steps_before: int) -> None:
    """SGD with momentum and weight decay changes only the LoRA tensors, eagerly and in
    graph mode, also when a graph was recorded before the adapter was added."""
    from singa import opt, tensor

    rng = np.random.default_rng(0)
    weights, x = MLP.random_weights(rng), MLP.random_inputs(rng)
    model = _toy(MLP, weights)
    model.set_optimizer(opt.SGD(lr=0.05, momentum=0.9, weight_decay=0.01))
    tx = tensor.from_numpy(x)
    tx.requires_grad = False
    ty = tensor.from_numpy(rng.standard_normal((7, 5)).astype(np.float32))
    model.compile([tx], is_train=True, use_graph=use_graph)
    for _ in range(steps_before):
        model(tx, ty)
    get_peft_model(model, LoraConfig(target_modules=["fc1", "fc2", "head"], r=2, init_lora_weights=False))
    before = _params(model)
    model.train()
    for _ in range(3):
        model(tx, ty)
    after = _params(model)
    for name, value in before.items():
        if ".lora_" in name:
            assert not np.array_equal(value, after[name]), f"{name} was not trained"
        else:
            np.testing.assert_array_equal(value, after[name], err_msg=f"frozen {name} changed")
    assert any(".lora_" in n for n in before) and any(".lora_" not in n for n in before)


def test_lora_dropout_keeps_1_minus_p_and_rescales(sg: Any) -> None:
    from singa import autograd, tensor

    from peftcore_singa.lora import lora_dropout

    x = tensor.from_numpy(np.ones((400, 500), np.float32))
    previous = autograd.training
    try:
        autograd.training = True
        first, second = tensor.to_numpy(lora_dropout(x, 0.3)), tensor.to_numpy(lora_dropout(x, 0.3))
        assert abs((first != 0).mean() - 0.7) < 0.01
        np.testing.assert_allclose(first[first != 0], 1 / 0.7, rtol=1e-6)
        assert not np.array_equal(first, second)  # a new mask each call
        assert lora_dropout(x, 0.0) is x
        autograd.training = False
        assert lora_dropout(x, 0.3) is x
    finally:
        autograd.training = previous


def test_zero_dropout_training_output_equals_eval_output(sg: Any) -> None:
    from singa import autograd, tensor

    from peftcore_singa.describe import to_tensor

    rng = np.random.default_rng(1)
    weights, x = MLP.random_weights(rng), MLP.random_inputs(rng)
    model = _toy(MLP, weights)
    get_peft_model(model, LoraConfig(target_modules=["fc1"], init_lora_weights=False), example_inputs=x)
    eval_out = _forward(model, x)
    autograd.training = True
    train_out = tensor.to_numpy(model.forward(to_tensor(x, model.fc1.base_weight().device)))
    np.testing.assert_array_equal(train_out, eval_out)


def test_get_params_and_states_include_adapter_tensors(sg: Any, tmp_path: Any) -> None:
    rng = np.random.default_rng(2)
    weights, x = MLP.random_weights(rng), MLP.random_inputs(rng)
    model = _toy(MLP, weights)
    peft = get_peft_model(model, LoraConfig(target_modules=["fc1", "block.fc2"], r=3, init_lora_weights=False))
    names = set(model.get_params())
    assert {"fc1.lora_A.default", "fc1.lora_B.default", "block.fc2.lora_A.default", "block.fc2.lora_B.default"} <= names
    assert {"fc1.W", "fc1.b", "block.fc2.W", "head.W", "head.b"} <= names  # base names unchanged
    assert set(model.get_states()) == names
    model.save_states(str(tmp_path / "states.zip"))
    fresh = _toy(MLP, MLP.random_weights(rng))
    get_peft_model(fresh, LoraConfig(target_modules=["fc1", "block.fc2"], r=3))
    fresh.load_states(str(tmp_path / "states.zip"))
    np.testing.assert_array_equal(_forward(fresh, x), _forward(model, x))
    assert peft.get_nb_trainable_parameters()[0] == peft.plans["default"].num_trainable()


def test_lora_on_3d_input_backpropagates(sg: Any) -> None:
    from singa import autograd, tensor

    rng = np.random.default_rng(3)
    model = _toy(MLP, MLP.random_weights(rng))
    get_peft_model(model, LoraConfig(target_modules=["fc1"], r=2, init_lora_weights=False))
    x3 = tensor.from_numpy(rng.standard_normal((2, 3, 12)).astype(np.float32))
    x3.requires_grad = False
    previous = autograd.training
    try:
        autograd.training = True
        y = model.fc1(x3)
        assert y.shape == (2, 3, 16)
        loss = autograd.mse_loss(y, tensor.from_numpy(np.zeros((2, 3, 16), np.float32)))
        grads = {p.name: g.shape for p, g in autograd.backward(loss)}
    finally:
        autograd.training = previous
    assert grads == {"fc1.lora_A.default": (12, 2), "fc1.lora_B.default": (2, 16)}


def test_embedding_lora_trains(sg: Any) -> None:
    from singa import opt, tensor

    rng = np.random.default_rng(4)
    weights, tokens = TOKEN_MODEL.random_weights(rng), TOKEN_MODEL.random_inputs(rng)
    model = _toy(TOKEN_MODEL, weights)
    model.set_optimizer(opt.SGD(lr=0.1))
    peft = get_peft_model(model, LoraConfig(target_modules=["embed"], r=2))
    before = _params(model)
    tx = tensor.from_numpy(tokens)
    tx.requires_grad = False
    model.train()
    model(tx, tensor.from_numpy(np.ones((4, 3), np.float32)))
    after = _params(model)
    # an embedding's A starts at zero and B unit normal (HF PEFT's init), so A moves first
    assert not np.abs(before["embed.lora_A.default"]).any()
    assert not np.array_equal(before["embed.lora_A.default"], after["embed.lora_A.default"])
    np.testing.assert_array_equal(before["embed.W"], after["embed.W"])
    exported = peft.export_adapter("default")
    expected = reference_forward(TOKEN_MODEL, weights, tokens, [lora_deltas(peft.plans["default"], exported)])
    assert_close_to_scale(_forward(model, tokens), expected)


@pytest.mark.parametrize("trans_b,alpha", [(True, 1.0), (False, 0.5)])
def test_gemm_lora_matches_reference_and_merges(sg: Any, trans_b: bool, alpha: float) -> None:
    from singa import layer, model, tensor

    class Net(model.Model):
        def __init__(self) -> None:
            super().__init__()
            self.proj = layer.Gemm(5, alpha=alpha, transB=trans_b)

        def forward(self, x: Any) -> Any:
            return self.proj(x)

    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 9)).astype(np.float32)
    net = Net()
    peft = get_peft_model(net, LoraConfig(target_modules=["proj"], r=3, init_lora_weights=False), example_inputs=x)
    node = peft.model_graph.get("proj")
    assert (node.in_features, node.out_features, node.params["weight"]) == (9, 5, (5, 9))
    w = tensor.to_numpy(net.proj.base_layer.W)
    canonical = w if trans_b else w.T
    bias = tensor.to_numpy(net.proj.base_layer.b).reshape(-1)
    exported = peft.export_adapter("default")
    delta = lora_deltas(peft.plans["default"], exported)["proj"]
    expected = alpha * x @ canonical.T + bias + x @ delta.T
    unmerged = _forward(net, x)
    assert_close_to_scale(unmerged, expected)
    peft.merge_adapter()
    assert_close_to_scale(_forward(net, x), expected)
    peft.unmerge_adapter()
    np.testing.assert_array_equal(_forward(net, x), unmerged)


def test_modules_to_save_with_register_layers(sg: Any, tmp_path: Any) -> None:
    from singa import layer, model, tensor

    class Seq(layer.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.items = [layer.Linear(6), layer.Linear(3)]
            self.register_layers(*self.items)

        def forward(self, x: Any) -> Any:
            for item in self.items:
                x = item(x)
            return x

    class Net(model.Model):
        def __init__(self) -> None:
            super().__init__()
            self.seq = Seq()

        def forward(self, x: Any) -> Any:
            return self.seq(x)

    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    config = LoraConfig(target_modules=["Linear_1"], r=2, init_lora_weights=False, modules_to_save=["Linear_0"])
    net = Net()
    peft = get_peft_model(net, config, example_inputs=x)
    assert [n.path for n in peft.model_graph] == ["seq", "seq.Linear_0", "seq.Linear_1"]
    saved = net.seq.items[0]
    assert type(saved).__name__ == "ModulesToSaveWrapper" and type(net.seq.items[1]).__name__ == "LoraLinear"
    copy_w = saved.modules_to_save["default"].W
    copy_w.copy_from_numpy(rng.standard_normal(copy_w.shape).astype(np.float32))
    expected = _forward(net, x)
    peft.save_pretrained(str(tmp_path))
    files = read_adapter(str(tmp_path))
    assert "base_model.model.seq.Linear_0.weight" in files.tensors  # canonical (out, in)
    assert files.tensors["base_model.model.seq.Linear_0.weight"].shape == (6, 10)
    fresh = Net()
    fresh.compile([tensor.from_numpy(x)], is_train=False)  # initialise, then copy the base weights
    fresh.set_params({k: v for k, v in net.get_params().items() if ".lora_" not in k and "modules_to_save" not in k})
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path), example_inputs=x)
    assert_close_to_scale(_forward(fresh, x), expected)
    plain = loaded.merge_and_unload()
    assert_close_to_scale(_forward(plain, x), expected)
    assert type(plain.seq.items[0]).__name__ == "Linear" and plain.seq.items[0].W.name == "seq.Linear_0.W"


def _graph_of(spec: ToySpec) -> ModelGraph:
    nodes = [
        LayerNode(path=s.name, kind="linear", in_features=s.in_dim, out_features=s.out_dim, has_bias=s.bias,
                  params={"weight": (s.out_dim, s.in_dim), "bias": (s.out_dim,)})
        for s in spec.layers
    ]
    return ModelGraph(layers=tuple(nodes), backend="numpy")


def test_cross_framework_adapter_files(sg: Any, tmp_path: Any) -> None:
    """A framework-neutral adapter (numpy + the core's writer) loads into SINGA, and an
    adapter SINGA trains and saves matches the numpy reference."""
    from singa import opt, tensor

    rng = np.random.default_rng(7)
    weights, x = _big_mlp_weights(rng), BIG_MLP.random_inputs(rng)
    config = LoraConfig(target_modules=["fc1", "fc2"], r=4, lora_alpha=8)
    plan = config.plan(_graph_of(BIG_MLP))
    tensors = _fit_tensors(plan, rng)
    save_adapter(str(tmp_path / "numpy"), config, plan, tensors)
    loaded = PeftModel.from_pretrained(_toy(BIG_MLP, weights), str(tmp_path / "numpy"), example_inputs=x)
    expected = reference_forward(BIG_MLP, weights, x, [lora_deltas(plan, tensors)])
    assert_close_to_scale(_forward(loaded.model, x), expected)

    model = _toy(BIG_MLP, weights)
    peft = get_peft_model(model, LoraConfig(target_modules=["fc1", "fc2"], r=4, lora_alpha=8, init_lora_weights=False))
    model.set_optimizer(opt.SGD(lr=0.01, momentum=0.9))
    tx, ty = tensor.from_numpy(x), tensor.from_numpy(rng.standard_normal((16, 10)).astype(np.float32))
    model.train()
    for _ in range(3):
        model(tx, ty)
    peft.save_pretrained(str(tmp_path / "singa"))
    files = read_adapter(str(tmp_path / "singa"))
    assert files.plan is not None and files.plan.to_dict() == peft.plans["default"].to_dict()
    specs = files.plan.tensor_specs()
    saved = {name: files.tensors["base_model.model." + spec.hf_name] for name, spec in specs.items()}
    expected = reference_forward(BIG_MLP, weights, x, [lora_deltas(files.plan, saved)])
    assert_close_to_scale(_forward(model, x), expected)


def test_torch_and_singa_share_adapters(sg: Any, tmp_path: Any) -> None:
    """The same 64-256-10 MLP in torch and SINGA: an adapter trained in either loads in
    the other with outputs equal within 1e-5."""
    torch = pytest.importorskip("torch", reason="torch is not installed next to SINGA in this interpreter")
    from peftcore_torch.toys import build_toy as build_torch_toy
    from peftcore_torch.toys import toy_forward as torch_forward

    rng = np.random.default_rng(8)
    weights, x = _big_mlp_weights(rng), BIG_MLP.random_inputs(rng)
    y = rng.standard_normal((16, 10)).astype(np.float32)
    config = LoraConfig(target_modules=["fc1", "fc2"], r=4, lora_alpha=8)

    torch_model = build_torch_toy(BIG_MLP, weights)
    torch_peft = get_peft_model(torch_model, config)
    optimizer = torch.optim.SGD([p for p in torch_model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(torch_model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()
    base = reference_forward(BIG_MLP, weights, x)
    assert np.abs(torch_forward(torch_model, x) - base).max() > 1e-3  # training changed the output
    torch_peft.save_pretrained(str(tmp_path / "from_torch"))
    singa_loaded = PeftModel.from_pretrained(_toy(BIG_MLP, weights), str(tmp_path / "from_torch"))
    assert_close_to_scale(_forward(singa_loaded.model, x), torch_forward(torch_model, x))

    from singa import opt, tensor

    singa_model = _toy(BIG_MLP, weights)
    singa_peft = get_peft_model(singa_model, config)
    singa_model.set_optimizer(opt.SGD(lr=0.01))
    singa_model.train()
    for _ in range(3):
        singa_model(tensor.from_numpy(x), tensor.from_numpy(y))
    assert np.abs(_forward(singa_model, x) - base).max() > 1e-3
    singa_peft.save_pretrained(str(tmp_path / "from_singa"))
    torch_loaded = PeftModel.from_pretrained(build_torch_toy(BIG_MLP, weights), str(tmp_path / "from_singa"))
    assert_close_to_scale(torch_forward(torch_loaded.model, x), _forward(singa_model, x))


@pytest.mark.parametrize("use_graph", [False, True])
def test_same_training_in_torch_and_singa_gives_the_same_adapter(sg: Any, tmp_path: Any, use_graph: bool) -> None:
    """User-written twins (the SINGA PEFT example's MLP shape and names): the same
    adapter trained the same way in both frameworks ends up the same, so SINGA's LoRA
    gradients (scaling included) match torch autograd; each trained adapter, saved to
    disk, then loads into the other framework with the same outputs within 1e-5."""
    torch = pytest.importorskip("torch", reason="torch is not installed next to SINGA in this interpreter")
    from singa import autograd, layer, model, opt, tensor

    class SingaMLP(model.Model):
        def __init__(self) -> None:
            super().__init__()
            self.linear1 = layer.Linear(256)
            self.relu = layer.ReLU()
            self.linear2 = layer.Linear(10)

        def forward(self, x: Any) -> Any:
            return self.linear2(self.relu(self.linear1(x)))

        def set_optimizer(self, optimizer: Any) -> None:
            self.optimizer = optimizer

        def train_one_batch(self, x: Any, y: Any) -> Any:
            out = self.forward(x)
            loss = autograd.softmax_cross_entropy(out, y)
            self.optimizer(loss)
            return out, loss

    class TorchMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear1 = torch.nn.Linear(64, 256)
            self.relu = torch.nn.ReLU()
            self.linear2 = torch.nn.Linear(256, 10)

        def forward(self, x: Any) -> Any:
            return self.linear2(self.relu(self.linear1(x)))

    rng = np.random.default_rng(9)
    batches = [(rng.random((32, 64), dtype=np.float32), rng.integers(0, 10, 32).astype(np.int32)) for _ in range(5)]
    x_test = rng.random((20, 64), dtype=np.float32)
    torch.manual_seed(0)
    reference = TorchMLP()
    base = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}

    def torch_twin() -> Any:
        twin = TorchMLP()
        twin.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
        return twin

    def singa_twin() -> Any:
        twin = SingaMLP()
        twin.compile([tensor.from_numpy(batches[0][0])], is_train=True, use_graph=False)
        for name in ("linear1", "linear2"):
            getattr(twin, name).W.copy_from_numpy(np.ascontiguousarray(base[f"{name}.weight"].T))
            getattr(twin, name).b.copy_from_numpy(base[f"{name}.bias"])
        return twin

    def singa_out(twin: Any) -> np.ndarray:
        twin.eval()
        return tensor.to_numpy(twin.forward(tensor.from_numpy(x_test)))

    def torch_out(twin: Any) -> np.ndarray:
        with torch.no_grad():
            return twin(torch.from_numpy(x_test)).numpy()

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["linear1", "linear2"])
    torch_model = torch_twin()
    torch_peft = get_peft_model(torch_model, config)
    torch_peft.save_pretrained(str(tmp_path / "init"))  # the starting adapter both sides train
    singa_model = singa_twin()
    singa_peft = PeftModel.from_pretrained(singa_model, str(tmp_path / "init"), is_trainable=True)

    optimizer = torch.optim.SGD([p for p in torch_model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(torch_model(torch.from_numpy(x)), torch.from_numpy(y).long()).backward()
        optimizer.step()
    singa_model.set_optimizer(opt.SGD(lr=0.05, momentum=0.9))
    tx = tensor.Tensor((32, 64), singa_model.linear1.base_weight().device, tensor.float32)
    ty = tensor.Tensor((32,), tx.device, tensor.int32)
    singa_model.compile([tx], is_train=True, use_graph=use_graph)
    singa_model.train()
    for x, y in batches:
        tx.copy_from_numpy(x)
        ty.copy_from_numpy(y)
        singa_model(tx, ty)

    torch_peft.save_pretrained(str(tmp_path / "torch"))
    singa_peft.save_pretrained(str(tmp_path / "singa"))
    from_torch, from_singa = read_adapter(str(tmp_path / "torch")).tensors, read_adapter(str(tmp_path / "singa")).tensors
    assert set(from_torch) == set(from_singa) and len(from_torch) == 4
    for key, value in from_torch.items():
        assert np.abs(value).max() > 1e-3, f"{key} was not trained"
        assert_close_to_scale(from_singa[key], value, err_msg=key)
    assert_close_to_scale(singa_out(singa_model), torch_out(torch_model))

    torch_in_singa = PeftModel.from_pretrained(singa_twin(), str(tmp_path / "torch"))
    assert_close_to_scale(singa_out(torch_in_singa.model), torch_out(torch_model))
    singa_in_torch = PeftModel.from_pretrained(torch_twin(), str(tmp_path / "singa"))
    assert_close_to_scale(torch_out(singa_in_torch.model), singa_out(singa_model))


def test_unmerge_keeps_edits_made_while_merged(sg: Any) -> None:
    """Issue 15, case 2 on SINGA: an unchanged weight is restored bit for bit; a weight
    edited while merged keeps the edit (the adapters' delta is subtracted, with a warning)."""
    import warnings

    from singa import tensor

    rng = np.random.default_rng(3)
    weights = _big_mlp_weights(rng)
    net = _toy(BIG_MLP, weights)
    x = BIG_MLP.random_inputs(rng)
    peft = get_peft_model(net, LoraConfig(target_modules=["fc1"], r=4, init_lora_weights=False), example_inputs=x)
    layer = net.fc1
    original = tensor.to_numpy(layer.base_layer.W).copy()
    peft.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unchanged weight unmerges exactly, without a warning
        peft.unmerge_adapter()
    np.testing.assert_array_equal(tensor.to_numpy(layer.base_layer.W), original)

    peft.merge_adapter()
    merged = tensor.to_numpy(layer.base_layer.W)
    edit = np.full_like(merged, 0.25)
    layer.base_layer.W.copy_from_numpy(merged + edit)
    with pytest.warns(UserWarning, match="changed while adapters"):
        peft.unmerge_adapter()
    assert_close_to_scale(tensor.to_numpy(layer.base_layer.W), original + edit)


def test_bitfit_unmerge_keeps_edits_made_while_merged(sg: Any) -> None:
    from singa import tensor

    from peftcore import BitFitConfig

    rng = np.random.default_rng(4)
    net = _toy(BIG_MLP, _big_mlp_weights(rng))
    x = BIG_MLP.random_inputs(rng)
    peft = get_peft_model(net, BitFitConfig(target_modules=["fc1"]), example_inputs=x)
    bias_layer = net.fc1
    original = tensor.to_numpy(bias_layer.base_layer.b).copy()
    peft.import_adapter("default", {"fc1.bias": (original + 1.0).astype(np.float32)})
    peft.merge_adapter()
    bias = bias_layer.base_layer.b
    bias.copy_from_numpy(tensor.to_numpy(bias) + np.float32(0.5))
    with pytest.warns(UserWarning, match="changed while adapters"):
        peft.unmerge_adapter()
    assert_close_to_scale(tensor.to_numpy(bias_layer.base_layer.b), original + 0.5)


def test_safe_merge_checks_the_layers_current_dtype(sg: Any) -> None:
    """Issue 15, case 4 on SINGA: safe_merge checks the dtype the layer has now, not the
    one recorded when the model was wrapped: a delta that fits float32 but overflows
    float16 is refused once the weight is float16, and nothing is changed."""
    from singa import tensor

    from peftcore.errors import AdapterError

    rng = np.random.default_rng(6)
    net = _toy(BIG_MLP, _big_mlp_weights(rng))
    x = BIG_MLP.random_inputs(rng)
    peft = get_peft_model(net, LoraConfig(target_modules=["fc1"], r=4, lora_alpha=4), example_inputs=x)
    tensors = peft.export_adapter("default")
    tensors = {k: np.full_like(v, 300.0) for k, v in tensors.items()}  # delta entries 4 * 300 * 300 = 3.6e5
    peft.import_adapter("default", tensors)
    base = net.fc1.base_layer
    half = base.W.as_type(tensor.float16)
    base.__dict__["W"] = half  # the weight is float16 now; the graph still says float32
    assert net.fc1.weight_dtype() == "float16"
    before = tensor.to_numpy(half).copy()
    with pytest.raises(AdapterError, match="float16"):
        peft.merge_adapter(safe_merge=True)
    np.testing.assert_array_equal(tensor.to_numpy(base.W), before)
    assert peft.merged_adapters == []
