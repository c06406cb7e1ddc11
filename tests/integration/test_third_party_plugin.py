"""A real third-party plugin package: ``peftcore-ia3`` (examples/peftcore-ia3).

It adds (IA)^3 to peftcore only through the ``peftcore`` entry-point group. We check
that it is discovered like a first-party plugin, that it imports without torch, that
its config validates and plans, and that on a small torch MLP and tiny transformers
models (built locally, random weights, nothing downloaded) it starts as the identity,
trains, merges and unmerges exactly, saves and loads, and shares adapter files with
Hugging Face PEFT in both directions.

Install it first: ``pip install -e examples/peftcore-ia3 --no-deps``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import pytest

from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402


def _ia3_entry_point() -> Any:
    eps = metadata.entry_points()
    group = eps.select(group="peftcore") if hasattr(eps, "select") else eps.get("peftcore", [])  # Python 3.9
    return next((ep for ep in group if ep.name == "ia3"), None)


if _ia3_entry_point() is None:
    pytest.skip(
        "peftcore-ia3 is not installed (no 'ia3' entry point in the 'peftcore' group); "
        "run `pip install -e examples/peftcore-ia3 --no-deps`",
        allow_module_level=True,
    )
if "ia3" in {name.strip() for name in os.environ.get("PEFTCORE_DISABLED_PLUGINS", "").split(",")}:
    pytest.skip("the 'ia3' plugin is disabled by PEFTCORE_DISABLED_PLUGINS", allow_module_level=True)

import peftcore  # noqa: E402
from peftcore import ConfigError, PeftModel, PeftRegistry, RewritePlan, get_peft_model  # noqa: E402
from peftcore.errors import AdapterError, TargetNotFoundError, UnsupportedLayerError  # noqa: E402
from peftcore.graph import LayerNode, ModelGraph  # noqa: E402
from peftcore.plugins import get_plugin_manager  # noqa: E402
from peftcore_ia3 import IA3Config, IA3Scale  # noqa: E402

try:
    import torch
    from torch import nn
except ImportError:  # the discovery and planning tests still run
    torch = None  # type: ignore[assignment]

try:
    import peft
    import transformers
except ImportError:
    peft = transformers = None  # type: ignore[assignment]

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
needs_hf = pytest.mark.skipif(
    torch is None or peft is None, reason="torch, transformers and peft are needed for the HF models"
)
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

VOCAB = 60


# -- discovery ------------------------------------------------------------------------------
def test_entry_point_points_at_the_plugin_module() -> None:
    assert _ia3_entry_point().value == "peftcore_ia3.plugin"


def test_registry_finds_the_method_through_the_entry_point() -> None:
    assert PeftRegistry.get("ia3") is IA3Config
    assert PeftRegistry.get("IA3") is IA3Config  # HF peft_type
    assert "ia3" in PeftRegistry.names()
    manager = get_plugin_manager()
    assert manager.pm.get_plugin("ia3") is not None
    assert "ia3" not in [f.name for f in manager.failures]
    assert "ia3" not in manager.backends()  # an extension plugin, not a backend


@needs_torch
def test_torch_backend_lists_the_new_op() -> None:
    assert "ia3_scale" in get_plugin_manager().get_backend("torch").ops()


def test_plugin_imports_and_plans_without_torch() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from peftcore import PeftRegistry\n"
        "from peftcore.graph import LayerNode, ModelGraph\n"
        "from peftcore_ia3 import plugin\n"
        "from peftcore_ia3.config import IA3Scale\n"
        "assert set(plugin.peftcore_op_builders(backend='torch')) == {IA3Scale}\n"
        "assert set(plugin.peftcore_op_builders(backend='singa')) == {IA3Scale}\n"
        "assert plugin.peftcore_op_builders(backend='jax') == {}\n"
        "assert 'singa' not in sys.modules\n"
        "graph = ModelGraph(layers=(LayerNode('fc', 'linear', in_features=3, out_features=5),))\n"
        "plan = PeftRegistry.get('ia3')(target_modules=['fc'], feedforward_modules=[]).plan(graph)\n"
        "assert [op.op for op in plan.ops] == ['freeze_base', 'ia3_scale']\n"
        "assert sys.modules['torch'] is None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# -- config and plan ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"init_ia3_weights": "yes"}, "init_ia3_weights"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out"),
        ({"target_modules": 3}, "target_modules"),
        ({"target_modules": "(unclosed"}, "regular expression"),
        ({"feedforward_modules": ["fc2"], "target_modules": ["fc1"]}, "subset"),
        ({"feedforward_modules": "all-linear"}, "feedforward_modules"),
        ({"modules_to_save": "head"}, "modules_to_save"),
        ({"target_module": ["fc1"]}, "did you mean"),
    ],
)
def test_bad_config_values_raise_config_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        IA3Config(**kwargs)


def _mlp_graph() -> ModelGraph:
    return ModelGraph(
        layers=(
            LayerNode("emb", "embedding", num_embeddings=10, embedding_dim=4),
            LayerNode("fc1", "linear", in_features=4, out_features=8, has_bias=True),
            LayerNode("fc2", "linear", in_features=8, out_features=2, has_bias=True),
        ),
    )


def test_plan_scales_outputs_and_feedforward_inputs() -> None:
    plan = IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]).plan(_mlp_graph())
    assert plan.method == "ia3"
    assert plan.ops[0].op == "freeze_base" and all(isinstance(op, IA3Scale) for op in plan.ops[1:])
    shapes = {name: spec.shape for name, spec in plan.tensor_specs().items()}
    assert shapes == {"fc1.ia3_l": (8, 1), "fc2.ia3_l": (1, 8)}
    assert plan.tensor_specs()["fc2.ia3_l"].hf_name == "fc2.ia3_l"
    assert plan.num_trainable() == 16
    assert RewritePlan.from_json(plan.to_json()) == plan


def test_plan_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="feedforward_modules is not set"):
        IA3Config(target_modules=["fc1"]).plan(_mlp_graph())
    with pytest.raises(TargetNotFoundError, match="fc1"):
        IA3Config(target_modules=["fc_1"], feedforward_modules=[]).plan(_mlp_graph())
    with pytest.raises(UnsupportedLayerError, match="emb"):
        IA3Config(target_modules=["emb"], feedforward_modules=[]).plan(_mlp_graph())
    with pytest.raises(peftcore.PlanError, match="init"):
        RewritePlan.from_dict({"method": "ia3", "adapter_name": "a", "ops": [
            {"op": "ia3_scale", "path": "fc1", "in_features": 4, "out_features": 8, "init": "zeros"}]})


def test_config_round_trips_through_hf_style_json() -> None:
    config = IA3Config(target_modules=("value", "key"), feedforward_modules=["key"], init_ia3_weights=False)
    data = config.to_dict()
    assert data["peft_type"] == "IA3" and data["target_modules"] == ["key", "value"]
    assert IA3Config.from_dict({**data, "peft_version": "0.13.0", "revision": None}) == config


# -- a small torch MLP ----------------------------------------------------------------------------
if torch is not None:

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(6, 16)
            self.fc2 = nn.Linear(16, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _mlp() -> Any:
    torch.manual_seed(0)
    return MLP()


MLP_CONFIG = dict(target_modules=["fc1", "fc2", "head"], feedforward_modules=["fc2"])


def _train(model: PeftModel, loss_fn: Callable[[], Any], steps: int = 15, lr: float = 0.05) -> list[float]:
    params = [p for p in model.model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=lr)
    losses = []
    model.model.train()
    for _ in range(steps):
        optimiser.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    model.model.eval()
    return losses


@needs_torch
def test_mlp_identity_at_init_then_trains() -> None:
    base, model = _mlp(), _mlp()
    x, target = torch.randn(32, 6), torch.randn(32, 3)
    peft_model = get_peft_model(model, IA3Config(**MLP_CONFIG))
    assert torch.equal(peft_model(x), base(x))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == 16 + 16 + 3  # fc1 out, fc2 in (feed-forward), head out
    losses = _train(peft_model, lambda: torch.nn.functional.mse_loss(peft_model(x), target))
    assert losses[-1] < losses[0]
    for name in ("fc1", "fc2", "head"):  # the base layers stayed frozen
        layer = peft_model.model.get_submodule(name)
        assert type(layer).__name__ == "IA3Linear"
        assert torch.equal(layer.base_layer.weight, getattr(base, name).weight)
        assert torch.equal(layer.base_layer.bias, getattr(base, name).bias)
    with peft_model.disable_adapter():
        assert torch.equal(peft_model(x), base(x))
    assert not torch.allclose(peft_model(x), base(x))


# -- tiny transformers models ----------------------------------------------------------------------
def _seeded(build: Callable[[], Any]) -> Any:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build().eval()


def _bert() -> Any:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return _seeded(lambda: transformers.BertModel(config))


def _gpt2() -> Any:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return _seeded(lambda: transformers.GPT2LMHeadModel(config))


BUILDERS = {"bert": _bert, "gpt2": _gpt2}


def _out(model: Any, ids: Any) -> Any:
    with torch.no_grad():
        result = model(input_ids=ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _ids() -> Any:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@needs_hf
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_transformers_model_full_cycle(arch: str, tmp_path: Path) -> None:
    build = BUILDERS[arch]
    base, ids = build(), _ids()
    peft_model = get_peft_model(build(), IA3Config())  # per-model-type default targets
    assert {op.op for op in peft_model.plans["default"].ops} == {"freeze_base", "ia3_scale"}
    assert any(op.is_feedforward for op in peft_model.plans["default"].ops[1:])
    assert torch.equal(_out(peft_model, ids), _out(base, ids))  # vectors start at one

    target = torch.randn_like(_out(base, ids))
    losses = _train(peft_model, lambda: torch.nn.functional.mse_loss(peft_model(input_ids=ids)[0], target))
    assert losses[-1] < losses[0]
    adapted = _out(peft_model, ids)
    assert not torch.allclose(adapted, _out(base, ids), atol=1e-4)

    base_state = {k: v.clone() for k, v in peft_model.model.state_dict().items()}
    peft_model.merge_adapter()
    assert_close_to_scale(_out(peft_model, ids), adapted)
    peft_model.unmerge_adapter()
    assert all(torch.equal(v, base_state[k]) for k, v in peft_model.model.state_dict().items())  # bit-exact
    assert torch.equal(_out(peft_model, ids), adapted)

    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path)
    assert torch.equal(_out(loaded, ids), adapted)
    assert loaded.plans["default"] == peft_model.plans["default"]

    first_path = peft_model.plans["default"].ops[1].path
    plain = peft_model.merge_and_unload()
    assert not any("ia3" in name for name, _ in plain.named_parameters())
    assert type(plain.get_submodule(first_path)).__name__ in ("Linear", "Conv1D")
    assert_close_to_scale(_out(plain, ids), adapted)


@needs_hf
def test_two_adapters_and_damaged_file(tmp_path: Path) -> None:
    ids = _ids()
    peft_model = get_peft_model(_bert(), IA3Config(init_ia3_weights=False), adapter_name="a")
    out_a = _out(peft_model, ids)
    peft_model.add_adapter("b", IA3Config(target_modules=["query"], feedforward_modules=[], init_ia3_weights=False))
    peft_model.set_adapter("b")
    out_b = _out(peft_model, ids)
    peft_model.set_adapter(["a", "b"])
    peft_model.merge_adapter()
    merged = _out(peft_model, ids)
    peft_model.unmerge_adapter()
    assert_close_to_scale(merged, _out(peft_model, ids))
    peft_model.delete_adapter("b")
    assert torch.equal(_out(peft_model, ids), out_a) and not torch.equal(out_a, out_b)

    from safetensors.numpy import load_file, save_file

    peft_model.save_pretrained(tmp_path)
    weights = tmp_path / "a" / "adapter_model.safetensors"  # non-default adapters get a subfolder
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(weights))
    with pytest.raises(AdapterError, match="shape"):
        PeftModel.from_pretrained(_bert(), tmp_path / "a")


# -- Hugging Face PEFT interop ------------------------------------------------------------------------
def _hf_config(**kwargs: Any) -> Any:
    return peft.IA3Config(**kwargs)


@needs_hf
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_peftcore_adapter_loads_in_hf_peft(arch: str, tmp_path: Path) -> None:
    build, ids = BUILDERS[arch], _ids()
    ours = get_peft_model(build(), IA3Config(init_ia3_weights=False))
    expected = _out(ours, ids)
    assert not torch.allclose(expected, _out(build(), ids), atol=1e-4)
    ours.save_pretrained(tmp_path)

    reference = peft.get_peft_model(build(), _hf_config())
    hf_keys = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(reference).items()}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="np") as handle:
        our_keys = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        assert "peftcore" in (handle.metadata() or {})
    assert our_keys == hf_keys  # same key names and shapes as HF PEFT writes

    hf_model = peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    assert_close_to_scale(_out(hf_model, ids), expected)


@needs_hf
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_hf_peft_adapter_loads_in_peftcore(arch: str, tmp_path: Path) -> None:
    build, ids = BUILDERS[arch], _ids()
    hf_model = peft.get_peft_model(build(), _hf_config(init_ia3_weights=False)).eval()
    expected = _out(hf_model, ids)
    assert not torch.allclose(expected, _out(build(), ids), atol=1e-4)
    hf_model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"

    ours = PeftModel.from_pretrained(build(), tmp_path)
    assert ours.plans["default"].method == "ia3"
    assert_close_to_scale(_out(ours, ids), expected)
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
