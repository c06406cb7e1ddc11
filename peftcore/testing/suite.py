"""The shared conformance suite every backend passes.

Subclass it in a test module (with :mod:`peftcore.testing.plugin` loaded)::

    from peftcore.testing import ConformanceSuite

    class TestMyBackend(ConformanceSuite):
        backends = ["mybackend"]

Each test builds the framework-neutral toy models natively through the backend, applies
a plan, and compares the backend's outputs with the numpy reference computed from the
weights the backend exports. LoRA's tests are here; each other method has a module of
its own (``suite_<method>.py``) whose test class :class:`ConformanceSuite` includes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from peftcore.graph import ModelGraph
from peftcore.methods.lora import LoraConfig
from peftcore.plugins import Backend
from peftcore.testing.numerics import assert_close_to_scale
from peftcore.testing.suite_base import SuiteBase
from peftcore.testing.suite_bitfit import BitFitTests
from peftcore.testing.suite_conv import ConvLoraTests
from peftcore.testing.suite_dora import DoraTests
from peftcore.testing.suite_prompt import PromptTests
from peftcore.testing.toys import ToySpec, reference_forward


class LoraTests(SuiteBase):
    """LoRA on every toy model."""

    # -- tests ------------------------------------------------------------------------------
    def test_describe_reports_canonical_shapes(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights = toy.random_weights(rng)
        model = self.build(peftcore_backend, toy, weights)
        graph = peftcore_backend.describe(model, toy.random_inputs(rng))
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
        assert_close_to_scale(self.run(peftcore_backend, model, inputs), reference_forward(toy, weights, inputs))

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
        assert_close_to_scale(got, self.expected(toy, weights, inputs, peft_model, "default"))

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
        exported = peft_model.export_adapter("default")
        assert set(exported) == set(tensors) == set(peft_model.plans["default"].tensor_specs())
        for key, value in tensors.items():
            np.testing.assert_array_equal(np.asarray(exported[key]), value)

    def test_merge_unmerge_restores_base_exactly(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.wrap(peftcore_backend, toy, weights, inputs, r=4)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        unmerged = self.run(peftcore_backend, peft_model, inputs)
        self.assert_merge_cycles(peftcore_backend, peft_model, inputs, unmerged)
        with peft_model.disable_adapter():
            assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), reference_forward(toy, weights, inputs))

    def test_multiple_adapters(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.wrap(peftcore_backend, toy, weights, inputs, r=2)
        peft_model.add_adapter("other", LoraConfig(target_modules=[toy.layers[-1].name], r=5, lora_alpha=3))
        self.randomise(peftcore_backend, peft_model, "default", rng)
        self.randomise(peftcore_backend, peft_model, "other", rng)
        assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), self.expected(toy, weights, inputs, peft_model, "default"))
        peft_model.set_adapter("other")
        assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), self.expected(toy, weights, inputs, peft_model, "other"))
        peft_model.set_adapter(["default", "other"])
        both = self.expected(toy, weights, inputs, peft_model, "default", "other")
        assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), both)
        peft_model.delete_adapter("other")
        assert list(peft_model.peft_config) == ["default"]
        assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), self.expected(toy, weights, inputs, peft_model, "default"))

    def test_save_load_round_trip(self, peftcore_backend: Backend, toy: ToySpec, rng: Any, tmp_path: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.wrap(peftcore_backend, toy, weights, inputs, r=3)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        expected = self.run(peftcore_backend, peft_model, inputs)
        peft_model.save_pretrained(str(tmp_path))
        loaded = self.load_saved(peftcore_backend, toy, weights, inputs, tmp_path)
        assert_close_to_scale(self.run(peftcore_backend, loaded, inputs), expected)
        assert loaded.get_nb_trainable_parameters()[0] == 0

    def test_lora_bias_all_trains_the_base_biases_in_place(
        self, peftcore_backend: Backend, toy: ToySpec, rng: Any, tmp_path: Any
    ) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        peft_model = self.wrap(peftcore_backend, toy, weights, inputs, r=2, bias="all")
        biased = [s.name for s in toy.layers if s.kind == "linear" and s.bias]
        assert sorted(op.path for op in peft_model.plans["default"].ops if op.op == "base_bias") == sorted(biased)
        assert peft_model.get_nb_trainable_parameters()[0] == peft_model.plans["default"].num_trainable()
        self.randomise(peftcore_backend, peft_model, "default", rng)  # trained factors and biases
        expected = self.expected(toy, weights, inputs, peft_model, "default")
        assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), expected)
        peft_model.save_pretrained(str(tmp_path))
        loaded = self.load_saved(peftcore_backend, toy, weights, inputs, tmp_path)
        assert_close_to_scale(self.run(peftcore_backend, loaded, inputs), expected)

    def test_unload_and_merge_and_unload(self, peftcore_backend: Backend, toy: ToySpec, rng: Any) -> None:
        weights, inputs = toy.random_weights(rng), toy.random_inputs(rng)
        base_out = reference_forward(toy, weights, inputs)
        peft_model = self.wrap(peftcore_backend, toy, weights, inputs, r=2)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        adapted = self.expected(toy, weights, inputs, peft_model, "default")
        merged_model = peft_model.merge_and_unload()
        assert_close_to_scale(self.run(peftcore_backend, merged_model, inputs), adapted)
        graph = peftcore_backend.describe(merged_model, inputs)
        assert graph is not None
        assert [n.path for n in graph.of_kind("linear", "embedding")] == [s.name for s in toy.layers]
        second = self.wrap(peftcore_backend, toy, weights, inputs, r=2)
        self.randomise(peftcore_backend, second, "default", rng)
        assert_close_to_scale(self.run(peftcore_backend, second.unload(), inputs), base_out)


class ConformanceSuite(LoraTests, ConvLoraTests, DoraTests, BitFitTests, PromptTests):
    """Every method's backend-independent tests; ``backends`` names the backends to run them on."""
