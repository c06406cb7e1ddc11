"""P-tuning (``PromptEncoderConfig``, MLP and LSTM encoders) on SINGA, and what SINGA refuses.

The conformance suite checks forward outputs and a save/load round trip against the
numpy reference; these tests check gradients (finite differences of the float64
reference), training, SINGA's own ``save_states``/``load_states``, adapters moving
between torch and SINGA, and the plain refusals of prefix tuning and UniPELT (SINGA's
core has no attention layer). Everything skips, with the reason, where ``import singa``
fails.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peftcore import get_peft_model
from peftcore.api import PeftModel
from peftcore.errors import PlanError
from peftcore.methods.p_tuning import PromptEncoderConfig
from peftcore.methods.prefix_tuning import PrefixTuningConfig
from peftcore.methods.unipelt import UniPELTConfig
from peftcore.plugins import get_plugin_manager
from peftcore.testing.numerics import assert_close_to_scale
from peftcore.testing.toys import TOKEN_MODEL, reference_forward
from tests.integration.test_singa_bitfit_prompt import (
    Trainer,
    _forward,
    _numeric_gradients,
    _params,
    _randomise,
    _singa_gradients,
    _toy,
)

CONFIGS = {
    "mlp": lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=4),
    "lstm": lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type="LSTM", encoder_hidden_size=3),
    "lstm-1-token-3-layers": lambda: PromptEncoderConfig(
        num_virtual_tokens=1, encoder_reparameterization_type="LSTM", encoder_hidden_size=2, encoder_num_layers=3
    ),
}
PROMPT = "embed.prompt_embeddings"  # the encoder's output, saved but not trained itself


def _setup(config: PromptEncoderConfig, seed: int) -> tuple[Any, PeftModel, dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights, x = TOKEN_MODEL.random_weights(rng), TOKEN_MODEL.random_inputs(rng)
    model = _toy(TOKEN_MODEL, weights)
    return model, get_peft_model(model, config, example_inputs=x), weights, x


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_p_tuning_gradients_match_finite_differences(sg: Any, case: str) -> None:
    """Checks the 2-D linear, the LSTM steps (split, gates, both directions, stacked
    layers) and the MLP head backward passes, for every encoder tensor."""
    model, peft, weights, x = _setup(CONFIGS[case](), 21)
    rng = np.random.default_rng(22)
    tensors = _randomise(peft, rng, scale=0.5)
    y = rng.standard_normal((4, 3))
    got = _singa_gradients(model, x, y)
    expected = _numeric_gradients(TOKEN_MODEL, weights, x, y, peft.plans["default"], {k: v for k, v in tensors.items() if k != PROMPT})
    assert set(got) <= set(expected) and all(k.startswith("embed.encoder.") for k in got)
    for key, grad in expected.items():  # SINGA yields none for a tensor no op used (one token: weight_hh)
        assert_close_to_scale(got.get(key, np.zeros_like(grad)), grad, rtol=0.002, err_msg=key)
    assert set(expected) - set(got) == ({k for k in expected if "weight_hh" in k} if case.startswith("lstm-1") else set())


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_p_tuning_trains_only_the_encoder(sg: Any, kind: str) -> None:
    """SGD steps lower the loss and change exactly the encoder's tensors."""
    from singa import autograd

    config = PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type=kind, encoder_hidden_size=8)
    model, peft, weights, x = _setup(config, 23)
    assert peft.get_nb_trainable_parameters()[0] == peft.plans["default"].num_trainable()
    y = np.random.default_rng(24).standard_normal(reference_forward(TOKEN_MODEL, weights, x).shape).astype(np.float32)
    before = _params(model)
    trainer = Trainer(model, x, y, use_graph=False)

    def loss() -> float:
        autograd.training = False
        return float(np.mean((_forward(model, x) - y) ** 2))

    losses = [loss()]
    for _ in range(5):
        trainer.steps(1)
        losses.append(loss())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    after = _params(model)
    assert any(".encoder.lstm_head." in n for n in after) == (kind == "LSTM")
    for name, value in before.items():
        if name.startswith("embed.encoder."):
            assert not np.array_equal(value, after[name]), f"{name} was not trained"
        else:
            np.testing.assert_array_equal(value, after[name], err_msg=f"frozen {name} changed")


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_p_tuning_save_load_round_trips(sg: Any, kind: str, tmp_path: Any) -> None:
    """save_pretrained/from_pretrained (training resumes from the same encoder) and
    SINGA's save_states/load_states give the same outputs."""
    config = PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type=kind, encoder_hidden_size=5)
    model, peft, weights, x = _setup(config, 25)
    y = np.random.default_rng(26).standard_normal((4, 3)).astype(np.float32)
    Trainer(model, x, y, use_graph=False).steps(2)
    expected = _forward(model, x)
    trained = {n: v for n, v in _params(model).items() if n.startswith("embed.encoder.")}
    peft.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(_toy(TOKEN_MODEL, weights), str(tmp_path / "adapter"), example_inputs=x, is_trainable=True)
    assert_close_to_scale(_forward(loaded.model, x), expected)
    reloaded = _params(loaded.model)
    for name, value in trained.items():
        np.testing.assert_array_equal(reloaded[name], value, err_msg=name)
    assert loaded.get_nb_trainable_parameters()[0] == sum(v.size for v in trained.values())

    model.save_states(str(tmp_path / "states.zip"))
    fresh = _toy(TOKEN_MODEL, weights)
    get_peft_model(fresh, config, example_inputs=x)
    assert not np.allclose(_forward(fresh, x), expected)
    fresh.load_states(str(tmp_path / "states.zip"))
    np.testing.assert_array_equal(_forward(fresh, x), expected)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_torch_and_singa_share_p_tuning_adapters(sg: Any, kind: str, tmp_path: Any) -> None:
    """The same toy built by both backends' hooks: a P-tuning adapter trained in either
    loads in the other with equal encoder tensors, prompts and outputs (within 1e-5)."""
    torch = pytest.importorskip("torch", reason="torch is not installed next to SINGA in this interpreter")
    config = PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type=kind, encoder_hidden_size=4)
    torch_backend = get_plugin_manager().get_backend("torch")
    torch_kit = torch_backend.conformance_kit()
    rng = np.random.default_rng(27)
    weights, x = TOKEN_MODEL.random_weights(rng), TOKEN_MODEL.random_inputs(rng)
    y = rng.standard_normal(reference_forward(TOKEN_MODEL, weights, x).shape).astype(np.float32)
    base = reference_forward(TOKEN_MODEL, weights, x)

    torch_model = torch_kit.build(TOKEN_MODEL, weights)
    torch_peft = get_peft_model(torch_model, config, example_inputs=x)
    optimizer = torch.optim.SGD([p for p in torch_model.parameters() if p.requires_grad], lr=0.2)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(torch_model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()
    torch_out = torch_kit.forward(torch_model, x)
    assert np.abs(torch_out - base).max() > 1e-3
    torch_peft.save_pretrained(str(tmp_path / "from_torch"))
    singa_loaded = PeftModel.from_pretrained(_toy(TOKEN_MODEL, weights), str(tmp_path / "from_torch"), example_inputs=x)
    assert singa_loaded.backend.name == "singa"
    assert_close_to_scale(_forward(singa_loaded.model, x), torch_out)
    _assert_same_adapter(torch_peft.export_adapter("default"), singa_loaded.export_adapter("default"))

    singa_model, singa_peft, _, _ = _setup(config, 27)
    Trainer(singa_model, x, y, use_graph=False).steps(3)
    singa_out = _forward(singa_model, x)
    assert np.abs(singa_out - base).max() > 1e-3
    singa_peft.save_pretrained(str(tmp_path / "from_singa"))
    torch_loaded = PeftModel.from_pretrained(torch_kit.build(TOKEN_MODEL, weights), str(tmp_path / "from_singa"))
    assert torch_loaded.backend.name == "torch"
    assert_close_to_scale(torch_kit.forward(torch_loaded.model, x), singa_out)
    _assert_same_adapter(singa_peft.export_adapter("default"), torch_loaded.export_adapter("default"))


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_save_states_of_p_tuning_converts(sg: Any, kind: str, tmp_path: Any) -> None:
    """``peftcore convert`` of a SINGA ``save_states`` zip: the prompt, not stored there, is
    computed from the encoder; with the plan (the encoder kept) and with the model (HF
    PEFT's loading plan, a plain prompt); both load with the trained model's outputs."""
    from peftcore.convert import convert

    config = PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type=kind, encoder_hidden_size=4)
    model, peft, weights, x = _setup(config, 32)
    Trainer(model, x, np.random.default_rng(33).standard_normal((4, 3)).astype(np.float32), use_graph=False).steps(2)
    expected, exported = _forward(model, x), peft.export_adapter("default")
    model.save_states(str(tmp_path / "states.zip"))
    with_plan = convert(tmp_path / "states.zip", tmp_path / "with_plan", config=config, plan=peft.plans["default"])
    _assert_same_adapter(exported, with_plan.tensors)
    with_model = convert(tmp_path / "states.zip", tmp_path / "hf", to="hf", config=config, graph=peft.model_graph)
    assert set(with_model.tensors) == {PROMPT}
    assert_close_to_scale(with_model.tensors[PROMPT], exported[PROMPT])
    for folder, trainable in (("with_plan", kind), ("hf", None)):
        loaded = PeftModel.from_pretrained(_toy(TOKEN_MODEL, weights), str(tmp_path / folder), example_inputs=x)
        assert_close_to_scale(_forward(loaded.model, x), expected)
        assert any(".encoder." in name for name in loaded.model.get_params()) == (trainable is not None)


