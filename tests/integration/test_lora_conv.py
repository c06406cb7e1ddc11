"""LoRA on torch convolutions (``Conv1d``, ``Conv2d``, ``Conv3d``) against the real Hugging
Face PEFT, on small CNNs built here with seeded weights.

For each layer geometry (plain, stride and padding, ``padding="same"``, a ``1x1`` kernel,
``groups > 1``): an adapter saved by peftcore loads in HF PEFT with the same outputs, and
one saved by HF PEFT loads in peftcore with the same outputs; merge and unmerge are
exact where a merge exists (and refused with the reason where it cannot: a grouped
convolution); training lowers the loss and changes only the adapter; a mixed-adapter
batch routes each row to its adapter.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from torch import nn  # noqa: E402

import peftcore  # noqa: E402
from peftcore.errors import AdapterError, PlanError  # noqa: E402
from peftcore.testing.numerics import FLOAT32_RTOL, assert_close_to_scale  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
#: input side length per number of spatial axes (small enough for Conv3d on shared CPUs)
SIDE = {1: 12, 2: 9, 3: 6}

#: layer geometries of the adapted convolution (the CNN's second conv)
GEOMETRIES = {
    "plain": {"kernel_size": 3},
    "stride_padding": {"kernel_size": 3, "stride": 2, "padding": 1},
    "same": {"kernel_size": 3, "padding": "same"},
    "pointwise": {"kernel_size": 1},
    "groups": {"kernel_size": 3, "padding": 1, "groups": 2},
}


class SmallCNN(nn.Module):
    """conv -> relu -> conv (the adapted one) -> relu -> mean over space -> linear head."""

    def __init__(self, dims: int, **geometry: Any) -> None:
        super().__init__()
        conv = CONVS[dims]
        self.stem = conv(3, 4, 3, padding=1)
        self.body = conv(4, 6, **geometry)
        self.head = nn.Linear(6, 5)
        self.dims = dims

    def forward(self, x: Any) -> Any:
        hidden = torch.relu(self.body(torch.relu(self.stem(x))))
        return self.head(hidden.mean(dim=tuple(range(2, 2 + self.dims))))


def cnn(dims: int, geometry: str) -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(dims, **GEOMETRIES[geometry]).eval()


def inputs(dims: int, batch: int = 4) -> Any:
    return torch.randn(batch, 3, *(SIDE[dims],) * dims, generator=torch.Generator().manual_seed(1))


def lora(**changes: Any) -> dict:
    return {"target_modules": ["stem", "body"], "r": 4, "lora_alpha": 8, "init_lora_weights": False, **changes}


def quiet_forward(model: Any, x: Any) -> Any:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(x)


CASES = [(dims, geometry) for dims in (1, 2, 3) for geometry in GEOMETRIES]
IDS = [f"conv{dims}d-{geometry}" for dims, geometry in CASES]


@pytest.mark.parametrize(("dims", "geometry"), CASES, ids=IDS)
def test_peftcore_adapter_loads_in_hf_peft(dims: int, geometry: str, tmp_path: Path) -> None:
    ours = peftcore.get_peft_model(cnn(dims, geometry), peftcore.LoraConfig(**lora()))
    x = inputs(dims)
    expected = quiet_forward(ours, x)
    assert not torch.allclose(expected, quiet_forward(cnn(dims, geometry), x)), "the adapter must change the output"
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(cnn(dims, geometry), str(tmp_path))
    assert_close_to_scale(quiet_forward(theirs, x), expected, FLOAT32_RTOL)


@pytest.mark.parametrize(("dims", "geometry"), CASES, ids=IDS)
def test_hf_peft_adapter_loads_in_peftcore(dims: int, geometry: str, tmp_path: Path) -> None:
    theirs = peft.get_peft_model(cnn(dims, geometry), peft.LoraConfig(**lora()))
    x = inputs(dims)
    expected = quiet_forward(theirs, x)
    theirs.save_pretrained(str(tmp_path))
    ours = peftcore.PeftModel.from_pretrained(cnn(dims, geometry), tmp_path)
    assert_close_to_scale(quiet_forward(ours, x), expected, FLOAT32_RTOL)
    state = ours.get_base_model().state_dict()
    assert state["body.lora_A.default.weight"].shape == theirs.state_dict()["base_model.model.body.lora_A.default.weight"].shape


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("geometry", ["plain", "stride_padding", "same", "pointwise"])
def test_merge_unmerge_is_exact_and_merged_output_matches(dims: int, geometry: str) -> None:
    ours = peftcore.get_peft_model(cnn(dims, geometry), peftcore.LoraConfig(**lora()))
    x = inputs(dims)
    before = {name: p.detach().clone() for name, p in ours.get_base_model().named_parameters() if "base_layer" in name}
    unmerged = quiet_forward(ours, x)
    for _ in range(3):
        ours.merge_adapter()
        assert_close_to_scale(quiet_forward(ours, x), unmerged, FLOAT32_RTOL)
        ours.unmerge_adapter()
    after = dict(ours.get_base_model().named_parameters())
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert torch.equal(quiet_forward(ours, x), unmerged)
    merged_model = ours.merge_and_unload()
    assert isinstance(merged_model.body, CONVS[dims])
    assert_close_to_scale(quiet_forward(merged_model, x), unmerged, FLOAT32_RTOL)


def test_merged_weight_equals_hf_peft_merge(tmp_path: Path) -> None:
    theirs = peft.get_peft_model(cnn(2, "stride_padding"), peft.LoraConfig(**lora()))
    theirs.save_pretrained(str(tmp_path))
    ours = peftcore.PeftModel.from_pretrained(cnn(2, "stride_padding"), tmp_path)
    with torch.no_grad():
        hf_weight = theirs.merge_and_unload().body.weight
        our_weight = ours.merge_and_unload().body.weight
    assert_close_to_scale(our_weight, hf_weight, FLOAT32_RTOL)


def test_grouped_conv_refuses_merge_and_leaves_the_weight() -> None:
    ours = peftcore.get_peft_model(cnn(2, "groups"), peftcore.LoraConfig(**lora(target_modules=["body"])))
    weight = ours.get_base_model().body.base_layer.weight.detach().clone()
    x = inputs(2)
    unmerged = quiet_forward(ours, x)
    with pytest.raises(AdapterError, match="groups=2.*reads every input channel"):
        ours.merge_adapter()
    assert torch.equal(ours.get_base_model().body.base_layer.weight, weight)
    assert torch.equal(quiet_forward(ours, x), unmerged)
    assert ours.get_base_model().body.merged_adapters == []


def test_rank_not_divisible_by_groups_is_refused_naming_the_layer() -> None:
    with pytest.raises(PlanError, match=r"'body'.*groups=2.*rank is 3"):
        peftcore.get_peft_model(cnn(2, "groups"), peftcore.LoraConfig(**lora(target_modules=["body"], r=3)))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_dilated_conv_matches_hf_merged_weights(dims: int, tmp_path: Path) -> None:
    """HF PEFT 0.21.2 builds A without the base layer's dilation, so its unmerged forward
    fails on a dilated conv; its merged weights are the adapter's meaning, and ours
    equal them unmerged and merged. The file is the same in both directions."""
    model = lambda: SmallCNN(dims, kernel_size=3, dilation=2, padding=2).eval()  # noqa: E731
    torch.manual_seed(0)
    base = model()
    ours = peftcore.get_peft_model(copy.deepcopy(base), peftcore.LoraConfig(**lora()))
    x = inputs(dims)
    unmerged = quiet_forward(ours, x)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    with pytest.raises(RuntimeError):  # HF's own limitation, which the docs state
        quiet_forward(theirs, x)
    with torch.no_grad():
        hf_merged = theirs.merge_and_unload()
    assert_close_to_scale(quiet_forward(hf_merged, x), unmerged, FLOAT32_RTOL)
    before = ours.get_base_model().body.base_layer.weight.detach().clone()
    ours.merge_adapter()
    assert_close_to_scale(quiet_forward(ours, x), unmerged, FLOAT32_RTOL)
    ours.unmerge_adapter()
    assert torch.equal(ours.get_base_model().body.base_layer.weight, before)


@pytest.mark.parametrize(("dims", "geometry"), [(1, "plain"), (2, "groups"), (3, "stride_padding")])
def test_training_lowers_the_loss_and_changes_only_the_adapter(dims: int, geometry: str) -> None:
    ours = peftcore.get_peft_model(cnn(dims, geometry), peftcore.LoraConfig(**lora(init_lora_weights=True, lora_dropout=0.1)))
    ours.train()
    frozen = {n: p.detach().clone() for n, p in ours.get_base_model().named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in ours.get_base_model().named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    start = {n: p.detach().clone() for n, p in trainable.items()}
    x, target = inputs(dims, batch=8), torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(ours(x), target)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0]
    params = dict(ours.get_base_model().named_parameters())
    assert all(torch.equal(params[n], value) for n, value in frozen.items())
    assert all(not torch.equal(params[n], start[n]) for n in trainable)


@pytest.mark.parametrize(("dims", "geometry"), [(1, "stride_padding"), (2, "plain"), (2, "groups"), (3, "same")])
def test_mixed_batch_routes_each_row_to_its_adapter(dims: int, geometry: str) -> None:
    ours = peftcore.get_peft_model(cnn(dims, geometry), peftcore.LoraConfig(**lora()))
    ours.add_adapter("other", peftcore.LoraConfig(**lora(target_modules=["body"], r=2, lora_alpha=3)))
    with torch.no_grad():  # the second adapter's B is random (init_lora_weights=False); make it differ more
        ours.get_base_model().body.lora_B["other"].weight.mul_(5)
    ours.eval()
    x = inputs(dims, batch=5)
    names = ["default", "other", "__base__", "other", "default"]
    with torch.no_grad():
        mixed = ours(x, adapter_names=names)
    rows = []
    for row, name in enumerate(names):
        if name == "__base__":
            with ours.disable_adapter():
                rows.append(quiet_forward(ours, x[row : row + 1]))
        else:
            ours.set_adapter(name)
            rows.append(quiet_forward(ours, x[row : row + 1]))
    assert_close_to_scale(mixed, torch.cat(rows), FLOAT32_RTOL)
    assert not torch.allclose(rows[0], rows[1], atol=1e-3)


def test_mixed_batches_agree_with_hf_peft(tmp_path: Path) -> None:
    ours = peftcore.get_peft_model(cnn(2, "stride_padding"), peftcore.LoraConfig(**lora()))
    ours.add_adapter("other", peftcore.LoraConfig(**lora(r=2)))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(cnn(2, "stride_padding"), str(tmp_path))
    theirs.load_adapter(str(tmp_path / "other"), adapter_name="other")
    theirs.eval()
    ours.eval()
    names = ["other", "default", "__base__", "other"]
    x = inputs(2)
    with torch.no_grad():
        assert_close_to_scale(ours(x, adapter_names=names), theirs(x, adapter_names=names), FLOAT32_RTOL)


def test_all_linear_leaves_convolutions_out_as_hf_peft() -> None:
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 2)).eval()

    ours = peftcore.get_peft_model(model(), peftcore.LoraConfig(target_modules="all-linear"))
    theirs = peft.get_peft_model(model(), peft.LoraConfig(target_modules="all-linear"))
    wrapped = sorted(n for n, m in ours.get_base_model().named_modules() if hasattr(m, "base_layer"))
    hf_wrapped = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "base_layer"))
    assert "2" in wrapped and "2" in hf_wrapped
    assert "0" not in wrapped and "0" not in hf_wrapped  # the conv


def test_adapter_for_another_kernel_is_refused_naming_the_geometry(tmp_path: Path) -> None:
    peftcore.get_peft_model(cnn(2, "stride_padding"), peftcore.LoraConfig(**lora())).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="body"):
        peftcore.PeftModel.from_pretrained(cnn(2, "plain"), tmp_path)  # stride 1, no padding
    torch.manual_seed(0)
    other_kernel = SmallCNN(2, kernel_size=5, stride=2, padding=1).eval()
    with pytest.raises(Exception, match="body"):
        peftcore.PeftModel.from_pretrained(other_kernel, tmp_path)


def test_the_saved_plan_round_trips_the_geometry(tmp_path: Path) -> None:
    ours = peftcore.get_peft_model(cnn(3, "stride_padding"), peftcore.LoraConfig(**lora()))
    op = next(op for op in ours.plans["default"].ops if op.path == "body")
    assert (op.op, op.kernel_size, op.stride, op.padding, op.dilation, op.groups) == ("lora_conv", (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), 1)
    exported = {k: np.asarray(v) for k, v in ours.export_adapter("default").items()}
    assert exported["body.lora_A"].shape == (4, 4, 3, 3, 3) and exported["body.lora_B"].shape == (6, 4, 1, 1, 1)
    delta = op.delta({"lora_A": exported["body.lora_A"], "lora_B": exported["body.lora_B"]})
    layer = ours.get_base_model().body
    assert_close_to_scale(delta, layer.delta_weight("default"), FLOAT32_RTOL)


def test_hotswap_pads_and_swaps_conv_adapters(tmp_path: Path) -> None:
    """``prepare_model_for_compiled_hotswap`` pads a conv adapter's rank (outputs unchanged),
    and ``hotswap_adapter`` then swaps in another conv adapter's weights in place."""
    other = peftcore.get_peft_model(cnn(2, "stride_padding"), peftcore.LoraConfig(**lora(r=2, lora_alpha=4)))
    other.save_pretrained(tmp_path / "other")
    x = inputs(2)
    expected = quiet_forward(other, x)
    model = peftcore.get_peft_model(cnn(2, "stride_padding"), peftcore.LoraConfig(**lora(r=4, lora_alpha=8)))
    before = quiet_forward(model, x)
    peftcore.prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert model.get_base_model().body.lora_A.weight("default").shape == (8, 4, 3, 3)
    assert_close_to_scale(quiet_forward(model, x), before, FLOAT32_RTOL)
    peftcore.hotswap_adapter(model, str(tmp_path / "other"), adapter_name="default")
    assert_close_to_scale(quiet_forward(model, x), expected, FLOAT32_RTOL)


