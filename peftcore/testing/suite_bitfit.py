"""Conformance tests for BitFit (mixed into :class:`~peftcore.testing.ConformanceSuite`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from peftcore.api import PeftModel
from peftcore.methods.bitfit import BitFitConfig, TrainBias
from peftcore.plugins import Backend
from peftcore.testing.numerics import assert_close_to_scale
from peftcore.testing.suite_base import SuiteBase
from peftcore.testing.toys import ToySpec, reference_forward


class BitFitTests(SuiteBase):
    """BitFit on every toy model, with biases added to the layers that have none."""

    def bitfit(self, backend: Backend, toy: ToySpec, weights: dict, inputs: np.ndarray) -> PeftModel:
        return self.wrap_with(backend, toy, weights, inputs, BitFitConfig(add_missing_biases=True))

    def test_bitfit_at_init_is_exactly_the_base(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        base_out = self.run(peftcore_backend, self.build(peftcore_backend, toy, weights), inputs)
        peft_model = self.bitfit(peftcore_backend, toy, weights, inputs)
        assert any(isinstance(op, TrainBias) and op.added for op in peft_model.plans["default"].ops_of("bitfit_bias")) == any(
            not s.bias for s in toy.layers if s.kind == "linear"
        )
        np.testing.assert_array_equal(self.run(peftcore_backend, peft_model, inputs), base_out)

    def test_bitfit_trains_exactly_the_biases(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.bitfit(peftcore_backend, toy, weights, inputs)
        linears = [s for s in toy.layers if s.kind == "linear"]
        assert peft_model.get_nb_trainable_parameters()[0] == sum(s.out_dim for s in linears)
        assert sorted(peft_model.plans["default"].tensor_specs()) == sorted(f"{s.name}.bias" for s in linears)
        only_existing = self.wrap_with(peftcore_backend, toy, weights, inputs, BitFitConfig())
        assert only_existing.get_nb_trainable_parameters()[0] == sum(s.out_dim for s in linears if s.bias)

    def test_bitfit_matches_reference(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.bitfit(peftcore_backend, toy, weights, inputs)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        got = self.run(peftcore_backend, peft_model, inputs)
        assert_close_to_scale(got, self.expected(toy, weights, inputs, peft_model, "default"))

    def test_bitfit_merge_unmerge_and_unload(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.bitfit(peftcore_backend, toy, weights, inputs)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        adapted = self.run(peftcore_backend, peft_model, inputs)
        self.assert_merge_cycles(peftcore_backend, peft_model, inputs, adapted)
        with peft_model.disable_adapter():
            assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), reference_forward(toy, weights, inputs))
        merged = peft_model.merge_and_unload()
        assert_close_to_scale(self.run(peftcore_backend, merged, inputs), adapted)
        graph = peftcore_backend.describe(merged, inputs)
        assert graph is not None
        assert all(graph.get(s.name).has_bias for s in toy.layers if s.kind == "linear")

    def test_bitfit_save_load_round_trip(self, peftcore_backend: Backend, toy: ToySpec, rng: Any, tmp_path: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.bitfit(peftcore_backend, toy, weights, inputs)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        expected = self.run(peftcore_backend, peft_model, inputs)
        peft_model.save_pretrained(str(tmp_path))
        loaded = self.load_saved(peftcore_backend, toy, weights, inputs, tmp_path, is_trainable=True)
        assert_close_to_scale(self.run(peftcore_backend, loaded, inputs), expected)
        assert loaded.get_nb_trainable_parameters()[0] == peft_model.plans["default"].num_trainable()
