"""Conformance tests for prompt tuning and residual prompt tuning (mixed into
:class:`~peftcore.testing.ConformanceSuite`); they run on the toy model with an
embedding input."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from peftcore.errors import AdapterError
from peftcore.methods.p_tuning import PromptEncoderConfig
from peftcore.methods.prompt_tuning import AddPrompt, PromptTuningConfig, ResidualPromptTuningConfig
from peftcore.peft_model import PeftModel, wrap_model
from peftcore.plan import RewritePlan
from peftcore.plugins import Backend
from peftcore.testing.numerics import assert_close_to_scale
from peftcore.testing.suite_base import SuiteBase
from peftcore.testing.toys import TOKEN_MODEL, reference_forward

PROMPT_CONFIGS = {
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=3),
    "residual": lambda: ResidualPromptTuningConfig(num_virtual_tokens=3, bottleneck_size=5, activation="tanh"),
    "residual-separate": lambda: ResidualPromptTuningConfig(
        num_virtual_tokens=2, bottleneck_size=4, layer_norm=False, separate_mlps=True, dropout=0.1
    ),
}


class PromptTests(SuiteBase):
    """Prompt tuning (plain and residual) on the token toy model."""

    @pytest.fixture(params=sorted(PROMPT_CONFIGS))
    def prompt_config(self, request: Any) -> Any:
        return PROMPT_CONFIGS[request.param]()

    def prompted(self, backend: Backend, config: Any, rng: Any) -> tuple[PeftModel, dict, np.ndarray]:
        weights, inputs = TOKEN_MODEL.random_weights(rng), TOKEN_MODEL.random_inputs(rng)
        return self.wrap_with(backend, TOKEN_MODEL, weights, inputs, config), weights, inputs

    def test_prompt_trainable_count(self, peftcore_backend: Backend, prompt_config: Any, rng: Any) -> None:
        peft_model, _, _ = self.prompted(peftcore_backend, prompt_config, rng)
        trainable, total = peft_model.get_nb_trainable_parameters()
        width = TOKEN_MODEL.steps[0].out_dim
        assert trainable == peft_model.plans["default"].num_trainable()
        if not isinstance(prompt_config, ResidualPromptTuningConfig):
            assert trainable == prompt_config.num_virtual_tokens * width
        assert total == trainable + sum(int(np.prod(s)) for s in TOKEN_MODEL.weight_shapes().values())

    def test_prompt_matches_reference(self, peftcore_backend: Backend, prompt_config: Any, rng: Any) -> None:
        peft_model, weights, inputs = self.prompted(peftcore_backend, prompt_config, rng)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        got = self.run(peftcore_backend, peft_model, inputs)
        assert_close_to_scale(got, self.expected(TOKEN_MODEL, weights, inputs, peft_model, "default"))
        with peft_model.disable_adapter():
            assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), reference_forward(TOKEN_MODEL, weights, inputs))

    @pytest.mark.parametrize("kind", ["MLP", "LSTM"])
    def test_p_tuning_matches_reference(self, peftcore_backend: Backend, kind: str, rng: Any, tmp_path: Any) -> None:
        if "prompt_encoder" not in peftcore_backend.ops():
            pytest.skip(f"backend {peftcore_backend.name!r} does not build P-tuning's prompt_encoder op")
        config = PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type=kind, encoder_hidden_size=4)
        peft_model, weights, inputs = self.prompted(peftcore_backend, config, rng)
        assert peft_model.get_nb_trainable_parameters()[0] == peft_model.plans["default"].num_trainable()
        self.randomise(peftcore_backend, peft_model, "default", rng)
        expected = self.expected(TOKEN_MODEL, weights, inputs, peft_model, "default")
        assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), expected)
        peft_model.save_pretrained(str(tmp_path))
        loaded = self.load_saved(peftcore_backend, TOKEN_MODEL, weights, inputs, tmp_path)
        assert_close_to_scale(self.run(peftcore_backend, loaded, inputs), expected)

    def test_prompt_cannot_merge(self, peftcore_backend: Backend, rng: Any) -> None:
        peft_model, _, inputs = self.prompted(peftcore_backend, PromptTuningConfig(num_virtual_tokens=2), rng)
        before = self.run(peftcore_backend, peft_model, inputs)
        with pytest.raises(AdapterError, match="cannot be merged"):
            peft_model.merge_adapter()
        with pytest.raises(AdapterError, match="cannot be merged"):
            peft_model.merge_and_unload()
        np.testing.assert_array_equal(self.run(peftcore_backend, peft_model, inputs), before)

    def test_prompt_save_load_resume(self, peftcore_backend: Backend, prompt_config: Any, rng: Any, tmp_path: Any) -> None:
        peft_model, weights, inputs = self.prompted(peftcore_backend, prompt_config, rng)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        expected = self.run(peftcore_backend, peft_model, inputs)
        peft_model.save_pretrained(str(tmp_path))
        for trainable in (False, True):
            loaded = self.load_saved(peftcore_backend, TOKEN_MODEL, weights, inputs, tmp_path, is_trainable=trainable)
            assert_close_to_scale(self.run(peftcore_backend, loaded, inputs), expected)
            count = loaded.get_nb_trainable_parameters()[0]
            assert count == (peft_model.plans["default"].num_trainable() if trainable else 0)

    def test_residual_prompt_bakes_to_the_same_outputs(self, peftcore_backend: Backend, rng: Any, tmp_path: Any) -> None:
        config = ResidualPromptTuningConfig(num_virtual_tokens=3, bottleneck_size=6, dropout=0.2)
        peft_model, weights, inputs = self.prompted(peftcore_backend, config, rng)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        unbaked = self.run(peftcore_backend, peft_model, inputs)
        before = peft_model.plans["default"].num_trainable()
        peft_model.bake()
        assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), unbaked)
        assert type(peft_model.peft_config["default"]) is PromptTuningConfig
        assert peft_model.plans["default"].num_trainable() == 3 * TOKEN_MODEL.steps[0].out_dim < before
        assert set(self.exported(peft_model, "default")) == set(peft_model.plans["default"].tensor_specs())
        peft_model.save_pretrained(str(tmp_path))
        loaded = self.load_saved(peftcore_backend, TOKEN_MODEL, weights, inputs, tmp_path)
        assert_close_to_scale(self.run(peftcore_backend, loaded, inputs), unbaked)

    def test_pruned_prompt_matches_reference(self, peftcore_backend: Backend, rng: Any) -> None:
        """An XPrompt-pruned prompt: two of three tokens kept, half of each one's pieces masked."""
        weights, inputs = TOKEN_MODEL.random_weights(rng), TOKEN_MODEL.random_inputs(rng)
        model = self.build(peftcore_backend, TOKEN_MODEL, weights)
        graph = peftcore_backend.describe(model, inputs)
        assert graph is not None
        config = PromptTuningConfig(num_virtual_tokens=2)
        plan = PromptTuningConfig(num_virtual_tokens=3).plan(graph)
        op = plan.ops_of("prompt_embedding")[0]
        assert isinstance(op, AddPrompt)
        pruned = dataclasses.replace(op, num_virtual_tokens=2, token_mask=(1, 0, 1), piece_mask=((1, 0), (0, 1)))
        plan = RewritePlan(plan.method, "default", tuple(pruned if o is op else o for o in plan.ops))
        peft_model = wrap_model(model, peftcore_backend, example_inputs=inputs)
        peft_model.add_adapter("default", config, plan=plan)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        got = self.run(peftcore_backend, peft_model, inputs)
        assert_close_to_scale(got, self.expected(TOKEN_MODEL, weights, inputs, peft_model, "default"))
