"""SINGA-specific checks of BitFit and (residual) prompt tuning, beyond the conformance suite.

The suite compares forward outputs with the numpy reference; these tests check what it
cannot: gradients (against finite differences of the float64 reference), SINGA's graph
mode, tensor names in ``get_params``/``get_states``/``save_states``, Gemm and norm
layers, finding the input embedding, and adapters moving between torch and SINGA.
Everything here skips, with the reason, where ``import singa`` fails.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peftcore import get_peft_model
from peftcore.api import PeftModel
from peftcore.errors import PlanError
from peftcore.methods.bitfit import BitFitConfig
from peftcore.methods.prompt_tuning import PromptTuningConfig, ResidualPromptTuningConfig
from peftcore.plugins import get_plugin_manager
from peftcore.testing.numerics import assert_close_to_scale
from peftcore.testing.toys import MLP, TOKEN_MODEL, ToySpec, adapter_effects, reference_forward

RESIDUAL_CONFIGS = {
    "shared-gelu-norm": lambda: ResidualPromptTuningConfig(num_virtual_tokens=3, bottleneck_size=5, activation="gelu"),
    "separate-sigmoid": lambda: ResidualPromptTuningConfig(
        num_virtual_tokens=2, bottleneck_size=4, activation="sigmoid", separate_mlps=True
    ),
    "separate-relu-norm": lambda: ResidualPromptTuningConfig(
        num_virtual_tokens=3, bottleneck_size=4, separate_mlps=True, layer_norm=True
    ),
}


def _toy(spec: ToySpec, weights: dict) -> Any:
    return get_plugin_manager().get_backend("singa").conformance_kit().build(spec, weights)


def _forward(model: Any, inputs: np.ndarray) -> np.ndarray:
    return get_plugin_manager().get_backend("singa").conformance_kit().forward(model, inputs)


def _params(model: Any) -> dict[str, np.ndarray]:
    from singa import tensor

    return {name: tensor.to_numpy(t).copy() for name, t in model.get_params().items()}


def _randomise(peft: PeftModel, rng: np.random.Generator, scale: float = 0.3) -> dict[str, np.ndarray]:
    tensors = {k: (rng.standard_normal(s.shape) * scale).astype(np.float32) for k, s in peft.plans["default"].tensor_specs().items()}
    peft.import_adapter("default", tensors)
    return tensors


def _canonical(name: str) -> str:
    """``embed.prompt_embeddings.default`` -> ``embed.prompt_embeddings``; BitFit's ``bitfit_bias`` -> ``bias``."""
    return name[: -len(".default")].replace(".bitfit_bias", ".bias")


