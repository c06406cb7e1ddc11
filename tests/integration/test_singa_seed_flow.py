"""The flow of SINGA's PEFT example (the "seed"), on peftcore's native SINGA PeftModel.

A seed user writes ``peft_model = get_peft_model(model, config)``, then
``peft_model.set_optimizer(sgd)``, ``peft_model.compile([tx], is_train=True, ...)``,
``peft_model(tx, ty, "plain", None)`` (the model's own ``train_one_batch``) and
``peft_model.save_states(path)``. These tests run that flow, with no ``example_inputs``,
on models shaped as the seed's examples (its MLP and its MNIST CNN) and on a small token
classifier for prompt tuning and P-tuning, and a driver that follows ``examples/train.py``'s sequence of
calls with only the import and the config class changed. The models below are written
for these tests; nothing of the seed is imported. Everything skips, with the reason,
where ``import singa`` fails.
"""

from __future__ import annotations

import functools
import pickle
from typing import Any, Callable

import numpy as np
import pytest

import peftcore
from peftcore import LoraConfig, get_peft_model
from peftcore.api import PeftModel
from peftcore.errors import AdapterError
from peftcore.methods.bitfit import BitFitConfig
from peftcore.methods.p_tuning import PromptEncoderConfig
from peftcore.methods.prompt_tuning import PromptTuningConfig
from peftcore.testing.numerics import assert_close_to_scale

ADAPTER_MARKERS = (".lora_", ".bitfit_bias.", ".prompt_embeddings.", ".encoder.")  # .encoder.: P-tuning's


@pytest.fixture(scope="module")
def sg() -> Any:
    """The singa package (shims applied), or skip with the reason the backend is unavailable."""
    from peftcore.errors import BackendError
    from peftcore.plugins import get_plugin_manager

    try:
        get_plugin_manager().get_backend("singa")  # raises, with the reason, when unavailable
    except BackendError as exc:
        pytest.skip(f"peftcore backend 'singa' unavailable: {exc}")
    from peftcore_singa.compat import import_singa

    return import_singa()


@functools.lru_cache(maxsize=None)
def _models() -> dict[str, type]:
    """The test models (built on first use: this module must import without SINGA)."""
    from singa import autograd, layer, model

    class Classifier(model.Model):
        """What the seed's example models share: a softmax cross-entropy step that calls
        the optimizer given to ``set_optimizer``."""

        def __init__(self) -> None:
            super().__init__()
            self.softmax_cross_entropy = layer.SoftMaxCrossEntropy()

        def set_optimizer(self, optimizer: Any) -> None:
            self.optimizer = optimizer

        def train_one_batch(self, x: Any, y: Any, dist_option: str = "plain", spars: Any = None) -> Any:
            logits = self.forward(x)
            loss = self.softmax_cross_entropy(logits, y)
            if dist_option != "plain":
                raise ValueError(f"only dist_option='plain' runs on one device, not {dist_option!r}")
            self.optimizer(loss)
            return logits, loss

    class SeedMLP(Classifier):
        """in -> Linear -> ReLU -> Linear -> classes, layers named as the seed's MLP."""

        def __init__(self, in_features: int = 10, perceptron_size: int = 16, num_classes: int = 10) -> None:
            super().__init__()
            self.dimension = 2
            self.linear1 = layer.Linear(in_features, perceptron_size, bias=True)
            self.relu = layer.ReLU()
            self.linear2 = layer.Linear(perceptron_size, num_classes, bias=True)

        def forward(self, x: Any) -> Any:
            return self.linear2(self.relu(self.linear1(x)))

    class SeedCNN(Classifier):
        """The seed's MNIST CNN shape: two 5x5 conv+ReLU+2x2 max-pool stages (20 and 50
        channels) on 28x28 input, then Linear(500), ReLU, Linear(classes)."""

        def __init__(self, num_classes: int = 10, num_channels: int = 1) -> None:
            super().__init__()
            self.dimension, self.input_size = 4, 28
            self.conv1 = layer.Conv2d(num_channels, 20, 5, padding=0, activation="RELU")
            self.pooling1 = layer.MaxPool2d(2, 2, padding=0)
            self.conv2 = layer.Conv2d(20, 50, 5, padding=0, activation="RELU")
            self.pooling2 = layer.MaxPool2d(2, 2, padding=0)
            self.flatten = layer.Flatten()
            self.linear1 = layer.Linear(500)
            self.relu = layer.ReLU()
            self.linear2 = layer.Linear(num_classes)

        def forward(self, x: Any) -> Any:
            features = self.pooling2(self.conv2(self.pooling1(self.conv1(x))))
            return self.linear2(self.relu(self.linear1(self.flatten(features))))

    class TokenClassifier(Classifier):
        """Token ids -> Embedding -> mean over positions -> Linear: a model prompt tuning
        can adapt (the seed's MLP and CNN have no embedding)."""

        def __init__(self, vocab: int = 30, dim: int = 12, num_classes: int = 4) -> None:
            super().__init__()
            self.embed = layer.Embedding(vocab, dim)
            self.head = layer.Linear(num_classes)

        def forward(self, ids: Any) -> Any:
            return self.head(autograd.reduce_mean(self.embed(ids), axes=[1], keepdims=0))

    classes = {"mlp": SeedMLP, "cnn": SeedCNN, "tokens": TokenClassifier}
    for cls in (Classifier, *classes.values()):  # reachable by name, so instances pickle
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls
    return classes


