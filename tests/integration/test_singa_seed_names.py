"""The seed's names with the seed's signatures (:mod:`peftcore.singa_peft`), on SINGA.

``seed_train_script.py`` is a training script in the shape of SINGA's PEFT example
``examples/train.py`` whose only peftcore line is ``from peftcore.singa_peft import
LinearLoraConfig, get_peft_model``; here it runs on the seed's MLP and CNN shapes, eager and
graph. The registry and tuner tests register a tuner of their own, as a seed user would.
Everything SINGA skips with the reason where ``import singa`` fails; the config tests run
everywhere.
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from peftcore import LoraConfig
from peftcore.config import PeftConfig as CoreConfig
from peftcore.errors import ConfigError, UnknownMethodError
from peftcore.singa_peft import (
    BaseTuner,
    LinearLoraConfig,
    LinearLoraTuner,
    PeftConfig,
    PeftRegistry,
    TunedModel,
    get_peft_model,
)

SCRIPT = Path(__file__).with_name("seed_train_script.py")


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


@pytest.fixture(scope="module")
def script(sg: Any) -> Any:
    spec = importlib.util.spec_from_file_location("seed_train_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_linear_lora_config_takes_the_seeds_positional_order() -> None:
    config = LinearLoraConfig(8, 1, 0.0, ["linear1", "linear2"])
    assert isinstance(config, LoraConfig) and isinstance(config, PeftConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 1, 0.0)
    assert config.target_modules == config.target_layers == ["linear1", "linear2"]
    assert LinearLoraConfig().r == 8 and LinearLoraConfig().lora_alpha == 1  # the seed's defaults
    assert config.to_dict() == LoraConfig(r=8, lora_alpha=1, target_modules=["linear1", "linear2"]).to_dict()
    assert config.replace(r=4).r == 4 and pickle.loads(pickle.dumps(config)) == config
    assert LinearLoraConfig(4, 8, 0.1, ["fc"], use_rslora=True).use_rslora
    with pytest.raises(ConfigError, match="not both"):
        LinearLoraConfig(8, 1, 0.0, ["a"], target_modules=["b"])
    with pytest.raises(ConfigError, match="list of layer names"):
        LinearLoraConfig(8, 1, 0.0, "linear1")


def test_registry_takes_tuners_and_peftcore_configs() -> None:
    assert PeftRegistry.get_tuner("linear_lora") is LinearLoraTuner
    with pytest.raises(UnknownMethodError, match="linear_lora"):
        PeftRegistry.get_tuner("linear_lor")
    with pytest.raises(ConfigError, match="BaseTuner subclass or a peftcore PeftConfig"):
        PeftRegistry.register("nothing")(dict)
    with pytest.raises(TypeError):
        BaseTuner(None)  # type: ignore[abstract]  # inject and merge_weights are abstract

    import peftcore

    @PeftRegistry.register("seed_names_test_method")
    class SeedNamesConfig(CoreConfig):
        pass

    assert peftcore.PeftRegistry.get("seed_names_test_method") is SeedNamesConfig


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("use_graph", [True, False])
def test_seed_train_script_runs_with_only_its_import_changed(script: Any, kind: str, use_graph: bool) -> None:
    """``run`` -> ``peft``: the base trains, then only LoRA trains; merge changes the
    weights and unmerge restores them exactly."""
    from singa import opt, tensor

    snapshots: dict[str, dict[str, np.ndarray]] = {}
    original_peft = script.peft

    def peft(*args: Any, **kwargs: Any) -> Any:
        model = args[5]
        snapshots["pretrained"] = {k: tensor.to_numpy(v).copy() for k, v in model.get_params().items()}
        return original_peft(*args, **kwargs)

    script.peft = peft
    try:
        sgd = opt.SGD(lr=0.01, momentum=0.9, weight_decay=1e-5, dtype=script.singa_dtype["float32"])
        peft_model, merged = script.run(0, 1, 0, 2, 8, kind, "synthetic", None, sgd, use_graph, 0, peft_type="linear_lora")
    finally:
        script.peft = original_peft
    trained = {k: tensor.to_numpy(v).copy() for k, v in peft_model.get_params().items()}
    pretrained = snapshots["pretrained"]
    lora = [name for name in trained if ".lora_" in name]
    assert sorted(lora) == sorted(
        f"{layer}.lora_{ab}.default" for layer in ("linear1", "linear2") for ab in "AB"
    )
    for name, value in trained.items():
        if name in lora:
            assert np.abs(value).max() > 0, f"{name} did not train"
        else:
            np.testing.assert_array_equal(value, pretrained[name], err_msg=f"base tensor {name} changed")
    assert peft_model.peft_config["default"].lora_alpha == 1 and peft_model.peft_config["default"].r == 8
    assert not np.array_equal(merged["linear1.W"], trained["linear1.W"])  # merged in place, then unmerged


def test_a_tuner_of_your_own_runs_through_get_peft_model(sg: Any) -> None:
    """A seed-style tuner (``BaseTuner`` subclass + ``PeftConfig`` subclass) registered with
    ``PeftRegistry.register``: ``get_peft_model`` injects it, training reaches only what it
    left trainable, and ``merge_weights`` reaches the tuner."""
    from singa import device, layer, model, opt, tensor

    class HeadOnlyConfig(PeftConfig):
        def __init__(self, head: str) -> None:
            super().__init__(peft_type="seed_names_head_only")
            self.head = head

    @PeftRegistry.register("seed_names_head_only")
    class HeadOnlyTuner(BaseTuner):
        merges: list = []

        def inject(self, base_model: Any) -> Any:
            self.freeze_base_parameters(base_model)
            for t in getattr(base_model, self.config.head).get_params().values():
                t.requires_grad = t.stores_grad = True
            return base_model

        def merge_weights(self, base_model: Any, mode: bool = True) -> Any:
            self.merges.append(mode)
            return base_model

    class Net(model.Model):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.relu, self.head = layer.Linear(6), layer.ReLU(), layer.Linear(3)
            self.loss = layer.SoftMaxCrossEntropy()

        def forward(self, x: Any) -> Any:
            return self.head(self.relu(self.body(x)))

        def train_one_batch(self, x: Any, y: Any) -> Any:
            out = self.forward(x)
            loss = self.loss(out, y)
            self.optimizer(loss)
            return out, loss

        def set_optimizer(self, optimizer: Any) -> None:
            self.optimizer = optimizer

    dev = device.get_default_device()
    dev.SetRandSeed(0)
    rng = np.random.default_rng(0)
    tx = tensor.Tensor((4, 5), dev, tensor.float32)
    ty = tensor.Tensor((4,), dev, tensor.int32)
    tx.copy_from_numpy(rng.standard_normal((4, 5)).astype(np.float32))
    ty.copy_from_numpy(np.array([0, 1, 2, 1], np.int32))
    net = Net()
    net.set_optimizer(opt.SGD(lr=0.1))
    net.compile([tx], is_train=True, use_graph=False)  # the seed's tuners see initialised layers
    before = {k: tensor.to_numpy(v).copy() for k, v in net.get_params().items()}

    peft_model = get_peft_model(net, HeadOnlyConfig("head"))
    assert isinstance(peft_model, TunedModel) and peft_model.base_model is net
    peft_model.set_optimizer(opt.SGD(lr=0.1))
    peft_model.train()
    peft_model(tx, ty)
    after = {k: tensor.to_numpy(v).copy() for k, v in peft_model.get_params().items()}
    assert sorted(after) == sorted(before)  # no tensor renamed (the seed's wrapper renamed them)
    for name in after:
        changed = not np.array_equal(after[name], before[name])
        assert changed == name.startswith("head."), name
    peft_model.merge_weights(mode=True)
    peft_model.merge_weights(mode=False)
    assert HeadOnlyTuner.merges == [True, False]