def _singa_gradients(model: Any, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    from singa import autograd, tensor

    from peftcore_singa.describe import model_device, to_tensor

    dev = model_device(model)
    autograd.training = True
    loss = autograd.mse_loss(model.forward(to_tensor(x, dev)), to_tensor(y, dev))
    return {_canonical(p.name): tensor.to_numpy(g).copy() for p, g in autograd.backward(loss)}


def _numeric_gradients(spec: ToySpec, weights: dict, x: np.ndarray, y: np.ndarray, plan: Any, tensors: dict) -> dict:
    """Central differences of the float64 reference's MSE loss in every adapter tensor."""
    values = {k: v.astype(np.float64) for k, v in tensors.items()}

    def loss() -> float:
        out = reference_forward(spec, weights, x, effects=[adapter_effects(plan, values)])
        return float(np.mean((out - y) ** 2))

    grads = {}
    for key, value in values.items():
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            saved = value[index]
            value[index] = saved + 1e-6
            up = loss()
            value[index] = saved - 1e-6
            grad[index] = (up - loss()) / 2e-6
            value[index] = saved
        grads[key] = grad
    return grads


# -- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [MLP, TOKEN_MODEL], ids=lambda s: s.name)
def test_bitfit_gradients_match_finite_differences(sg: Any, spec: ToySpec) -> None:
    rng = np.random.default_rng(10)
    weights, x = spec.random_weights(rng), spec.random_inputs(rng)
    model = _toy(spec, weights)
    peft = get_peft_model(model, BitFitConfig(add_missing_biases=True), example_inputs=x)
    tensors = _randomise(peft, rng)
    y = rng.standard_normal(_forward(model, x).shape)
    got = _singa_gradients(model, x, y)
    expected = _numeric_gradients(spec, weights, x, y, peft.plans["default"], tensors)
    assert set(got) == set(expected)  # the base is frozen: only the biases get gradients
    for key, grad in expected.items():
        assert_close_to_scale(got[key], grad, rtol=0.001, err_msg=key)


@pytest.mark.parametrize("name", ["plain", *RESIDUAL_CONFIGS])
def test_prompt_gradients_match_finite_differences(sg: Any, name: str) -> None:
    """Checks the prepend, batched-linear, exact-GELU and layer-norm backward passes."""
    config = PromptTuningConfig(num_virtual_tokens=3) if name == "plain" else RESIDUAL_CONFIGS[name]()
    rng = np.random.default_rng(11)
    weights, x = TOKEN_MODEL.random_weights(rng), TOKEN_MODEL.random_inputs(rng)
    model = _toy(TOKEN_MODEL, weights)
    peft = get_peft_model(model, config, example_inputs=x)
    tensors = _randomise(peft, rng, scale=0.5)
    y = rng.standard_normal((4, 3))
    got = _singa_gradients(model, x, y)
    expected = _numeric_gradients(TOKEN_MODEL, weights, x, y, peft.plans["default"], tensors)
    assert set(got) == set(expected)
    for key, grad in expected.items():
        assert_close_to_scale(got[key], grad, rtol=0.002, err_msg=key)


# -- graph mode ------------------------------------------------------------------------------------


class Trainer:
    """SGD steps (momentum, weight decay) on a toy model, eagerly or in graph mode; the
    same placeholder tensors every step, as SINGA's graph mode needs.

    Only models without ``layer.Embedding`` can use graph mode: SINGA's embedding op
    copies the indices to the host inside forward, which aborts while a graph records
    (already in ``compile``), so prompt tuning trains eagerly.
    """

    def __init__(self, model: Any, x: np.ndarray, y: np.ndarray, use_graph: bool) -> None:
        from singa import opt

        from peftcore_singa.describe import model_device, to_tensor

        self.model = model
        dev = model_device(model)
        self.inputs = (to_tensor(x, dev), to_tensor(y.astype(np.float32), dev))
        model.set_optimizer(opt.SGD(lr=0.1, momentum=0.9, weight_decay=0.01))
        if use_graph:
            model.compile([self.inputs[0]], is_train=True, use_graph=True)

    def steps(self, count: int) -> None:
        self.model.train()
        for _ in range(count):
            self.model(*self.inputs)


CONFIGS = {
    "bitfit-mlp": (MLP, lambda: BitFitConfig(add_missing_biases=True), True),
    "bitfit-tokens": (TOKEN_MODEL, lambda: BitFitConfig(add_missing_biases=True), False),
    "prompt": (TOKEN_MODEL, lambda: PromptTuningConfig(num_virtual_tokens=2), False),
    "residual": (TOKEN_MODEL, lambda: ResidualPromptTuningConfig(num_virtual_tokens=2, bottleneck_size=3, activation="gelu"), False),
}
CASES = [(m, g, s) for m in sorted(CONFIGS) for g, s in [(False, 0), (True, 0), (True, 2)] if CONFIGS[m][2] or not g]


@pytest.mark.parametrize("method,use_graph,steps_before", CASES)
def test_only_adapter_tensors_train_eagerly_and_in_graph_mode(sg: Any, method: str, use_graph: bool, steps_before: int) -> None:
    """SGD with momentum and weight decay changes exactly the adapter tensors, also when a
    graph was recorded (on the plain model) before the adapter was added; graph-mode
    training gives the same tensors as eager training."""
    spec, make_config, _ = CONFIGS[method]
    rng = np.random.default_rng(12)
    weights, x = spec.random_weights(rng), spec.random_inputs(rng)
    y = rng.standard_normal(reference_forward(spec, weights, x).shape)
    results = []
    for graph in sorted({False, use_graph}):
        model = _toy(spec, weights)
        trainer = Trainer(model, x, y, graph)
        trainer.steps(steps_before)
        peft = get_peft_model(model, make_config())
        _randomise(peft, np.random.default_rng(13))  # the same start in both runs
        before = _params(model)
        trainer.steps(3)
        after = _params(model)
        for name, value in before.items():
            if name.endswith(".default"):
                assert not np.array_equal(value, after[name]), f"{name} was not trained"
            else:
                np.testing.assert_array_equal(value, after[name], err_msg=f"frozen {name} changed")
        results.append(after)
    if len(results) == 2:  # graph replay == eager steps
        for name, value in results[0].items():
            assert_close_to_scale(results[1][name], value, err_msg=name)


def test_baked_prompt_trains_like_a_plain_prompt(sg: Any) -> None:
    """After bake() the model trains exactly as a plain prompt-tuning model whose prompt
    is the baked one: the MLP is gone from the computation, not only from the file."""
    rng = np.random.default_rng(13)
    weights, x = TOKEN_MODEL.random_weights(rng), TOKEN_MODEL.random_inputs(rng)
    y = rng.standard_normal((4, 3))
    model = _toy(TOKEN_MODEL, weights)
    peft = get_peft_model(model, ResidualPromptTuningConfig(num_virtual_tokens=2, bottleneck_size=3, dropout=0.3))
    _randomise(peft, rng)
    Trainer(model, x, y, use_graph=False).steps(2)
    peft.bake()
    assert not any("residual" in name for name in model.get_params())
    baked = _params(model)["embed.prompt_embeddings.default"]
    plain = _toy(TOKEN_MODEL, weights)
    plain_peft = get_peft_model(plain, PromptTuningConfig(num_virtual_tokens=2))
    plain_peft.import_adapter("default", {"embed.prompt_embeddings": baked})
    for trained in (model, plain):
        Trainer(trained, x, y, use_graph=False).steps(2)
    after = _params(model)["embed.prompt_embeddings.default"]
    assert not np.array_equal(after, baked)
    assert_close_to_scale(after, _params(plain)["embed.prompt_embeddings.default"])


def test_switching_bitfit_adapters_rerecords_the_graph(sg: Any) -> None:
    """In graph mode, set_adapter drops the recorded step: the next steps train the newly
    active adapter and leave the other one alone."""
    rng = np.random.default_rng(19)
    weights, x = MLP.random_weights(rng), MLP.random_inputs(rng)
    model = _toy(MLP, weights)
    trainer = Trainer(model, x, rng.standard_normal((7, 5)), use_graph=True)
    peft = get_peft_model(model, BitFitConfig())
    peft.add_adapter("other", BitFitConfig())
    trainer.steps(2)
    first = _params(model)
    peft.set_adapter("other")
    trainer.steps(2)
    second = _params(model)
    for layer_path in ("fc1", "head"):
        default, other = f"{layer_path}.bitfit_bias.default", f"{layer_path}.bitfit_bias.other"
        np.testing.assert_array_equal(second[default], first[default])
        assert not np.array_equal(second[other], first[other])
    trained = {f"{p}.bias": second[f"{p}.bitfit_bias.other"] for p in ("fc1", "head")}
    expected = reference_forward(MLP, weights, x, effects=[adapter_effects(peft.plans["other"], trained)])
    assert_close_to_scale(_forward(model, x), expected)


# -- names and states --------------------------------------------------------------------------------


def test_get_params_and_states_name_the_adapter_tensors(sg: Any, tmp_path: Any) -> None:
    rng = np.random.default_rng(15)
    weights, x = TOKEN_MODEL.random_weights(rng), TOKEN_MODEL.random_inputs(rng)
    model = _toy(TOKEN_MODEL, weights)
    peft = get_peft_model(model, ResidualPromptTuningConfig(num_virtual_tokens=2, bottleneck_size=3), example_inputs=x)
    peft.add_adapter("bias", BitFitConfig(target_modules=["proj"]))
    residual = ["down_weight", "down_bias", "up_weight", "up_bias", "norm_weight", "norm_bias"]
    adapter_names = {"embed.prompt_embeddings.default", "proj.bitfit_bias.bias"} | {f"embed.residual_{n}.default" for n in residual}
    assert set(model.get_params()) == adapter_names | {"embed.W", "proj.W", "proj.b", "head.W", "head.b"}
    assert set(model.get_states()) == set(model.get_params())
    _randomise(peft, rng)
    expected = _forward(model, x)
    model.save_states(str(tmp_path / "states.zip"))
    fresh = _toy(TOKEN_MODEL, weights)
    fresh_peft = get_peft_model(fresh, ResidualPromptTuningConfig(num_virtual_tokens=2, bottleneck_size=3), example_inputs=x)
    fresh_peft.add_adapter("bias", BitFitConfig(target_modules=["proj"]))
    fresh.load_states(str(tmp_path / "states.zip"))
    np.testing.assert_array_equal(_forward(fresh, x), expected)


# -- layers beyond the toys ---------------------------------------------------------------------------


@pytest.mark.parametrize("has_bias", [True, False])
def test_bitfit_on_gemm_honours_beta_and_merges(sg: Any, has_bias: bool) -> None:
    from singa import layer, model, tensor

    class Net(model.Model):
        def __init__(self) -> None:
            super().__init__()
            self.proj = layer.Gemm(5, alpha=0.5, beta=2.0, bias=has_bias)
            self.head = layer.Linear(2)

        def forward(self, x: Any) -> Any:
            return self.head(self.proj(x))

    rng = np.random.default_rng(16)
    x = rng.standard_normal((6, 9)).astype(np.float32)
    net = Net()
    peft = get_peft_model(net, BitFitConfig(target_modules=["proj"], add_missing_biases=True), example_inputs=x)
    assert [op.added for op in peft.plans["default"].ops_of("bitfit_bias")] == [not has_bias]
    trained = _randomise(peft, rng)["proj.bias"]
    w = tensor.to_numpy(net.proj.base_layer.W)
    head_w, head_b = tensor.to_numpy(net.head.W), tensor.to_numpy(net.head.b)
    expected = (0.5 * x @ w.T + 2.0 * trained) @ head_w + head_b
    assert_close_to_scale(_forward(net, x), expected)
    peft.merge_adapter()
    assert_close_to_scale(_forward(net, x), expected)
    assert tensor.to_numpy(net.proj.base_layer.b).shape == (1, 5)
    peft.unmerge_adapter()
    assert (net.proj.base_layer.b is None) == (not has_bias)
    plain = peft.merge_and_unload()
    assert_close_to_scale(_forward(plain, x), expected)
    assert type(plain.proj).__name__ == "Gemm" and plain.proj.b.name == "proj.b"


def test_bitfit_on_a_norm_layer_with_a_bias_attribute(sg: Any) -> None:
    from singa import autograd, layer, model, tensor

    from peftcore_singa.prompt import layer_norm

    class SimpleLayerNorm(layer.Layer):
        def initialize(self, x: Any) -> None:
            self.gamma = tensor.Tensor((x.shape[-1],), x.device, requires_grad=True, stores_grad=True)
            self.gamma.set_value(1.5)
            self.bias = tensor.Tensor((x.shape[-1],), x.device, requires_grad=True, stores_grad=True)
            self.bias.set_value(0.25)

        def forward(self, x: Any) -> Any:
            return autograd.add(autograd.mul(layer_norm(x), self.gamma), self.bias)

        def get_params(self) -> dict:
            return {self.gamma.name: self.gamma, self.bias.name: self.bias}

    class Net(model.Model):
        def __init__(self) -> None:
            super().__init__()
            self.fc = layer.Linear(4, bias=False)
            self.norm = SimpleLayerNorm()

        def forward(self, x: Any) -> Any:
            return self.norm(self.fc(x))

    rng = np.random.default_rng(17)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    net = Net()
    peft = get_peft_model(net, BitFitConfig(), example_inputs=x)
    assert [op.path for op in peft.plans["default"].ops_of("bitfit_bias")] == ["norm"]  # fc has no bias
    base_out = _forward(net, x)
    trained = _randomise(peft, rng)["norm.bias"]
    assert_close_to_scale(_forward(net, x), base_out - 0.25 + trained)
    peft.merge_adapter()
    assert_close_to_scale(tensor.to_numpy(net.norm.base_layer.bias), trained)
    peft.unmerge_adapter()
    np.testing.assert_array_equal(tensor.to_numpy(net.norm.base_layer.bias), np.full(4, 0.25, np.float32))


def test_input_embedding_is_the_first_embedding_forward_calls(sg: Any) -> None:
    from singa import autograd, layer, model

    class Net(model.Model):
        def __init__(self) -> None:
            super().__init__()
            self.segments = layer.Embedding(3, 4)  # registered first, called second
            self.tokens = layer.Embedding(20, 4)
            self.head = layer.Linear(2)

        def forward(self, x: Any) -> Any:
            summed = autograd.add(self.tokens(x), self.segments(x))
            return self.head(autograd.reduce_mean(summed, axes=[1], keepdims=0))

    ids = np.array([[0, 1, 2], [2, 1, 0]])
    peft = get_peft_model(Net(), PromptTuningConfig(num_virtual_tokens=2), example_inputs=ids)
    assert peft.model_graph.input_embedding == "tokens"
    assert [op.path for op in peft.plans["default"].ops_of("prompt_embedding")] == ["tokens"]
    initialised = Net()
    _forward(initialised, ids)  # (compile would abort: SINGA's embedding cannot be graph-recorded)
    with pytest.raises(PlanError, match="embedding_layer"):  # no inputs to find out with
        get_peft_model(initialised, PromptTuningConfig(num_virtual_tokens=2))
    explicit = get_peft_model(initialised, PromptTuningConfig(num_virtual_tokens=2, embedding_layer="tokens"))
    assert explicit.plans["default"].ops_of("prompt_embedding")[0].path == "tokens"


# -- torch <-> SINGA ----------------------------------------------------------------------------------


PORTABLE = {
    "bitfit-mlp": (MLP, lambda: BitFitConfig(add_missing_biases=True)),
    "bitfit-tokens": (TOKEN_MODEL, lambda: BitFitConfig(add_missing_biases=True)),
    "prompt": (TOKEN_MODEL, lambda: PromptTuningConfig(num_virtual_tokens=3)),
    "residual": (TOKEN_MODEL, lambda: ResidualPromptTuningConfig(num_virtual_tokens=3, bottleneck_size=4, activation="gelu")),
    "residual-separate": (
        TOKEN_MODEL,
        lambda: ResidualPromptTuningConfig(num_virtual_tokens=2, bottleneck_size=4, separate_mlps=True, layer_norm=False),
    ),
}


@pytest.mark.parametrize("case", sorted(PORTABLE))
def test_torch_and_singa_share_bitfit_and_prompt_adapters(sg: Any, case: str, tmp_path: Any) -> None:
    """The same toy built by both backends' hooks: an adapter trained in either loads in
    the other with outputs equal within 1e-5."""
    torch = pytest.importorskip("torch", reason="torch is not installed next to SINGA in this interpreter")
    spec, make_config = PORTABLE[case]
    manager = get_plugin_manager()
    torch_backend = manager.get_backend("torch")
    rng = np.random.default_rng(18)
    weights, x = spec.random_weights(rng), spec.random_inputs(rng)
    y = rng.standard_normal(reference_forward(spec, weights, x).shape).astype(np.float32)
    base = reference_forward(spec, weights, x)

    def torch_out(model: Any) -> np.ndarray:
        return torch_backend.conformance_kit().forward(model, x)

    torch_model = torch_backend.conformance_kit().build(spec, weights)
    torch_peft = get_peft_model(torch_model, make_config(), example_inputs=x)
    optimizer = torch.optim.SGD([p for p in torch_model.parameters() if p.requires_grad], lr=0.2)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(torch_model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()
    assert np.abs(torch_out(torch_model) - base).max() > 1e-3  # training changed the output
    torch_peft.save_pretrained(str(tmp_path / "from_torch"))
    singa_loaded = PeftModel.from_pretrained(_toy(spec, weights), str(tmp_path / "from_torch"), example_inputs=x)
    assert singa_loaded.backend.name == "singa"
    assert_close_to_scale(_forward(singa_loaded.model, x), torch_out(torch_model))

    singa_model = _toy(spec, weights)
    singa_peft = get_peft_model(singa_model, make_config(), example_inputs=x)
    Trainer(singa_model, x, y, use_graph=False).steps(3)
    singa_out = _forward(singa_model, x)
    assert np.abs(singa_out - base).max() > 1e-3
    singa_peft.save_pretrained(str(tmp_path / "from_singa"))
    torch_loaded = PeftModel.from_pretrained(
        torch_backend.conformance_kit().build(spec, weights), str(tmp_path / "from_singa")
    )
    assert torch_loaded.backend.name == "torch"
    assert_close_to_scale(torch_out(torch_loaded.model), singa_out)