def _make(kind: str) -> Any:
    if kind == "mlp":
        return _models()["mlp"](in_features=20, perceptron_size=16, num_classes=4)
    if kind == "cnn":
        return _models()["cnn"](num_classes=4, num_channels=1)
    return _models()["tokens"]()


def _batch(kind: str, rng: np.random.Generator, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    if kind == "mlp":
        x = rng.standard_normal((size, 20)).astype(np.float32)
    elif kind == "cnn":
        x = rng.random((size, 1, 28, 28), dtype=np.float32)
    else:
        x = rng.integers(0, 30, (size, 5)).astype(np.int32)
    return x, rng.integers(0, 4, size).astype(np.int32)


def _placeholders(x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
    """Input tensors as the seed creates them: uninitialised, fed with copy_from_numpy."""
    from singa import device, tensor

    dev = device.get_default_device()
    dtype = tensor.int32 if x.dtype == np.int32 else tensor.float32
    return tensor.Tensor(x.shape, dev, dtype), tensor.Tensor(y.shape, dev, tensor.int32)


def _params(model: Any) -> dict[str, np.ndarray]:
    from singa import tensor

    return {name: tensor.to_numpy(t).copy() for name, t in model.get_params().items()}


def _predict(peft_model: Any, x: np.ndarray) -> np.ndarray:
    from singa import tensor

    tx, _ = _placeholders(x, np.zeros(1, np.int32))
    tx.copy_from_numpy(x)
    peft_model.eval()
    return np.array(tensor.to_numpy(peft_model(tx)), copy=True)


def _is_adapter(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


CASES: dict[str, tuple[str, Callable[[], Any], bool]] = {
    "lora-mlp-eager": ("mlp", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["linear1", "linear2"]), False),
    "lora-mlp-graph": ("mlp", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["linear1", "linear2"]), True),
    "lora-cnn-eager": ("cnn", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["linear1", "linear2"]), False),
    "lora-cnn-graph": ("cnn", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["linear1", "linear2"]), True),
    "bitfit-mlp-eager": ("mlp", lambda: BitFitConfig(), False),
    "bitfit-mlp-graph": ("mlp", lambda: BitFitConfig(), True),
    "bitfit-cnn-graph": ("cnn", lambda: BitFitConfig(), True),
    # SINGA's embedding op reads its indices on the host, so a graph cannot record it
    "prompt-tokens-eager": ("tokens", lambda: PromptTuningConfig(num_virtual_tokens=3), False),
    "p-tuning-mlp-tokens-eager": ("tokens", lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8), False),
    "p-tuning-lstm-tokens-eager": (
        "tokens",
        lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type="LSTM", encoder_hidden_size=8),
        False,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_seed_flow_trains_saves_and_loads(sg: Any, tmp_path: Any, case: str) -> None:
    """get_peft_model (no example_inputs) -> compile -> train_one_batch steps ->
    save_states -> load_states into a fresh wrapped model, and save_pretrained ->
    from_pretrained: only adapter tensors train, and the outputs come back identical."""
    from singa import device, model, opt

    kind, make_config, use_graph = CASES[case]
    device.get_default_device().SetRandSeed(0)  # SINGA draws Linear weights here: same start whatever ran before
    rng = np.random.default_rng(0)
    x, y = _batch(kind, rng)

    peft_model = get_peft_model(_make(kind), make_config())
    assert isinstance(peft_model, peftcore.PeftModel) and isinstance(peft_model, model.Model)
    assert peft_model.pending_adapters == ["default"] and peft_model.get_params() == {}
    with pytest.raises(AdapterError, match="not built yet"):
        peft_model.save_pretrained(str(tmp_path / "too-early"))

    tx, ty = _placeholders(x, y)
    # lr 0.05 with momentum 0.9 overshoots on the CNN within six steps; 0.02 descends steadily
    peft_model.set_optimizer(opt.SGD(lr=0.02, momentum=0.9, weight_decay=1e-5))
    peft_model.compile([tx], is_train=True, use_graph=use_graph, sequential=False)
    assert peft_model.pending_adapters == [] and list(peft_model.peft_config) == ["default"]
    names = set(peft_model.get_params())
    adapter_names = {n for n in names if _is_adapter(n)}
    assert adapter_names and names - adapter_names  # both kinds, under the plain model's names
    assert all(not n.startswith("model.") for n in names)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == peft_model.plans["default"].num_trainable() > 0

    before = _params(peft_model)
    peft_model.train()
    losses = []
    for _ in range(6):
        tx.copy_from_numpy(x)
        ty.copy_from_numpy(y)
        _, loss = peft_model(tx, ty, "plain", None)
        losses.append(float(np.asarray(sg.tensor.to_numpy(loss)).reshape(-1)[0]))
    assert losses[-1] < losses[0], losses
    assert int(sg.tensor.to_numpy(peft_model.optimizer.step_counter)[0]) == 6  # one update per step
    after = _params(peft_model)
    for name, value in before.items():
        if _is_adapter(name):
            assert not np.array_equal(value, after[name]), f"adapter tensor {name} did not train"
        else:
            np.testing.assert_array_equal(value, after[name], err_msg=f"base tensor {name} changed")

    x_test = _batch(kind, rng)[0]  # the compiled batch size: SINGA's conv and pooling handles keep theirs
    expected = _predict(peft_model, x_test)
    checkpoint = str(tmp_path / "checkpoint.zip")
    peft_model.save_states(checkpoint)

    fresh = get_peft_model(_make(kind), make_config())
    with pytest.raises(AdapterError, match="compile"):
        fresh.load_states(checkpoint)  # SINGA itself would restore nothing, silently
    fresh.compile([_placeholders(x, y)[0]], is_train=False)
    assert not np.allclose(_predict(fresh, x_test), expected)
    fresh.load_states(checkpoint)
    np.testing.assert_array_equal(_predict(fresh, x_test), expected)

    peft_model.save_pretrained(str(tmp_path / "adapter"))
    base = _make(kind)
    _predict(base, x)  # one forward creates the layers (SINGA's compile cannot take an Embedding)
    base.set_params({k: v for k, v in after.items() if not _is_adapter(k)})
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert isinstance(loaded, model.Model) and not loaded.training
    assert_close_to_scale(_predict(loaded, x_test), expected)