def test_hotswap_refuses_a_grouped_conv_adapter() -> None:
    model = peftcore.get_peft_model(cnn(2, "groups"), peftcore.LoraConfig(**lora(target_modules=["body"])))
    with pytest.raises(AdapterError, match="'body'.*groups > 1"):
        peftcore.prepare_model_for_compiled_hotswap(model, target_rank=8)


def test_reflect_padding_matches_hf_merged_weights(tmp_path: Path) -> None:
    """HF PEFT 0.21.2 pads A with zeros whatever the layer's ``padding_mode``, so its
    unmerged and merged outputs differ on a ``reflect`` conv; here A pads as the layer
    does, so the unmerged output equals the merged one, which HF's merge gives too."""
    torch.manual_seed(0)
    base = SmallCNN(2, kernel_size=3, padding=1, padding_mode="reflect").eval()
    ours = peftcore.get_peft_model(copy.deepcopy(base), peftcore.LoraConfig(**lora()))
    assert ours.get_base_model().body.lora_A["default"].padding_mode == "reflect"
    x = inputs(2)
    unmerged = quiet_forward(ours, x)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    with torch.no_grad():
        hf_merged = theirs.merge_and_unload()
    assert_close_to_scale(quiet_forward(hf_merged, x), unmerged, FLOAT32_RTOL)
    ours.merge_adapter()
    assert_close_to_scale(quiet_forward(ours, x), unmerged, FLOAT32_RTOL)


def test_same_padding_is_described_in_sizes_so_its_adapter_fits_explicit_padding(tmp_path: Path) -> None:
    same = peftcore.get_peft_model(cnn(2, "same"), peftcore.LoraConfig(**lora()))
    op = next(op for op in same.plans["default"].ops if op.path == "body")
    assert op.padding == (1, 1)
    same.save_pretrained(tmp_path)
    torch.manual_seed(0)
    explicit = SmallCNN(2, kernel_size=3, padding=1).eval()
    loaded = peftcore.PeftModel.from_pretrained(explicit, tmp_path)
    x = inputs(2)
    assert_close_to_scale(quiet_forward(loaded, x), quiet_forward(same, x), FLOAT32_RTOL)
