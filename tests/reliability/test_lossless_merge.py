"""Merging is lossless and safe: bit-identical base weights after any number of
merge/unmerge cycles, reproducible ``merge_and_unload``, and ``safe_merge`` refusing
non-finite adapters before any weight changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
from torch import nn  # noqa: E402

import peftcore  # noqa: E402
from peftcore import AdapterError, BackendError, LoraConfig, PeftModel  # noqa: E402
from peftcore.testing.numerics import FLOAT32_RTOL, HALF_RTOL, assert_close_to_scale  # noqa: E402
from peftcore_torch.lora import LoraLinear  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: FLOAT32_RTOL, torch.bfloat16: HALF_RTOL["bfloat16"], torch.float16: HALF_RTOL["float16"]}


def base_model(dtype: Any = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("emb", nn.Embedding(20, 16))
    model.add_module("fc1", nn.Linear(16, 32))
    model.add_module("act", nn.ReLU())
    model.add_module("fc2", nn.Linear(32, 8))
    try:  # GPT-2's Conv1D stores its weight (in, out): the merge must transpose
        from transformers.pytorch_utils import Conv1D

        model.add_module("proj", Conv1D(4, 8))
    except ImportError:
        model.add_module("proj", nn.Linear(8, 4))
    return model.to(dtype)


def config(**changes: Any) -> LoraConfig:
    fields = dict(r=4, lora_alpha=8, target_modules=["emb", "fc1", "fc2", "proj"], init_lora_weights=False)
    return LoraConfig(**{**fields, **changes})


def bits(tensor: Any) -> Any:
    """The raw bits of a tensor (so that -0.0 != 0.0 and NaN payloads count)."""
    view = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.detach().clone().view(view)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Bits of every base parameter, keyed by its name in the plain model."""
    return {k.replace(".base_layer", ""): bits(v) for k, v in model.state_dict().items() if "lora_" not in k}


def assert_bit_identical(now: dict[str, Any], before: dict[str, Any]) -> None:
    assert set(now) == set(before)
    for key in before:
        assert torch.equal(now[key], before[key]), f"{key} changed"


def tokens() -> Any:
    return torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(1))


def train_step(peft_model: PeftModel) -> None:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    loss = peft_model(tokens()).float().tanh().sum()  # bounded gradients, whatever the outputs
    loss.backward()
    with torch.no_grad():
        for p in params:
            p -= 0.05 * p.grad
            p.grad = None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_unmerge_cycles_restore_base_bits(dtype: Any) -> None:
    model = base_model(dtype)
    original = snapshot(model)
    peft_model = peftcore.get_peft_model(model, config())
    peft_model.add_adapter("second", config(r=2, lora_alpha=32, target_modules=["fc1", "proj"]))
    assert_bit_identical(snapshot(peft_model.model), original)
    for _ in range(4):
        expected = peft_model(tokens())
        peft_model.merge_adapter()
        assert snapshot(peft_model.model)["fc1.weight"].ne(original["fc1.weight"]).any()
        merged = peft_model(tokens())
        assert_close_to_scale(merged, expected, rtol=RTOL[dtype])
        peft_model.merge_adapter(["second"])  # a second merge on top of the first
        with peft_model.disable_adapter():  # unmerges for the block, merges again after it
            assert_bit_identical(snapshot(peft_model.model), original)
        assert peft_model.merged_adapters == ["default", "second"]
        peft_model.unmerge_adapter()
        assert_bit_identical(snapshot(peft_model.model), original)
        peft_model.merge_adapter(["second", "default"])
        peft_model.unmerge_adapter()
        assert_bit_identical(snapshot(peft_model.model), original)
        train_step(peft_model)  # new adapter values for the next cycle


