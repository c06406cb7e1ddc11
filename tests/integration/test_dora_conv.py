"""DoRA (``use_dora=True``) on torch's ``Conv1d``, ``Conv2d`` and ``Conv3d`` against the real
Hugging Face PEFT, on small CNNs with seeded weights (both convolutions adapted, the
second strided and padded).

For each dimension: the output at init is the base model's and the magnitude is HF's
(shaped ``(1, out, 1, ...)`` as HF saves it); adapters saved by either library load in
the other with the same outputs; merge and unmerge leave the base weights bit-identical
and merging gives HF's merged weights; training lowers the loss and changes only A, B
and the magnitude; the gradients of all three are HF's on the same batch, with and
without dropout. A grouped convolution is refused with the reason (HF PEFT accepts it
with a norm that is not of the adapter's change), and a mixed-adapter batch naming a
DoRA adapter is refused as for a linear layer.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from dora_checks import check_files_move_both_ways, check_merge_is_exact_and_as_hf, trained_like  # noqa: E402
from torch import nn  # noqa: E402

import peftcore  # noqa: E402
from peftcore.errors import AdapterError, PlanError  # noqa: E402
from peftcore.testing.numerics import FLOAT32_RTOL, assert_close_to_scale  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
#: input side length per number of spatial axes (small enough for Conv3d on shared CPUs)
SIDE = {1: 12, 2: 9, 3: 6}
DIMS = [1, 2, 3]


class DoraCNN(nn.Module):
    """conv -> relu -> conv (stride 2, padding 1) -> relu -> mean over space -> linear head."""

    def __init__(self, dims: int, groups: int = 1) -> None:
        super().__init__()
        conv = CONVS[dims]
        self.stem = conv(3, 4, 3, padding=1)
        self.body = conv(4, 6, 3, stride=2, padding=1, groups=groups)
        self.head = nn.Linear(6, 5)
        self.dims = dims

    def forward(self, x: Any) -> Any:
        hidden = torch.relu(self.body(torch.relu(self.stem(x))))
        return self.head(hidden.mean(dim=tuple(range(2, 2 + self.dims))))


def cnn(dims: int, groups: int = 1) -> DoraCNN:
    torch.manual_seed(0)
    return DoraCNN(dims, groups).eval()


def inputs(dims: int, batch: int = 4, seed: int = 1) -> Any:
    return torch.randn(batch, 3, *(SIDE[dims],) * dims, generator=torch.Generator().manual_seed(seed))


def _config(module: Any, **extra: Any) -> Any:
    return module.LoraConfig(r=4, lora_alpha=8, target_modules=["stem", "body"], use_dora=True, **extra)


def _ours(base: Any, **extra: Any) -> Any:
    return peftcore.get_peft_model(copy.deepcopy(base), _config(peftcore, **extra))


def _hf(base: Any, **extra: Any) -> Any:
    return peft.get_peft_model(copy.deepcopy(base), _config(peft, **extra))


def _out(model: Any, x: Any) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def _loss(model: Any, x: Any) -> Any:
    return model(x).square().mean()


@pytest.mark.parametrize("dims", DIMS)
def test_output_is_the_base_at_init_with_hf_magnitude(dims: int) -> None:
    base, x = cnn(dims), inputs(dims)
    ours, theirs = _ours(base), _hf(base)
    np.testing.assert_array_equal(_out(ours, x), _out(base, x))
    hf_state = theirs.state_dict()
    magnitudes = {k: v for k, v in ours.state_dict().items() if "lora_magnitude_vector" in k}
    assert len(magnitudes) == 2 and set(magnitudes) == {k for k in hf_state if "lora_magnitude_vector" in k}
    for key, value in magnitudes.items():
        assert value.shape == hf_state[key].shape == (1, value.shape[1], *(1,) * dims)
        assert_close_to_scale(value.numpy(), hf_state[key].numpy(), FLOAT32_RTOL, err_msg=key)


@pytest.mark.parametrize("dims", DIMS)
def test_files_move_both_ways(dims: int, tmp_path: Path) -> None:
    base, x = cnn(dims), inputs(dims)
    check_files_move_both_ways(base, _ours(base), _hf(base), lambda model: _out(model, x), tmp_path)


@pytest.mark.parametrize("dims", DIMS)
def test_merge_unmerge_is_exact_and_merges_as_hf(dims: int) -> None:
    base, x = cnn(dims), inputs(dims)
    ours = _ours(base)
    trained_like(ours)
    theirs = _hf(base)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    check_merge_is_exact_and_as_hf(ours, theirs, lambda model: _out(model, x))


@pytest.mark.parametrize("dims", DIMS)
def test_the_core_delta_is_the_layer_s_merge(dims: int) -> None:
    """The backend-free ``delta(tensors, base)`` of the plan op is the change the torch
    layer merges (the core's DoRA maths on a convolution's canonical layout)."""
    base = cnn(dims)
    ours = _ours(base)
    trained_like(ours)
    layer = ours.base_model.model.body
    op = next(op for op in ours.plans["default"].ops if getattr(op, "path", None) == "body")
    tensors = {
        "lora_A": layer.lora_A["default"].weight.detach().numpy(),
        "lora_B": layer.lora_B["default"].weight.detach().numpy(),
        "lora_magnitude_vector": layer.lora_magnitude_vector["default"].weight.detach().numpy(),
    }
    weight = layer.base_layer.weight.detach().numpy()
    assert op.delta(tensors) is None  # DoRA's change needs the base weight
    core = op.delta(tensors, weight)
    assert_close_to_scale(core, layer.get_delta_weight("default").detach().numpy(), FLOAT32_RTOL)


@pytest.mark.parametrize("dims", DIMS)
def test_training_lowers_the_loss_and_changes_only_the_adapter(dims: int) -> None:
    base, x = cnn(dims), inputs(dims, batch=6)
    model = _ours(base, lora_dropout=0.1)
    model.train()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(
        any(part in n for part in ("lora_A", "lora_B", "lora_magnitude_vector")) for n in trainable
    )
    assert sum("lora_magnitude_vector" in n for n in trainable) == 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(x.shape[0], 5, generator=torch.Generator().manual_seed(9))
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert sum("lora_magnitude_vector" in k for k in changed) == 2


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_gradients_match_hf(dims: int, dropout: float) -> None:
    """With dropout, DoRA needs the base convolution of the dropped input apart from the
    base output; on the same RNG stream both libraries draw the same masks."""
    base, x = cnn(dims), inputs(dims)
    ours = _ours(base, lora_dropout=dropout)
    trained_like(ours)
    theirs = _hf(base, lora_dropout=dropout)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    losses = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(7)
        loss = _loss(model, x)
        loss.backward()
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    their_params = dict(theirs.named_parameters())
    compared = 0
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            assert_close_to_scale(param.grad.numpy(), their_params[name].grad.numpy(), FLOAT32_RTOL, err_msg=name)
            compared += 1
    assert compared == sum(p.requires_grad for p in theirs.parameters()) == 6


def test_a_grouped_convolution_is_refused_with_the_reason() -> None:
    base = cnn(2, groups=2)
    with pytest.raises(PlanError, match=r"DoRA cannot be put on conv layer 'body' with groups=2"):
        _ours(base)
    assert not any("lora" in name for name, _ in base.named_parameters())
    # the ungrouped stem alone takes DoRA; plain LoRA still goes on the grouped layer
    model = peftcore.get_peft_model(copy.deepcopy(base), peftcore.LoraConfig(r=4, target_modules=["stem"], use_dora=True))
    assert [op.path for op in model.plans["default"].ops if getattr(op, "use_dora", False)] == ["stem"]
    peftcore.get_peft_model(copy.deepcopy(base), peftcore.LoraConfig(r=4, target_modules=["stem", "body"]))


def test_mixed_batch_with_dora_is_refused() -> None:
    base, x = cnn(2), inputs(2, batch=3)
    ours = _ours(base)
    ours.add_adapter("plain", peftcore.LoraConfig(r=2, target_modules=["body"], init_lora_weights=False))
    with pytest.raises(AdapterError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        ours(x, adapter_names=["default", "plain", "__base__"])