def _assert_same_adapter(source: dict, loaded: dict) -> None:
    """Equal encoder tensors, and equal prompts: the two frameworks' encoders agree."""
    assert set(source) == set(loaded)
    for key, value in source.items():
        assert_close_to_scale(np.asarray(loaded[key]), np.asarray(value), err_msg=key)


def test_encoder_dropout_is_train_only(sg: Any) -> None:
    """LSTM dropout between layers acts while training and never in eval or export."""
    from singa import autograd, tensor

    config = PromptEncoderConfig(
        num_virtual_tokens=4, encoder_reparameterization_type="LSTM", encoder_hidden_size=6, encoder_dropout=0.5
    )
    model, peft, _, x = _setup(config, 28)
    layer = model.embed
    evals = [_forward(model, x) for _ in range(2)]
    np.testing.assert_array_equal(evals[0], evals[1])
    autograd.training = True
    trained = [tensor.to_numpy(layer.prompt("default")) for _ in range(2)]
    assert not np.allclose(trained[0], trained[1])  # a new mask each call
    exported = peft.export_adapter("default")[PROMPT]
    assert autograd.training is True
    autograd.training = False
    assert_close_to_scale(exported, tensor.to_numpy(layer.prompt("default")))


# -- what SINGA refuses ------------------------------------------------------------------------