def _seed_train_script(kind: str, use_graph: bool, config_class: type, tmp_path: Any) -> dict[str, Any]:
    """The sequence of calls of the seed's ``examples/train.py`` (``run`` then ``peft``),
    on synthetic data, with peftcore's ``get_peft_model`` and ``config_class``."""
    from singa import device, opt, tensor

    batch_size, max_epoch = 8, 2
    dev = device.get_default_device()
    dev.SetRandSeed(0)
    np.random.seed(0)
    rng = np.random.default_rng(0)
    data = [_batch(kind, rng, batch_size) for _ in range(3)]
    train_x, train_y = np.concatenate([b[0] for b in data]), np.concatenate([b[1] for b in data])
    num_train_batch = train_x.shape[0] // batch_size
    sgd = opt.SGD(lr=0.01, momentum=0.9, weight_decay=1e-5)

    def epochs(net: Any, tx: Any, ty: Any) -> list[float]:
        idx = np.arange(train_x.shape[0], dtype=np.int32)
        losses = []
        for _ in range(max_epoch):
            np.random.shuffle(idx)
            net.train()
            total = 0.0
            for b in range(num_train_batch):
                take = idx[b * batch_size : (b + 1) * batch_size]
                tx.copy_from_numpy(train_x[take])
                ty.copy_from_numpy(train_y[take])
                out, loss = net(tx, ty, "plain", None)
                total += float(tensor.to_numpy(loss)[0])
            losses.append(total)
            net.eval()
            for b in range(num_train_batch):
                tx.copy_from_numpy(train_x[b * batch_size : (b + 1) * batch_size])
                out_test = net(tx)
                assert tensor.to_numpy(out_test).shape == (batch_size, 4)
        return losses

    # run(): train the plain model
    model = _make(kind)
    tx, ty = _placeholders(train_x[:batch_size], train_y[:batch_size])
    model.set_optimizer(sgd)
    model.compile([tx], is_train=True, use_graph=False, sequential=False)
    epochs(model, tx, ty)
    pretrained = _params(model)

    # peft(): new placeholders, wrap, set the optimizer, compile, train, merge and unmerge
    tx, ty = _placeholders(train_x[:batch_size], train_y[:batch_size])
    config = config_class(r=8, lora_alpha=1, lora_dropout=0.0, target_modules=["linear1", "linear2"])
    peft_model = get_peft_model(model, config)
    peft_model.set_optimizer(sgd)
    peft_model.compile([tx], is_train=True, use_graph=use_graph, sequential=False)
    dev.SetVerbosity(0)
    losses = epochs(peft_model, tx, ty)
    trained = _params(peft_model)
    peft_model.merge_weights(mode=True)
    merged = _params(peft_model)
    peft_model.merge_weights(mode=False)
    unmerged = _params(peft_model)
    return {"pretrained": pretrained, "trained": trained, "merged": merged, "unmerged": unmerged, "losses": losses}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("use_graph", [True, False])
