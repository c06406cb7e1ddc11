"""UniPELT conformance tests, backend-neutral: a mixin for a backend's conformance class.

Include it beside :class:`~peftcore.testing.ConformanceSuite`::

    class TestMyBackend(ConformanceSuite, UniPELTSuite):
        backends = ["mybackend"]

The backend builds the one-block attention toys of :mod:`peftcore.testing.unipelt_reference`
(the conformance kit's ``build`` receives an :class:`AttentionToySpec`), and every
output and gate value is compared with the numpy reference computed from the adapter
tensors the backend exports.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peftcore.api import PeftModel, get_peft_model
from peftcore.errors import AdapterError
from peftcore.methods.prefix_tuning import PrefixTuningConfig
from peftcore.methods.unipelt import UniPELTConfig, gate_values
from peftcore.plugins import Backend
from peftcore.testing.numerics import assert_close_to_scale
from peftcore.testing.unipelt_reference import ATTENTION_TOYS, AttentionToySpec, unipelt_reference

VARIANTS = ("APL", "AP", "L", "P", "A")


class UniPELTSuite:
    """UniPELT on the attention toys; ``backends`` names the backends to run on."""

    backends: list = []

    @pytest.fixture(params=ATTENTION_TOYS, ids=[s.name for s in ATTENTION_TOYS])
    def attention_toy(self, request: Any) -> AttentionToySpec:
        return request.param

    @pytest.fixture
    def unipelt_rng(self) -> np.random.Generator:
        return np.random.default_rng(4321)

    # -- helpers --------------------------------------------------------------------------
    def unipelt_model(self, backend: Backend, spec: AttentionToySpec, weights: dict, inputs: np.ndarray, **fields: Any) -> PeftModel:
        config = UniPELTConfig(**{"r": 3, "num_virtual_tokens": 2, "bottleneck_size": 4, **spec.unipelt_layout(), **fields})
        model = backend.conformance_kit().build(spec, weights)
        return get_peft_model(model, config, backend=backend.name, example_inputs=inputs)

    def toy_output(self, backend: Backend, model: Any, inputs: np.ndarray) -> np.ndarray:
        native = model.get_base_model() if isinstance(model, PeftModel) else model
        return np.asarray(backend.conformance_kit().forward(native, inputs), dtype=np.float64)

    def randomise_unipelt(self, backend: Backend, peft_model: PeftModel, rng: np.random.Generator, adapter: str = "default") -> dict:
        tensors = {
            key: (rng.standard_normal(spec.shape) * 0.4).astype(np.float32)
            for key, spec in peft_model.plans[adapter].tensor_specs().items()
        }
        peft_model.import_adapter(adapter, tensors)
        return tensors

    # -- tests ------------------------------------------------------------------------------
    @pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
    def test_prefix_tuning_matches_reference(
        self, peftcore_backend: Backend, attention_toy: AttentionToySpec, unipelt_rng: Any, projection: bool
    ) -> None:
        """Prefix tuning shares UniPELT's prefix mechanism; its keys and values come from one table."""
        weights, inputs = attention_toy.random_weights(unipelt_rng), attention_toy.random_inputs(unipelt_rng)
        layout = attention_toy.unipelt_layout()
        config = PrefixTuningConfig(
            num_virtual_tokens=2, prefix_projection=projection, encoder_hidden_size=5,
            attention_module=layout.get("attention_module"), key_module=layout.get("key_module"),
        )
        model = peftcore_backend.conformance_kit().build(attention_toy, weights)
        peft_model = get_peft_model(model, config, backend=peftcore_backend.name, example_inputs=inputs)
        tensors = self.randomise_unipelt(peftcore_backend, peft_model, unipelt_rng)
        expected, _ = unipelt_reference(attention_toy, weights, inputs, peft_model.plans["default"], tensors)
        assert_close_to_scale(self.toy_output(peftcore_backend, peft_model, inputs), expected)
        assert peft_model.get_nb_trainable_parameters()[0] == peft_model.plans["default"].num_trainable()
        with peft_model.disable_adapter():
            assert_close_to_scale(
                self.toy_output(peftcore_backend, peft_model, inputs), self.toy_output(peftcore_backend, model, inputs))

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_unipelt_matches_reference(self, peftcore_backend: Backend, attention_toy: AttentionToySpec, unipelt_rng: Any, variant: str) -> None:
        weights, inputs = attention_toy.random_weights(unipelt_rng), attention_toy.random_inputs(unipelt_rng)
        peft_model = self.unipelt_model(peftcore_backend, attention_toy, weights, inputs, variant=variant)
        tensors = self.randomise_unipelt(peftcore_backend, peft_model, unipelt_rng)
        expected, expected_gates = unipelt_reference(attention_toy, weights, inputs, peft_model.plans["default"], tensors)
        assert_close_to_scale(self.toy_output(peftcore_backend, peft_model, inputs), expected)
        got_gates = gate_values(peft_model)
        assert set(got_gates) == set(expected_gates)
        for key, value in expected_gates.items():
            assert_close_to_scale(got_gates[key], value)
            assert value.shape == (inputs.shape[0],) and np.all((value > 0) & (value < 1))

    def test_lora_and_adapter_start_as_the_base(self, peftcore_backend: Backend, attention_toy: AttentionToySpec, unipelt_rng: Any) -> None:
        weights, inputs = attention_toy.random_weights(unipelt_rng), attention_toy.random_inputs(unipelt_rng)
        base, _ = unipelt_reference(attention_toy, weights, inputs)
        peft_model = self.unipelt_model(peftcore_backend, attention_toy, weights, inputs, variant="AL")
        assert_close_to_scale(self.toy_output(peftcore_backend, peft_model, inputs), base)

    def test_unipelt_counts_disables_and_refuses_merge(self, peftcore_backend: Backend, attention_toy: AttentionToySpec, unipelt_rng: Any) -> None:
        weights, inputs = attention_toy.random_weights(unipelt_rng), attention_toy.random_inputs(unipelt_rng)
        peft_model = self.unipelt_model(peftcore_backend, attention_toy, weights, inputs)
        self.randomise_unipelt(peftcore_backend, peft_model, unipelt_rng)
        trainable, total = peft_model.get_nb_trainable_parameters()
        assert trainable == peft_model.plans["default"].num_trainable()
        assert total == trainable + sum(int(np.prod(s)) for s in attention_toy.weight_shapes().values())
        adapted = self.toy_output(peftcore_backend, peft_model, inputs)
        with pytest.raises(AdapterError, match="cannot be merged"):
            peft_model.merge_adapter()
        with pytest.raises(AdapterError, match="cannot be merged"):
            peft_model.merge_and_unload()
        np.testing.assert_array_equal(self.toy_output(peftcore_backend, peft_model, inputs), adapted)
        with peft_model.disable_adapter():
            base, _ = unipelt_reference(attention_toy, weights, inputs)
            assert_close_to_scale(self.toy_output(peftcore_backend, peft_model, inputs), base)
        unloaded = peft_model.unload()
        assert_close_to_scale(self.toy_output(peftcore_backend, unloaded, inputs), base)

    def test_unipelt_save_load_round_trip(self, peftcore_backend: Backend, attention_toy: AttentionToySpec, unipelt_rng: Any, tmp_path: Any) -> None:
        weights, inputs = attention_toy.random_weights(unipelt_rng), attention_toy.random_inputs(unipelt_rng)
        peft_model = self.unipelt_model(peftcore_backend, attention_toy, weights, inputs, variant="APL")
        self.randomise_unipelt(peftcore_backend, peft_model, unipelt_rng)
        expected = self.toy_output(peftcore_backend, peft_model, inputs)
        peft_model.save_pretrained(str(tmp_path))
        fresh = peftcore_backend.conformance_kit().build(attention_toy, weights)
        loaded = PeftModel.from_pretrained(fresh, str(tmp_path), backend=peftcore_backend.name, example_inputs=inputs)
        np.testing.assert_array_equal(self.toy_output(peftcore_backend, loaded, inputs), expected)
        assert loaded.get_nb_trainable_parameters()[0] == 0
        assert loaded.plans["default"].ops == peft_model.plans["default"].ops
