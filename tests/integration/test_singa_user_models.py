"""LoRA on SINGA models shaped as SINGA's own examples, whose layers ``_layers`` misses.

* A transformer encoder in the shape of ``examples/trans`` (written here): its blocks
  in a plain Python list, its projections ``Linear3D`` (3-D input, W ``(in, out)``).
* An MLP imported from ONNX with SINGA's ``sonnx`` (``SONNXModel`` keeps each node's layer
  in its ``__dict__``), the ONNX graph built here with ``onnx.helper``.
* Layers held in a dict: not searched, and the error says what was found and how to
  register them.

Everything skips, with the reason, where ``import singa`` (or, for sonnx, ``onnx``) fails.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import pytest

from peftcore import LoraConfig, PeftModel, get_peft_model
from peftcore.errors import TargetNotFoundError
from peftcore.testing.numerics import assert_close_to_scale


def _models() -> dict[str, type]:
    from singa import autograd, layer, model, tensor

    class Linear3D(layer.Layer):
        """``y = x @ W`` over the last axis of a (batch, seq, in) input, as SINGA's
        transformer example's layer of that name computes it (one matmul per sample)."""

        def __init__(self, out_features: int) -> None:
            super().__init__()
            self.out_features = out_features

        def initialize(self, x: Any) -> None:
            self.W = tensor.Tensor((x.shape[-1], self.out_features), x.device, requires_grad=True, stores_grad=True)
            self.W.gaussian(0.0, 0.3)

        def forward(self, x: Any) -> Any:
            rows = [autograd.unsqueeze(autograd.matmul(autograd.squeeze(x[i]), self.W), axis=[0]) for i in range(x.shape[0])]
            return autograd.cat(rows, axis=0)

        def get_params(self) -> dict:
            return {self.W.name: self.W}

        def set_params(self, parameters: Any) -> None:
            self.W.copy_from(parameters[self.W.name])

    class Attention(layer.Layer):
        """A gated mix of three projections (SINGA's batched 3-D matmul has no usable
        backward); no projection after them, since SINGA's Linear3D passes no gradient to
        its input (``x[i]`` cuts the autograd graph), so nothing before one would train."""

        def __init__(self, dim: int) -> None:
            super().__init__()
            self.W_Q, self.W_K, self.W_V = Linear3D(dim), Linear3D(dim), Linear3D(dim)

        def forward(self, x: Any) -> Any:
            gate = autograd.sigmoid(autograd.add(self.W_Q(x), self.W_K(x)))
            return autograd.add(x, autograd.mul(gate, self.W_V(x)))

    class Encoder(layer.Layer):
        def __init__(self, vocab: int, dim: int, n_layers: int) -> None:
            super().__init__()
            self.embed = layer.Embedding(vocab, dim)
            self.layers = []  # a plain list, as examples/trans keeps its encoder layers
            for _ in range(n_layers):
                self.layers.append(Attention(dim))

        def forward(self, ids: Any) -> Any:
            x = self.embed(ids)
            for block in self.layers:
                x = block(x)
            return x

    class TransClassifier(model.Model):
        def __init__(self, vocab: int = 20, dim: int = 8, n_layers: int = 2, classes: int = 3) -> None:
            super().__init__()
            self.encoder = Encoder(vocab, dim, n_layers)
            self.head = layer.Linear(classes)

        def forward(self, ids: Any) -> Any:
            return self.head(autograd.reduce_mean(self.encoder(ids), axes=[1], keepdims=0))

        def train_one_batch(self, ids: Any, y: Any) -> Any:
            out = self.forward(ids)
            loss = autograd.softmax_cross_entropy(out, y)
            self.optimizer(loss)
            return out, loss

    class DictHeld(model.Model):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = {"first": layer.Linear(4), "second": layer.Linear(2)}

        def forward(self, x: Any) -> Any:
            return self.blocks["second"](self.blocks["first"](x))

    return {"trans": TransClassifier, "dict": DictHeld}


def _tensor(array: np.ndarray) -> Any:
    from singa import device, tensor

    dtype = tensor.int32 if array.dtype.kind in "iu" else tensor.float32
    t = tensor.Tensor(array.shape, device.get_default_device(), dtype, requires_grad=False, stores_grad=False)
    t.copy_from_numpy(array.astype(np.int32 if dtype == tensor.int32 else np.float32))
    return t


def _eval(peft_model: Any, x: np.ndarray) -> np.ndarray:
    from singa import tensor

    peft_model.eval()
    return np.array(tensor.to_numpy(peft_model(_tensor(x))), copy=True)


def _params(model: Any) -> dict[str, np.ndarray]:
    from singa import tensor

    from peftcore_singa.runtime import all_params

    return {f"{t.name}#{i}": tensor.to_numpy(t).copy() for i, t in enumerate(all_params(model))}


def _train(peft_model: Any, x: np.ndarray, y: np.ndarray, steps: int) -> list[float]:
    from singa import opt, tensor

    peft_model.set_optimizer(opt.SGD(lr=0.2))
    peft_model.graph(False)  # eager: SINGA's embedding op reads its ids on the host, which a graph cannot record
    peft_model.train()
    tx, ty = _tensor(x), _tensor(np.eye(3, dtype=np.float32)[y])
    return [float(tensor.to_numpy(peft_model(tx, ty)[1])[0]) for _ in range(steps)]


