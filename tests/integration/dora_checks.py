"""Checks the DoRA test files share (``test_dora.py`` on Linear/Conv1D/Embedding,
``test_dora_conv.py`` on convolutions): adapters given trained-like values, saved files
read by the other library, and the exact merge/unmerge cycle compared with HF PEFT's
merge. Imports torch: import it only
from test modules that skip without torch."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import numpy as np
import peft
import torch

import peftcore
from peftcore.testing.numerics import FLOAT32_RTOL, assert_close_to_scale


def trained_like(model: Any, seed: int = 3) -> None:
    """Give every A, B and magnitude a random value, as after training (the magnitude
    near its initial norm)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.rand(param.shape, generator=generator))
            elif "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def check_files_move_both_ways(
    base: Any, ours: Any, theirs: Any, output: Callable[[Any], np.ndarray], tmp_path: Path
) -> None:
    """``ours`` (peftcore) and ``theirs`` (HF PEFT), both DoRA on copies of ``base``, given
    trained-like values and saved: HF loads our files and peftcore HF's, each giving the
    saver's ``output``."""
    trained_like(ours)
    ours.save_pretrained(str(tmp_path / "ours"))
    loaded_by_hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert_close_to_scale(output(loaded_by_hf), output(ours), FLOAT32_RTOL)

    trained_like(theirs, seed=5)
    theirs.save_pretrained(str(tmp_path / "hf"))
    loaded = peftcore.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "hf"))
    assert loaded.peft_config["default"].use_dora is True
    assert_close_to_scale(output(loaded), output(theirs.eval()), FLOAT32_RTOL)


def check_merge_is_exact_and_as_hf(ours: Any, theirs: Any, output: Callable[[Any], np.ndarray]) -> None:
    """``ours`` (peftcore) and ``theirs`` (HF PEFT, loaded with ours' tensors) give the
    same ``output``; three merge/unmerge cycles keep the output and leave every base
    tensor bit-identical; ``merge_and_unload`` keeps the output and gives HF's merged
    weights, key for key."""
    before = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    unmerged = output(ours)
    assert_close_to_scale(unmerged, output(theirs), FLOAT32_RTOL)
    for _ in range(3):
        ours.merge_adapter()
        assert_close_to_scale(output(ours), unmerged, FLOAT32_RTOL)
        ours.unmerge_adapter()
        after = {k: v for k, v in ours.state_dict().items() if "lora_" not in k}
        assert all(torch.equal(before[k], after[k]) for k in before)
    np.testing.assert_array_equal(output(ours), unmerged)
    merged, hf_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    assert_close_to_scale(output(merged), unmerged, FLOAT32_RTOL)
    hf_weights = hf_merged.state_dict()
    assert set(merged.state_dict()) == set(hf_weights)
    for key, value in merged.state_dict().items():
        assert_close_to_scale(value.numpy(), hf_weights[key].numpy(), FLOAT32_RTOL, err_msg=key)
