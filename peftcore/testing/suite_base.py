"""Fixtures and helpers the conformance test classes share."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peftcore.api import PeftModel, get_peft_model
from peftcore.config import PeftConfig
from peftcore.methods.lora import LoraConfig
from peftcore.plugins import Backend
from peftcore.testing.numerics import assert_close_to_scale
from peftcore.testing.toys import TOY_SPECS, ToySpec, adapter_effects, reference_forward


class SuiteBase:
    """Fixtures and helpers; ``backends`` names the backends the tests run on."""

    backends: list = []

    @pytest.fixture(params=TOY_SPECS, ids=[s.name for s in TOY_SPECS])
    def toy(self, request: Any) -> ToySpec:
        return request.param

    @pytest.fixture
    def rng(self) -> np.random.Generator:
        return np.random.default_rng(1234)

    # -- helpers --------------------------------------------------------------------------
    def build(self, backend: Backend, spec: ToySpec, weights: dict) -> Any:
        return backend.conformance_kit().build(spec, weights)

    def run(self, backend: Backend, model: Any, inputs: np.ndarray) -> np.ndarray:
        native = model.get_base_model() if isinstance(model, PeftModel) else model
        return np.asarray(backend.conformance_kit().forward(native, inputs), dtype=np.float64)

    def wrap(self, backend: Backend, spec: ToySpec, weights: dict, inputs: np.ndarray, **lora: Any) -> PeftModel:
        config = LoraConfig(target_modules=[s.name for s in spec.layers], **lora)
        return self.wrap_with(backend, spec, weights, inputs, config)

    def wrap_with(self, backend: Backend, spec: ToySpec, weights: dict, inputs: np.ndarray, config: PeftConfig) -> PeftModel:
        return get_peft_model(self.build(backend, spec, weights), config, backend=backend.name, example_inputs=inputs)

    def load_saved(
        self, backend: Backend, spec: ToySpec, weights: dict, inputs: np.ndarray, directory: Any, is_trainable: bool = False
    ) -> PeftModel:
        """The adapter saved in ``directory``, loaded onto a fresh build of ``spec``."""
        return PeftModel.from_pretrained(
            self.build(backend, spec, weights), str(directory), backend=backend.name, example_inputs=inputs, is_trainable=is_trainable
        )

    def randomise(self, backend: Backend, peft_model: PeftModel, adapter: str, rng: np.random.Generator) -> dict:
        tensors = {
            key: (rng.standard_normal(spec.shape) * 0.2).astype(np.float32)
            for key, spec in peft_model.plans[adapter].tensor_specs().items()
        }
        peft_model.import_adapter(adapter, tensors)
        return tensors

    def exported(self, peft_model: PeftModel, adapter: str) -> dict:
        tensors = peft_model.export_adapter(adapter)
        return {key: np.asarray(value) for key, value in tensors.items()}

    def expected(self, spec: ToySpec, weights: dict, inputs: np.ndarray, peft_model: PeftModel, *adapters: str) -> np.ndarray:
        """The numpy reference output with ``adapters`` active, from their exported tensors."""
        effects = [adapter_effects(peft_model.plans[a], self.exported(peft_model, a), weights) for a in adapters]
        return reference_forward(spec, weights, inputs, effects=effects)

    def assert_merge_cycles(
        self, backend: Backend, peft_model: PeftModel, inputs: np.ndarray, adapted: np.ndarray, cycles: int = 1
    ) -> None:
        """``cycles`` times: merged, the output is ``adapted`` (to float rounding); unmerged
        again, it is ``adapted`` exactly."""
        for _ in range(cycles):
            peft_model.merge_adapter()
            assert_close_to_scale(self.run(backend, peft_model, inputs), adapted)
            peft_model.unmerge_adapter()
            np.testing.assert_array_equal(self.run(backend, peft_model, inputs), adapted)