def test_lora_on_list_held_linear3d_attention(sg: Any, tmp_path: Any) -> None:
    """``target_modules=["W_Q", "W_V"]`` reaches the projections of blocks kept in a plain
    list: they train (the base does not), merge/unmerge and save/load round-trip."""
    from singa import device

    device.get_default_device().SetRandSeed(0)
    rng = np.random.default_rng(0)
    ids, y = rng.integers(0, 20, (4, 5)), rng.integers(0, 3, 4)
    net = _models()["trans"]()
    peft_model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["W_Q", "W_V"]), example_inputs=ids)
    targeted = sorted(n.path for n in peft_model.model_graph if ".lora" not in n.path and n.path.endswith(("W_Q", "W_V")))
    assert targeted == [f"encoder.layers.{i}.{p}" for i in (0, 1) for p in ("W_Q", "W_V")]
    assert peft_model.model_graph.get("encoder.layers.0.W_Q").kind == "linear"
    assert peft_model.model_graph.get("encoder.layers.0.W_Q").params["weight"] == (8, 8)  # canonical (out, in)
    assert type(net.encoder.layers[0].W_Q).__name__ == "LoraLinear"

    before = _params(net)
    losses = _train(peft_model, ids, y, 6)
    assert losses[-1] < losses[0]
    after = _params(net)
    changed = {name.split("#")[0] for name in after if not np.array_equal(after[name], before[name])}
    assert changed and all(".lora_" in name for name in changed), changed
    assert {f"encoder.layers.{i}.{p}.lora_{ab}.default" for i in (0, 1) for p in ("W_Q", "W_V") for ab in "AB"} <= changed

    out = _eval(peft_model, ids)
    peft_model.merge_adapter()
    assert_close_to_scale(_eval(peft_model, ids), out)
    peft_model.unmerge_adapter()
    np.testing.assert_array_equal(_eval(peft_model, ids), out)

    peft_model.save_pretrained(tmp_path / "adapter")
    device.get_default_device().SetRandSeed(0)
    fresh = _models()["trans"]()
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter", example_inputs=ids)
    for i in (0, 1):  # same base weights (same seed), so the adapter's output comes back
        np.testing.assert_array_equal(*(list(_params(m.encoder.layers[i].W_K).values())[0] for m in (fresh, net)))
    assert_close_to_scale(_eval(loaded, ids), out)


def test_layers_held_in_a_dict_are_named_in_the_error(sg: Any) -> None:
    net = _models()["dict"]()
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TargetNotFoundError) as caught:
        get_peft_model(net, LoraConfig(r=2, target_modules=["first"]), example_inputs=x)
    message = str(caught.value)
    assert "blocks['first'] (a dict)" in message and "blocks['second'] (a dict)" in message
    assert "register_layers" in message


@pytest.fixture(scope="module")
def sonnx(sg: Any) -> Any:
    """SINGA's sonnx on onnx 1.15: it imports ``onnx.optimizer`` and calls
    ``onnx.utils.polish_model``, both gone from onnx since 1.9; stand-ins are put in place
    only where missing (the optimizer passes return the model unchanged)."""
    pytest.importorskip("onnx", reason="sonnx needs onnx (1.15 is the release that fits)")
    import onnx
    import onnx.utils

    if not hasattr(onnx, "optimizer") and "onnx.optimizer" not in sys.modules:
        stand_in = types.ModuleType("onnx.optimizer")
        stand_in.optimize = lambda model, passes=None, fixed_point=False: model  # type: ignore[attr-defined]
        sys.modules["onnx.optimizer"] = stand_in
        onnx.optimizer = stand_in
    if not hasattr(onnx.utils, "polish_model"):

        def polish_model(model: Any) -> Any:
            onnx.checker.check_model(model)
            model = onnx.shape_inference.infer_shapes(model)
            onnx.checker.check_model(model)
            return model

        onnx.utils.polish_model = polish_model
    try:
        from singa import sonnx as module
    except Exception as exc:  # an onnx/protobuf pair sonnx cannot use
        pytest.skip(f"singa.sonnx does not import: {type(exc).__name__}: {exc}")
    return module