def save_base(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_base(path: Path, dtype: Any) -> nn.Module:
    from safetensors.torch import load_file

    model = base_model(dtype, seed=123)  # different random init, replaced by the file
    model.load_state_dict(load_file(str(path)))
    return model


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_and_unload_is_reproducible_from_a_fresh_base(dtype: Any, tmp_path: Path) -> None:
    save_base(base_model(dtype), tmp_path / "base.safetensors")
    peft_model = peftcore.get_peft_model(load_base(tmp_path / "base.safetensors", dtype), config())
    train_step(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = peft_model(tokens())
    merged = peft_model.merge_and_unload()
    assert not any("lora" in type(m).__name__.lower() for m in merged.modules())
    assert set(merged.state_dict()) == set(base_model(dtype).state_dict())
    assert_close_to_scale(merged(tokens()), expected, rtol=RTOL[dtype])

    again = PeftModel.from_pretrained(load_base(tmp_path / "base.safetensors", dtype), tmp_path / "adapter")
    merged_again = again.merge_and_unload()
    assert_bit_identical(snapshot(merged_again), snapshot(merged))
    assert torch.equal(merged_again(tokens()), merged(tokens()))

    # the merged model saved and loaded as a plain base gives identical results
    save_base(merged, tmp_path / "merged.safetensors")
    reloaded = load_base(tmp_path / "merged.safetensors", dtype)
    assert torch.equal(reloaded(tokens()), merged(tokens()))
    # and the original base file was never touched
    fresh = load_base(tmp_path / "base.safetensors", dtype)
    assert_bit_identical(snapshot(fresh), snapshot(base_model(dtype)))


# -- safe_merge -----------------------------------------------------------------------------------
def poisoned(tmp_path: Path, layer: str, tensor: str, value: float, dtype: Any = torch.float32) -> PeftModel:
    """A model whose adapter (loaded from disk) has ``value`` somewhere in ``layer.tensor``."""
    source = peftcore.get_peft_model(base_model(dtype), config())
    with torch.no_grad():
        getattr(source.model.get_submodule(layer), tensor)["default"].weight[0, 0] = value
    source.save_pretrained(tmp_path / "poisoned")
    return PeftModel.from_pretrained(base_model(dtype), tmp_path / "poisoned", allow_non_finite=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("merge", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_refuses_non_finite_adapters_before_touching_weights(tmp_path: Path, value: float, merge: str) -> None:
    peft_model = poisoned(tmp_path, "fc2", "lora_B", value)
    before = snapshot(peft_model.model)
    with pytest.raises(AdapterError, match=r"The adapter default seems to be broken: tensor 'fc2.lora_B' has 1 NaN/Inf value"):
        getattr(peft_model, merge)(safe_merge=True)
    assert_bit_identical(snapshot(peft_model.model), before)
    assert peft_model.merged_adapters == [] and list(peft_model.peft_config) == ["default"]
    # without safe_merge the merge goes ahead, and unmerging still restores every bit
    peft_model.merge_adapter()
    assert not torch.isfinite(peft_model.model.fc2.base_layer.weight).all()
    peft_model.unmerge_adapter()
    assert_bit_identical(snapshot(peft_model.model), before)


def test_safe_merge_refuses_a_delta_that_overflows_the_layer_dtype(tmp_path: Path) -> None:
    peft_model = poisoned(tmp_path, "fc1", "lora_A", 3e4, dtype=torch.float16)  # finite, but 2*B*A > 65504
    with torch.no_grad():
        peft_model.model.fc1.lora_B["default"].weight.fill_(2.0)
    before = snapshot(peft_model.model)
    with pytest.raises(AdapterError, match=r"adapter 'default': merging tensors 'fc1.lora_A' and 'fc1.lora_B'.*float16.*overflows"):
        peft_model.merge_adapter(safe_merge=True)
    assert_bit_identical(snapshot(peft_model.model), before)
    # the same values fit a float32 layer
    wide = poisoned(tmp_path, "fc1", "lora_A", 3e4, dtype=torch.float32)
    wide.merge_adapter(safe_merge=True)
    assert wide.merged_adapters == ["default"]


def test_safe_merge_counts_adapters_already_merged(tmp_path: Path) -> None:
    peft_model = peftcore.get_peft_model(base_model(torch.float16), config(r=1, target_modules=["fc1"]))
    peft_model.add_adapter("twin", config(r=1, target_modules=["fc1"]))
    with torch.no_grad():
        for name in ("default", "twin"):
            peft_model.model.fc1.lora_A[name].weight.fill_(75.0)
            peft_model.model.fc1.lora_B[name].weight.fill_(60.0)  # each delta 8 * 75 * 60 = 36000 < 65504, together not
    peft_model.merge_adapter(["default"], safe_merge=True)
    with pytest.raises(AdapterError, match="adapter 'twin'.*overflows"):
        peft_model.merge_adapter(["twin"], safe_merge=True)
    assert peft_model.merged_adapters == ["default"]


def test_safe_merge_of_a_sound_adapter_equals_a_plain_merge() -> None:
    plain = peftcore.get_peft_model(base_model(), config())
    checked = peftcore.get_peft_model(base_model(), config())
    checked.model.load_state_dict(plain.model.state_dict())
    plain.merge_adapter()
    checked.merge_adapter(safe_merge=True)
    assert_bit_identical(snapshot(checked.model), snapshot(plain.model))


def test_a_merge_failing_part_way_puts_every_weight_back(monkeypatch: pytest.MonkeyPatch) -> None:
    peft_model = peftcore.get_peft_model(base_model(), config())
    peft_model.add_adapter("second", config(r=2))
    original = snapshot(peft_model.model)
    peft_model.merge_adapter(["default"])
    after_first = snapshot(peft_model.model)
    real: Callable[..., Any] = LoraLinear.delta_weight

    def failing(self: LoraLinear, adapter_name: str) -> Any:
        if self is peft_model.model.fc2 and adapter_name == "second":  # fc1 is merged by then
            raise RuntimeError("device lost")
        return real(self, adapter_name)

    monkeypatch.setattr(LoraLinear, "delta_weight", failing)
    with pytest.raises(BackendError, match="device lost"):
        peft_model.merge_adapter(["second"])
    assert peft_model.merged_adapters == ["default"]
    assert_bit_identical(snapshot(peft_model.model), after_first)
    monkeypatch.setattr(LoraLinear, "delta_weight", real)
    peft_model.unmerge_adapter()
    assert_bit_identical(snapshot(peft_model.model), original)
    np.testing.assert_array_equal(  # and the adapter still works
        peft_model(tokens()).detach().numpy(), peft_model(tokens()).detach().numpy()
    )
