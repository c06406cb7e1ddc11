"""Conformance tests for DoRA, LoRA's ``use_dora=True`` form (mixed into
:class:`~peftcore.testing.ConformanceSuite`). A backend that lists ``"dora"`` in its
``BackendInfo.limitations`` is checked to refuse it with that reason instead."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peftcore.errors import PlanError
from peftcore.methods.lora import MAGNITUDE
from peftcore.plugins import Backend
from peftcore.testing.numerics import assert_close_to_scale
from peftcore.testing.suite_base import SuiteBase
from peftcore.testing.toys import ToySpec, reference_forward


class DoraTests(SuiteBase):
    """DoRA on every toy model, against :meth:`~peftcore.methods.lora.AddLora.delta`."""

    def dora(self, backend: Backend, toy: ToySpec, weights: dict, inputs: np.ndarray, **lora: Any) -> Any:
        reason = dict(backend.info.limitations or {}).get("dora")
        if reason is not None:
            with pytest.raises(PlanError, match="cannot build dora"):
                self.wrap(backend, toy, weights, inputs, use_dora=True, **lora)
            pytest.skip(f"{backend.name} lists DoRA as a limitation: {reason}")
        return self.wrap(backend, toy, weights, inputs, use_dora=True, **lora)

    def test_dora_at_init_is_the_base(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.dora(peftcore_backend, toy, weights, inputs, r=3)
        exported = self.exported(peft_model, "default")
        for step in toy.layers:  # the magnitude starts as the base weight's norm per output
            canonical = weights[f"{step.name}.weight"].astype(np.float64)
            canonical = canonical.T if step.kind == "embedding" else canonical
            assert_close_to_scale(exported[f"{step.name}.{MAGNITUDE}"], np.linalg.norm(canonical, axis=1))
        assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), reference_forward(toy, weights, inputs))

    def test_dora_matches_reference(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.dora(peftcore_backend, toy, weights, inputs, r=2, lora_alpha=5)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), self.expected(toy, weights, inputs, peft_model, "default"))
        assert peft_model.get_nb_trainable_parameters()[0] == peft_model.plans["default"].num_trainable()

    def test_dora_merge_unmerge_restores_base_exactly(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.dora(peftcore_backend, toy, weights, inputs, r=2)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        unmerged = self.run(peftcore_backend, peft_model, inputs)
        self.assert_merge_cycles(peftcore_backend, peft_model, inputs, unmerged, cycles=2)
        with peft_model.disable_adapter():
            np.testing.assert_array_equal(
                self.run(peftcore_backend, peft_model, inputs), self.run(peftcore_backend, self.build(peftcore_backend, toy, weights), inputs)
            )

    def test_two_dora_adapters_add_their_changes(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.dora(peftcore_backend, toy, weights, inputs, r=2)
        config = type(peft_model.peft_config["default"])(target_modules=[toy.layers[-1].name], r=3, use_dora=True)
        peft_model.add_adapter("other", config)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        self.randomise(peftcore_backend, peft_model, "other", rng)
        peft_model.set_adapter(["default", "other"])
        both = self.expected(toy, weights, inputs, peft_model, "default", "other")
        assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), both)
        peft_model.merge_adapter(["default"])  # "other" runs beside a merged one, on the unmerged base
        assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), both)
        peft_model.merge_adapter(["other"])
        assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), both)

    def test_dora_save_load_round_trip(self, peftcore_backend: Backend, toy: ToySpec, rng: Any, tmp_path: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.dora(peftcore_backend, toy, weights, inputs, r=3)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        expected = self.run(peftcore_backend, peft_model, inputs)
        peft_model.save_pretrained(str(tmp_path))
        loaded = self.load_saved(peftcore_backend, toy, weights, inputs, tmp_path)
        assert_close_to_scale(self.run(peftcore_backend, loaded, inputs), expected)
        merged = self.load_saved(peftcore_backend, toy, weights, inputs, tmp_path).merge_and_unload()
        assert_close_to_scale(self.run(peftcore_backend, merged, inputs), expected)