def _onnx_mlp(rng: np.random.Generator) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    weights = {
        "w1": rng.standard_normal((8, 5)).astype(np.float32) * 0.5, "b1": np.zeros(8, np.float32),
        "w2": rng.standard_normal((3, 8)).astype(np.float32) * 0.5, "b2": np.zeros(3, np.float32),
    }
    nodes = [  # the node names torch.onnx.export gives an nn.Sequential(Linear, ReLU, Linear)
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="/0/Gemm", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="/1/Relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="/2/Gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    onnx_model.ir_version = 6
    return onnx_model, weights


def test_lora_on_a_sonnx_imported_mlp(sonnx: Any) -> None:
    from singa import autograd

    class Imported(sonnx.SONNXModel):
        def forward(self, *inputs: Any) -> Any:
            return super().forward(*inputs)[0]

        def train_one_batch(self, x: Any, y: Any) -> Any:
            out = self.forward(x)
            loss = autograd.softmax_cross_entropy(out, y)
            self.optimizer(loss)
            return out, loss

    rng = np.random.default_rng(0)
    onnx_model, weights = _onnx_mlp(rng)
    x, y = rng.standard_normal((4, 5)).astype(np.float32), rng.integers(0, 3, 4)
    net = Imported(onnx_model)
    assert net._layers == {}  # sonnx registers nothing
    peft_model = get_peft_model(net, LoraConfig(r=2, lora_alpha=2, target_modules=["/0/Gemm", "/2/Gemm"]), example_inputs=x)
    expected = np.maximum(x @ weights["w1"].T, 0) @ weights["w2"].T
    out = _eval(peft_model, x)
    assert_close_to_scale(out, expected)  # B = 0: the base
    assert peft_model.model_graph.get("/0/Gemm").params["weight"] == (8, 5)
    assert type(net.sg_ir.__dict__["/0/Gemm"]).__name__ == "LoraLinear"  # where sonnx's run looks it up

    before = _params(net)
    losses = _train(peft_model, x, y, 8)
    assert losses[-1] < losses[0]
    after = _params(net)
    changed = {name.split("#")[0] for name in after if not np.array_equal(after[name], before[name])}
    assert changed == {f"/{i}/Gemm.lora_{ab}.default" for i in (0, 2) for ab in "AB"}
    trained = _eval(peft_model, x)
    assert not np.allclose(trained, out)
    with peft_model.disable_adapter():
        assert_close_to_scale(_eval(peft_model, x), expected)


def test_lora_on_conv2d_builds_with_hf_peft_shapes(sg: Any) -> None:
    """SINGA's Conv2d takes LoRA (tests/integration/test_singa_lora_conv.py has the rest):
    the plan's op is the convolution form, with HF PEFT's tensor shapes."""
    from singa import layer, model

    class Conv(model.Model):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.flatten, self.fc = layer.Conv2d(2, 3, padding=1), layer.Flatten(), layer.Linear(3)

        def forward(self, x: Any) -> Any:
            return self.fc(self.flatten(self.conv1(x)))

    x = np.zeros((2, 1, 4, 4), np.float32)
    peft_model = get_peft_model(Conv(), LoraConfig(r=2, target_modules=["conv1"]), example_inputs=x)
    (op,) = [op for op in peft_model.plans["default"].ops if op.path == "conv1"]
    assert (op.op, op.kernel_size, op.padding) == ("lora_conv", (3, 3), (1, 1))
    assert {k: v.shape for k, v in op.tensor_specs().items()} == {"lora_A": (2, 1, 3, 3), "lora_B": (2, 2, 1, 1)}


def test_lora_trained_on_a_torch_onnx_export_moves_back_to_the_torch_model(sonnx: Any, tmp_path: Any) -> None:
    """torch model -> ONNX (opset 11) -> sonnx -> LoRA trained on SINGA -> save_pretrained
    -> ``convert(rename={ONNX node: torch path})`` -> ``PeftModel.from_pretrained`` on the
    torch model it came from: the same outputs."""
    torch = pytest.importorskip("torch", reason="the export side needs torch")
    import io
    import warnings

    import onnx
    from singa import autograd

    from peftcore.convert import convert

    class Imported(sonnx.SONNXModel):
        def forward(self, *inputs: Any) -> Any:
            return super().forward(*inputs)[0]

        def train_one_batch(self, x: Any, y: Any) -> Any:
            out = self.forward(x)
            loss = autograd.softmax_cross_entropy(out, y)
            self.optimizer(loss)
            return out, loss

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(4, 5),), buffer, opset_version=11, dynamo=False)
    onnx_model = onnx.load_from_string(buffer.getvalue())
    assert [n.name for n in onnx_model.graph.node] == ["/0/Gemm", "/1/Relu", "/2/Gemm"]

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 5)).astype(np.float32), rng.integers(0, 3, 4)
    imported = Imported(onnx_model)
    peft_model = get_peft_model(
        imported, LoraConfig(r=2, lora_alpha=4, target_modules=["/0/Gemm", "/2/Gemm"]), example_inputs=x
    )
    with torch.no_grad():
        assert_close_to_scale(_eval(peft_model, x), net(torch.from_numpy(x)).numpy())  # the import is the model
    _train(peft_model, x, y, 5)
    trained = _eval(peft_model, x)
    peft_model.save_pretrained(tmp_path / "singa")

    adapter = convert(tmp_path / "singa", tmp_path / "torch", rename={"/0/Gemm": "0", "/2/Gemm": "2"})
    assert sorted(op.path for op in adapter.plan.ops if op.path) == ["0", "2"]
    assert adapter.config.target_modules == ["0", "2"]
    on_torch = PeftModel.from_pretrained(net, tmp_path / "torch")
    with torch.no_grad():
        assert_close_to_scale(on_torch(torch.from_numpy(x)).numpy(), trained)
