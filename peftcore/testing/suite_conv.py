"""The conformance tests of LoRA on convolutions, on the toy CNN (:data:`~peftcore.testing.toys.CNN`).

The reference is numpy's: the adapter's change to each conv weight is the op's own
:meth:`~peftcore.methods.lora_conv.AddLoraConv.delta` over the exported tensors, added
to the weight of :func:`~peftcore.testing.toys.conv2d_reference`. A backend that does not
build LoRA on convolutions sets ``conv_lora_skip`` to its reason on its test class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peftcore.plugins import Backend
from peftcore.testing.numerics import assert_close_to_scale
from peftcore.testing.suite_base import SuiteBase
from peftcore.testing.toys import CNN, ToySpec, reference_forward


class ConvLoraTests(SuiteBase):
    """LoRA on the toy CNN's convolutions (and its linear head)."""

    #: Why this backend skips LoRA on convolutions ("" runs the tests).
    conv_lora_skip: str = ""

    @pytest.fixture
    def cnn(self) -> ToySpec:
        if self.conv_lora_skip:
            pytest.skip(self.conv_lora_skip)
        return CNN

    def test_conv_lora_at_init_is_exactly_the_base(self, peftcore_backend: Backend, cnn: ToySpec, rng: Any) -> None:
        weights, inputs = cnn.random_weights(rng), cnn.random_inputs(rng)
        base_out = self.run(peftcore_backend, self.build(peftcore_backend, cnn, weights), inputs)
        assert_close_to_scale(base_out, reference_forward(cnn, weights, inputs))
        peft_model = self.wrap(peftcore_backend, cnn, weights, inputs, r=4, lora_alpha=8)
        assert [op.op for op in peft_model.plans["default"].ops].count("lora_conv") == 2
        np.testing.assert_array_equal(self.run(peftcore_backend, peft_model, inputs), base_out)

    def test_conv_lora_matches_reference(self, peftcore_backend: Backend, cnn: ToySpec, rng: Any) -> None:
        weights, inputs = cnn.random_weights(rng), cnn.random_inputs(rng)
        peft_model = self.wrap(peftcore_backend, cnn, weights, inputs, r=2, lora_alpha=6, use_rslora=True)
        tensors = self.randomise(peftcore_backend, peft_model, "default", rng)
        assert tensors["conv1.lora_A"].shape == (2, 2, 3, 3) and tensors["block.conv2.lora_B"].shape == (6, 2, 1, 1)
        expected = self.expected(cnn, weights, inputs, peft_model, "default")
        assert_close_to_scale(self.run(peftcore_backend, peft_model, inputs), expected)
        assert not np.allclose(expected, reference_forward(cnn, weights, inputs), atol=1e-3)

    def test_conv_merge_unmerge_restores_base_exactly(self, peftcore_backend: Backend, cnn: ToySpec, rng: Any) -> None:
        weights, inputs = cnn.random_weights(rng), cnn.random_inputs(rng)
        peft_model = self.wrap(peftcore_backend, cnn, weights, inputs, r=4)
        self.randomise(peftcore_backend, peft_model, "default", rng)
        unmerged = self.run(peftcore_backend, peft_model, inputs)
        self.assert_merge_cycles(peftcore_backend, peft_model, inputs, unmerged, cycles=2)
        merged = peft_model.merge_and_unload()
        assert_close_to_scale(self.run(peftcore_backend, merged, inputs), unmerged)

    def test_conv_save_load_round_trip(self, peftcore_backend: Backend, cnn: ToySpec, rng: Any, tmp_path: Any) -> None:
        weights, inputs = cnn.random_weights(rng), cnn.random_inputs(rng)
        peft_model = self.wrap(peftcore_backend, cnn, weights, inputs, r=3)
        tensors = self.randomise(peftcore_backend, peft_model, "default", rng)
        exported = self.exported(peft_model, "default")
        assert set(exported) == set(tensors)
        for key, value in tensors.items():
            np.testing.assert_array_equal(exported[key], value)
        expected = self.run(peftcore_backend, peft_model, inputs)
        peft_model.save_pretrained(str(tmp_path))
        loaded = self.load_saved(peftcore_backend, cnn, weights, inputs, tmp_path)
        assert_close_to_scale(self.run(peftcore_backend, loaded, inputs), expected)
