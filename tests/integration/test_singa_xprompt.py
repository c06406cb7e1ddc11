"""XPrompt on SINGA: the same scores and masks as on torch for the same toy model.

Skips, with the reason, where ``import singa`` (or torch, the reference here) fails.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peftcore import PromptTuningConfig, XPromptConfig, get_peft_model, xprompt_prune
from peftcore.plugins import get_plugin_manager
from peftcore.testing.numerics import assert_close_to_scale
from peftcore.testing.toys import TOKEN_MODEL

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def singa_backend() -> Any:
    from peftcore_singa.plugin import peftcore_backend

    info = peftcore_backend().info()
    if not info.available:
        pytest.skip(f"peftcore backend 'singa' unavailable: {info.reason}")
    return get_plugin_manager().get_backend("singa")


def _setup(backend_name: str, weights: dict, prompt: np.ndarray) -> Any:
    backend = get_plugin_manager().get_backend(backend_name)
    model = backend.conformance_kit().build(TOKEN_MODEL, weights)
    inputs = np.zeros(TOKEN_MODEL.input_shape, dtype=np.int64)
    peft = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=len(prompt)), backend=backend_name, example_inputs=inputs)
    peft.import_adapter("default", {"embed.prompt_embeddings": prompt})
    return peft


def _loss_for(backend_name: str, targets: np.ndarray) -> Any:
    if backend_name == "torch":
        def torch_loss(peft: Any, batch: np.ndarray) -> Any:
            out = peft(torch.from_numpy(batch))
            return torch.nn.functional.mse_loss(out, torch.from_numpy(targets))

        return torch_loss
    from singa import autograd

    from peftcore_singa.describe import model_device, to_tensor

    def singa_loss(peft: Any, batch: np.ndarray) -> Any:
        autograd.training = True
        device = model_device(peft.model)
        return autograd.mse_loss(peft.model.forward(to_tensor(batch, device)), to_tensor(targets, device))

    return singa_loss


def test_singa_gradients_and_xprompt_masks_match_torch(singa_backend: Any) -> None:
    rng = np.random.default_rng(5)
    weights = TOKEN_MODEL.random_weights(rng)
    prompt = (rng.standard_normal((6, 8)) * 0.5).astype(np.float32)
    batches = [TOKEN_MODEL.random_inputs(rng) for _ in range(3)]
    targets = rng.standard_normal((TOKEN_MODEL.input_shape[0], 3)).astype(np.float32)
    models = {name: _setup(name, weights, prompt) for name in ("torch", "singa")}
    grads = {
        name: peft.adapter_gradients("default", _loss_for(name, targets)(peft, batches[0]))["embed.prompt_embeddings"]
        for name, peft in models.items()
    }
    assert_close_to_scale(grads["singa"], grads["torch"])
    config = XPromptConfig(token_ratio=0.5, piece_ratio=0.5, num_pieces=2, rounds=2)
    results = {
        name: xprompt_prune(peft, batches, _loss_for(name, targets), config, progress=False) for name, peft in models.items()
    }
    np.testing.assert_array_equal(results["singa"].token_mask, results["torch"].token_mask)
    np.testing.assert_array_equal(results["singa"].piece_mask, results["torch"].piece_mask)
    assert results["singa"].num_pruned_tokens == 3 and (results["singa"].piece_mask == 0).sum() == 3
    outputs = {
        name: peft.backend.conformance_kit().forward(peft.model, batches[0]) for name, peft in models.items()
    }
    assert_close_to_scale(outputs["singa"], outputs["torch"])