def test_encoder_decoder_layout_is_refused(sg: Any) -> None:
    rng = np.random.default_rng(29)
    weights, x = TOKEN_MODEL.random_weights(rng), TOKEN_MODEL.random_inputs(rng)
    with pytest.raises(PlanError, match="num_transformer_submodules=1"):
        get_peft_model(_toy(TOKEN_MODEL, weights), PromptEncoderConfig(num_virtual_tokens=2, num_transformer_submodules=2), example_inputs=x)


@pytest.mark.parametrize(
    "config",
    [
        PrefixTuningConfig(num_virtual_tokens=2),
        PrefixTuningConfig(num_virtual_tokens=2, attention_module="proj", key_module="proj"),
        UniPELTConfig(),
    ],
    ids=["prefix", "prefix-with-layout", "unipelt"],
)
def test_attention_methods_are_refused_plainly(sg: Any, config: Any) -> None:
    """Before any planning, pending or not: the reason is SINGA's missing attention layer."""
    rng = np.random.default_rng(30)
    weights, x = TOKEN_MODEL.random_weights(rng), TOKEN_MODEL.random_inputs(rng)
    with pytest.raises(PlanError, match=r"cannot build .*SINGA's core has no attention layer"):
        get_peft_model(_toy(TOKEN_MODEL, weights), config, example_inputs=x)
    from peftcore_singa.toys import ToyModel

    with pytest.raises(PlanError, match="no attention layer"):  # the layers not initialised yet
        get_peft_model(ToyModel(TOKEN_MODEL), config)


def test_a_prefix_tuning_file_is_refused_plainly(sg: Any, tmp_path: Any) -> None:
    """A prefix-tuning adapter saved by torch: loading it on SINGA names the reason."""
    pytest.importorskip("torch", reason="torch is not installed next to SINGA in this interpreter")
    from peftcore.testing.unipelt_reference import ATTENTION_TOYS

    toy = ATTENTION_TOYS[0]
    rng = np.random.default_rng(31)
    layout = toy.unipelt_layout()
    config = PrefixTuningConfig(
        num_virtual_tokens=2, attention_module=layout.get("attention_module"), key_module=layout.get("key_module")
    )
    torch_model = get_plugin_manager().get_backend("torch").conformance_kit().build(toy, toy.random_weights(rng))
    get_peft_model(torch_model, config, example_inputs=toy.random_inputs(rng)).save_pretrained(str(tmp_path))
    weights, x = TOKEN_MODEL.random_weights(rng), TOKEN_MODEL.random_inputs(rng)
    with pytest.raises(PlanError, match="SINGA's core has no attention layer"):
        PeftModel.from_pretrained(_toy(TOKEN_MODEL, weights), str(tmp_path), example_inputs=x)


def test_backends_lists_p_tuning_and_the_reasons(sg: Any) -> None:
    from peftcore.cli.backends import backend_records, other_plugins, render_backends

    manager = get_plugin_manager()
    out = "\n".join(render_backends(backend_records(manager), other_plugins(manager)))
    singa_row = next(line for line in out.splitlines() if line.startswith("singa "))
    assert "p_tuning" in singa_row and "prefix_tuning" not in singa_row and "unipelt" not in singa_row
    for method in ("prefix_tuning", "unipelt"):
        line = next(line for line in out.splitlines() if line.startswith(f"singa: cannot build {method} "))
        assert "SINGA's core has no attention layer" in line
    for method in ("prompt_tuning", "residual_prompt_tuning", "p_tuning"):  # built, with one submodule only
        line = next(line for line in out.splitlines() if line.startswith(f"singa: {method} is limited: "))
        assert "num_transformer_submodules=2" in line