def test_seed_train_script_runs_with_only_import_and_config_changed(
    sg: Any, tmp_path: Any, kind: str, use_graph: bool
) -> None:
    result = _seed_train_script(kind, use_graph, LoraConfig, tmp_path)
    pretrained, trained = result["pretrained"], result["trained"]
    for name, value in trained.items():
        if ".lora_" in name:
            assert np.abs(value).max() > 0, f"{name} did not train"
        else:
            np.testing.assert_array_equal(value, pretrained[name], err_msg=f"base tensor {name} changed")
    assert any(".lora_" in n for n in trained)
    assert not np.array_equal(result["merged"]["linear1.W"], trained["linear1.W"])  # merged in place
    for name, value in result["unmerged"].items():
        np.testing.assert_array_equal(value, trained[name], err_msg=f"unmerge did not restore {name}")


def test_wrapping_then_using_the_plain_model_builds_the_adapters(sg: Any) -> None:
    """Adapters wait for the shapes however the model first runs: SINGA's own
    ``model.compile`` on the wrapped model, or a first call without compile."""
    from singa import opt

    rng = np.random.default_rng(1)
    x, y = _batch("mlp", rng)
    config = LoraConfig(r=2, target_modules=["linear1"])

    plain = _make("mlp")
    peft_model = get_peft_model(plain, config)
    tx, ty = _placeholders(x, y)
    plain.set_optimizer(opt.SGD(lr=0.1))
    plain.compile([tx], is_train=True, use_graph=True)  # SINGA's compile, recording the forward
    assert peft_model.pending_adapters == [] and type(plain.linear1).__name__ == "LoraLinear"
    before = _params(plain)
    tx.copy_from_numpy(x)
    ty.copy_from_numpy(y)
    plain(tx, ty, "plain", None)
    after = _params(plain)
    assert not np.array_equal(before["linear1.lora_B.default"], after["linear1.lora_B.default"])
    np.testing.assert_array_equal(before["linear2.W"], after["linear2.W"])  # not targeted, still frozen

    eager = get_peft_model(_make("mlp"), config)
    out = _predict(eager, x)  # first forward, no compile
    assert out.shape == (8, 4) and eager.pending_adapters == [] and "linear1.lora_A.default" in eager.get_params()


def test_pending_model_pickles_and_reports_missing_train_one_batch(sg: Any) -> None:
    from singa import layer, model

    peft_model = get_peft_model(_make("mlp"), LoraConfig(r=2, target_modules=["linear1"]))
    copy = pickle.loads(pickle.dumps(peft_model))
    assert isinstance(copy, model.Model) and copy.pending_adapters == ["default"]
    x, y = _batch("mlp", np.random.default_rng(2))
    copy.compile([_placeholders(x, y)[0]], is_train=False)
    assert "linear1.lora_A.default" in copy.get_params() and peft_model.pending_adapters == ["default"]

    class NoStep(model.Model):
        def __init__(self) -> None:
            super().__init__()
            self.fc = layer.Linear(3)

        def forward(self, x: Any) -> Any:
            return self.fc(x)

    no_step = get_peft_model(NoStep(), LoraConfig(r=2, target_modules=["fc"]))
    tx, ty = _placeholders(x, y)
    no_step.compile([tx], is_train=True)
    with pytest.raises(NotImplementedError, match="train_one_batch"):
        no_step(tx, ty)
