"""The shared conformance suite every backend passes.

Subclass it in a test module (with :mod:`peftcore.testing.plugin` loaded)::

    from peftcore.testing import ConformanceSuite

    class TestMyBackend(ConformanceSuite):
        backends = ["mybackend"]

Each test builds the framework-neutral toy models natively through the backend, applies
a plan, and compares the backend's outputs with the numpy reference computed from the
weights the backend exports.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peftcore.api import PeftModel, get_peft_model
from peftcore.graph import ModelGraph
from peftcore.methods.lora import LoraConfig
from peftcore.plugins import Backend
from peftcore.testing.toys import TOY_SPECS, ToySpec, lora_deltas, reference_forward

ATOL = 1e-5


class ConformanceSuite:
    """Backend-independent tests; ``backends`` names the backends to run them on."""

    backends: list = []

    @pytest.fixture(params=TOY_SPECS, ids=[s.name for s in TOY_SPECS])
    def toy(self, request: Any) -> ToySpec:
        return request.param

    @pytest.fixture
    def rng(self) -> np.random.Generator:
        return np.random.default_rng(1234)

    # -- helpers --------------------------------------------------------------------------
    def build(self, backend: Backend, spec: ToySpec, weights: dict) -> Any:
        return backend.call("peftcore_build_toy_model", spec=spec, weights=weights)

    def run(self, backend: Backend, model: Any, inputs: np.ndarray) -> np.ndarray:
        native = model.model if isinstance(model, PeftModel) else model
        return np.asarray(backend.call("peftcore_toy_forward", model=native, inputs=inputs), dtype=np.float64)

    def wrap(self, backend: Backend, spec: ToySpec, weights: dict, inputs: np.ndarray, **lora: Any) -> PeftModel:
        config = LoraConfig(target_modules=[s.name for s in spec.layers], **lora)
        return get_peft_model(self.build(backend, spec, weights), config, backend=backend.name, example_inputs=inputs)

    def randomise(self, backend: Backend, peft_model: PeftModel, adapter: str, rng: np.random.Generator) -> dict:
        tensors = {
            key: (rng.standard_normal(spec.shape) * 0.2).astype(np.float32)
            for key, spec in peft_model.plans[adapter].tensor_specs().items()
        }
        backend.call("peftcore_import_adapter", model=peft_model.model, adapter_name=adapter, tensors=tensors)
        return tensors

    def expected(self, spec: ToySpec, weights: dict, inputs: np.ndarray, peft_model: PeftModel, *adapters: str) -> np.ndarray:
        deltas = [
            lora_deltas(peft_model.plans[a], peft_model.backend.call("peftcore_export_adapter", model=peft_model.model, adapter_name=a))
            for a in adapters
        ]
        return reference_forward(spec, weights, inputs, deltas)

    # -- tests ------------------------------------------------------------------------------
    def test_describe_reports_canonical_shapes(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights = toy.random_weights(rng)
        model = self.build(peftcore_backend, toy, weights)
        graph = peftcore_backend.call("peftcore_describe", model=model, example_inputs=toy.random_inputs(rng))
        assert isinstance(graph, ModelGraph)
        for step in toy.layers:
            node = graph.get(step.name)
            assert node.kind == step.kind
            if step.kind == "linear":
                assert (node.in_features, node.out_features) == (step.in_dim, step.out_dim)
                assert node.has_bias == step.bias
                assert node.params["weight"] == (step.out_dim, step.in_dim)
            else:
                assert (node.num_embeddings, node.embedding_dim) == (step.in_dim, step.out_dim)

    def test_base_model_matches_reference(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        model = self.build(peftcore_backend, toy, weights)
        np.testing.assert_allclose(self.run(peftcore_backend, model, inputs), reference_forward(toy, weights, inputs), atol=ATOL)

    def test_lora_at_init_is_exactly_the_base(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        base_out = self.run(peftcore_backend, self.build(peftcore_backend, toy, weights), inputs)
        peft_model = self.wrap(peftcore_backend, toy, weights, inputs, r=4, lora_alpha=8)
        np.testing.assert_array_equal(self.run(peftcore_backend, peft_model, inputs), base_out)

    def test_lora_matches_reference(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.wrap(peftcore_backend, toy, weights, inputs, r=3, lora_alpha=6, use_rslora=True)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        got = self.run(peftcore_backend, peft_model, inputs)
        np.testing.assert_allclose(got, self.expected(toy, weights, inputs, peft_model, "default"), atol=ATOL)

    def test_trainable_count_is_the_plans(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.wrap(peftcore_backend, toy, weights, inputs, r=2)
        trainable, total = peft_model.get_nb_trainable_parameters()
        assert trainable == peft_model.plans["default"].num_trainable()
        assert total == trainable + sum(int(np.prod(s)) for s in toy.weight_shapes().values())

    def test_export_import_round_trip(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.wrap(peftcore_backend, toy, weights, inputs, r=2)
        tensors = self.randomise(peftcore_backend, peft_model, "default", rng)
        exported = peftcore_backend.call("peftcore_export_adapter", model=peft_model.model, adapter_name="default")
        assert set(exported) == set(tensors) == set(peft_model.plans["default"].tensor_specs())
        for key, value in tensors.items():
            np.testing.assert_array_equal(np.asarray(exported[key]), value)

    def test_merge_unmerge_restores_base_exactly(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.wrap(peftcore_backend, toy, weights, inputs, r=4)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        unmerged = self.run(peftcore_backend, peft_model, inputs)
        peft_model.merge_adapter()
        np.testing.assert_allclose(self.run(peftcore_backend, peft_model, inputs), unmerged, atol=ATOL)
        peft_model.unmerge_adapter()
        np.testing.assert_array_equal(self.run(peftcore_backend, peft_model, inputs), unmerged)
        with peft_model.disable_adapter():
            np.testing.assert_allclose(self.run(peftcore_backend, peft_model, inputs), reference_forward(toy, weights, inputs), atol=ATOL)

    def test_multiple_adapters(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.wrap(peftcore_backend, toy, weights, inputs, r=2)
        peft_model.add_adapter("other", LoraConfig(target_modules=[toy.layers[-1].name], r=5, lora_alpha=3))
        self.randomise(peftcore_backend, peft_model, "default", rng)
        self.randomise(peftcore_backend, peft_model, "other", rng)
        np.testing.assert_allclose(self.run(peftcore_backend, peft_model, inputs), self.expected(toy, weights, inputs, peft_model, "default"), atol=ATOL)
        peft_model.set_adapter("other")
        np.testing.assert_allclose(self.run(peftcore_backend, peft_model, inputs), self.expected(toy, weights, inputs, peft_model, "other"), atol=ATOL)
        peft_model.set_adapter(["default", "other"])
        both = self.expected(toy, weights, inputs, peft_model, "default", "other")
        np.testing.assert_allclose(self.run(peftcore_backend, peft_model, inputs), both, atol=ATOL)
        peft_model.delete_adapter("other")
        assert list(peft_model.peft_config) == ["default"]
        np.testing.assert_allclose(self.run(peftcore_backend, peft_model, inputs), self.expected(toy, weights, inputs, peft_model, "default"), atol=ATOL)

    def test_save_load_round_trip(self, peftcore_backend: Backend, toy: ToySpec, rng: Any, tmp_path: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.wrap(peftcore_backend, toy, weights, inputs, r=3)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        expected = self.run(peftcore_backend, peft_model, inputs)
        peft_model.save_pretrained(str(tmp_path))
        fresh = self.build(peftcore_backend, toy, weights)
        loaded = PeftModel.from_pretrained(fresh, str(tmp_path), backend=peftcore_backend.name, example_inputs=inputs)
        np.testing.assert_allclose(self.run(peftcore_backend, loaded, inputs), expected, atol=ATOL)
        assert loaded.get_nb_trainable_parameters()[0] == 0

    def test_unload_and_merge_and_unload(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        base_out = reference_forward(toy, weights, inputs)
        peft_model = self.wrap(peftcore_backend, toy, weights, inputs, r=2)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        adapted = self.expected(toy, weights, inputs, peft_model, "default")
        merged_model = peft_model.merge_and_unload()
        np.testing.assert_allclose(self.run(peftcore_backend, merged_model, inputs), adapted, atol=ATOL)
        graph = peftcore_backend.call("peftcore_describe", model=merged_model, example_inputs=inputs)
        assert [n.path for n in graph.of_kind("linear", "embedding")] == [s.name for s in toy.layers]
        second = self.wrap(peftcore_backend, toy, weights, inputs, r=2)
        self.randomise(peftcore_backend, second, "default", rng)
        np.testing.assert_allclose(self.run(peftcore_backend, second.unload(), inputs), base_out, atol=ATOL)
