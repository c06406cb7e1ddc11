"""Issue 23 (reliability round 3), the data classes: 3 (what is loaded is finite where
it reaches the outputs), 6 (all-or-nothing multi-tensor writes) and 7 (non-finite
XPrompt scores). Class 4 (bounded matching work) is in ``test_round3_matching.py``.
Tests are named ``test_class<N>_...``; "untouched" always means every tensor of the
model (adapters and base) bit-identical, and the same adapters, plans and configs."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("transformers")

import peftcore  # noqa: E402
from peftcore import AdapterError, LoraConfig, PromptTuningConfig, XPromptConfig, xprompt_prune  # noqa: E402
from tests.integration.tiny import llama_lm, random_ids  # noqa: E402


def snapshot(pm: Any) -> dict[str, Any]:
    """Everything a failed call must leave as it was."""
    return {
        "tensors": {k: v.detach().clone() for k, v in pm.state_dict().items()},
        "plans": dict(pm.plans),
        "configs": {k: v.to_dict() for k, v in pm.peft_config.items()},
        "active": list(pm.active_adapters),
    }


def assert_untouched(pm: Any, before: dict[str, Any]) -> None:
    after = snapshot(pm)
    assert after["plans"] == before["plans"] and after["configs"] == before["configs"]
    assert after["active"] == before["active"]
    assert after["tensors"].keys() == before["tensors"].keys()
    changed = [k for k, v in before["tensors"].items() if not torch.equal(v, after["tensors"][k])]
    assert not changed, f"changed by a failed call: {changed[:5]}"


# -- 7. non-finite XPrompt scores ---------------------------------------------------------
def prompt_model() -> Any:
    config = PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB", task_type="CAUSAL_LM")
    return peftcore.get_peft_model(llama_lm(), config).eval()


def batches() -> list[Any]:
    return [random_ids(2, 5, seed=20 + i) for i in range(3)]


@pytest.mark.parametrize("poison", ["nan_loss", "inf_loss", "nan_on_last_batch", "nan_gradient", "piece_level"])
def test_class7_non_finite_loss_or_scores_refuse_to_prune_and_leave_the_adapter(poison: str) -> None:
    pm = prompt_model()
    before = snapshot(pm)
    calls = {"n": 0}

    def loss_fn(model: Any, batch: Any) -> Any:
        calls["n"] += 1
        loss = model(input_ids=batch, labels=batch).loss
        if poison == "nan_loss" or (poison == "nan_on_last_batch" and calls["n"] == 3):
            return loss * float("nan")
        if poison == "inf_loss":
            return loss + float("inf")
        if poison == "nan_gradient":  # a finite loss whose gradient is NaN (d sqrt(s^2)/ds at 0)
            prompt = model.get_input_embeddings().prompt_embeddings["default"]
            return loss + torch.sqrt((prompt * 0.0).sum() ** 2)
        if poison == "piece_level" and calls["n"] > 3:  # token scores fine, piece scores NaN
            return loss * float("nan")
        return loss

    with pytest.raises(AdapterError, match=r"NaN/Inf.*nothing was pruned") as caught:
        xprompt_prune(pm, batches(), loss_fn, XPromptConfig(token_ratio=0.5, piece_ratio=0.25), progress=False)
    level = "piece" if poison == "piece_level" else "token"
    assert f"{level} level" in str(caught.value) and "'default'" in str(caught.value)
    assert ("importance scores" if poison == "nan_gradient" else "loss") in str(caught.value)
    assert_untouched(pm, before)
    assert pm.plans["default"].ops == before["plans"]["default"].ops
    # still prunable with a sane loss afterwards
    result = xprompt_prune(pm, batches(), lambda m, b: m(input_ids=b, labels=b).loss, XPromptConfig(), progress=False)
    assert result.num_pruned_tokens == 3
