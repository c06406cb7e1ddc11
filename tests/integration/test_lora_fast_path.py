"""The torch LoRA layers' fast routes compute what the plain route computes.

A LoRA linear with one active adapter on a plain, frozen, unhooked ``nn.Linear`` or
``Conv1D`` runs as one fused autograd node (and, for long inference batches in float32,
folds the adapter into a temporary weight). A forward hook on the base layer makes the
layer take the plain route (call the base layer, add the update), so the two can be
compared on the same weights: outputs, input gradients and factor gradients.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
from torch import nn  # noqa: E402

import peftcore  # noqa: E402
from peftcore import LoraConfig  # noqa: E402
from peftcore_torch.lora import LoraLinear  # noqa: E402
from peftcore_torch.lora_kernels import can_fuse, fused_lora_linear  # noqa: E402


def conv1d(n_in: int, n_out: int) -> nn.Module:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(n_out, n_in)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


BASES: dict[str, Callable[[], nn.Module]] = {
    "Linear": lambda: nn.Linear(12, 20),
    "Linear without bias": lambda: nn.Linear(12, 20, bias=False),
    "Conv1D": lambda: conv1d(12, 20),
}


def wrapped(base: str, dropout: float = 0.0, dtype: Any = torch.float32) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(BASES[base]()).to(dtype)
    config = LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=["0"], init_lora_weights=False)
    # adapters in the model's own dtype (HF's default keeps those of a half-precision model in float32)
    peft_model = peftcore.get_peft_model(model, config, autocast_adapter_dtype=False)
    layer = peft_model.model[0]
    assert isinstance(layer, LoraLinear)
    return peft_model, layer


def run(peft_model: Any, layer: Any, x: Any, plain: bool, seed: int = 3) -> tuple:
    """Output, input gradient and factor gradients, on the plain route if ``plain``."""
    handle = layer.base_layer.register_forward_hook(lambda module, args, out: None) if plain else None
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout mask on both routes
    out = peft_model(x)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}
    for p in layer.parameters():
        p.grad = None
    if handle is not None:
        handle.remove()
    return out.detach(), x.grad.detach(), grads


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_fused_route_matches_the_plain_route_in_training(base: str, dropout: float) -> None:
    peft_model, layer = wrapped(base, dropout)
    peft_model.model.train()
    x = torch.randn(3, 5, 12)
    assert can_fuse(layer.base_layer, layer._plain_base, x, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    fast, plain = run(peft_model, layer, x, plain=False), run(peft_model, layer, x, plain=True)
    torch.testing.assert_close(fast[0], plain[0])
    torch.testing.assert_close(fast[1], plain[1])
    assert set(fast[2]) == {"lora_A.default.weight", "lora_B.default.weight"} == set(plain[2])
    for name in fast[2]:
        torch.testing.assert_close(fast[2][name], plain[2][name])


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("tokens", [2, 64], ids=["update added", "adapter folded"])
def test_inference_routes_match_the_plain_route(base: str, tokens: int) -> None:
    peft_model, layer = wrapped(base)
    x = torch.randn(2, tokens, 12)
    with torch.no_grad():
        fast = peft_model(x)
        handle = layer.base_layer.register_forward_hook(lambda module, args, out: None)
        plain = peft_model(x)
        handle.remove()
    torch.testing.assert_close(fast, plain)


def test_one_token_decoding_follows_every_change_of_state() -> None:
    """The one-adapter route is chosen per call from the layer's own state: a second adapter,
    set_adapter, disabling, merging, a global hook and factors replaced through ``.data``
    all show in the next one-token forward, as they do on the plain route."""
    peft_model, layer = wrapped("Conv1D")
    peft_model.add_adapter("other", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(1, 1, 12)

    def expected(names: list) -> Any:
        base = layer.base_layer(x)
        return base + sum((layer.update(name, x) for name in names), torch.zeros_like(base))

    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), expected(["default"]))
        peft_model.set_adapter("other")
        torch.testing.assert_close(peft_model(x), expected(["other"]))
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(x), layer.base_layer(x))
        layer.lora_B["other"].weight.data = torch.randn_like(layer.lora_B["other"].weight)
        torch.testing.assert_close(peft_model(x), expected(["other"]))
        handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
        try:
            assert not can_fuse(layer.base_layer, True, x, layer.lora_A["other"].weight, layer.lora_B["other"].weight)
            torch.testing.assert_close(peft_model(x), expected(["other"]))
        finally:
            handle.remove()
        unmerged = peft_model(x)
        peft_model.merge_adapter()
        torch.testing.assert_close(peft_model(x), unmerged)
        peft_model.unmerge_adapter()
        layer.active_adapters = ["default", "other"]  # two active: the per-adapter route
        torch.testing.assert_close(peft_model(x), expected(["default", "other"]))


def test_low_precision_and_hooked_layers_take_the_plain_route() -> None:
    peft_model, layer = wrapped("Linear", dtype=torch.bfloat16)
    x = torch.randn(2, 64, 12, dtype=torch.bfloat16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dtype == torch.bfloat16
    assert can_fuse(layer.base_layer, True, x, a, b)  # one dtype throughout: fused, but never folded in bf16
    assert not can_fuse(layer.base_layer, True, x.float(), a, b)  # mixed dtypes
    handle = layer.base_layer.register_forward_hook(lambda module, args, out: None)
    assert not can_fuse(layer.base_layer, True, x, a, b)
    handle.remove()
    layer.base_layer.weight.requires_grad_(True)  # a trainable base weight needs its gradient: plain route
    assert not can_fuse(layer.base_layer, True, x, a, b)


@pytest.mark.parametrize("weight_in_out", [False, True], ids=["Linear layout", "Conv1D layout"])
@pytest.mark.parametrize("separate_input", [False, True], ids=["no dropout", "dropped input"])
def test_fused_gradients_pass_gradcheck_twice(weight_in_out: bool, separate_input: bool) -> None:
    torch.manual_seed(0)
    dtype = torch.float64
    weight = torch.randn((5, 4) if weight_in_out else (4, 5), dtype=dtype)
    x = torch.randn(2, 3, 5, dtype=dtype, requires_grad=True)
    bias = torch.randn(4, dtype=dtype, requires_grad=True)
    a = torch.randn(2, 5, dtype=dtype, requires_grad=True)
    b = torch.randn(4, 2, dtype=dtype, requires_grad=True)

    def fused(x: Any, bias: Any, a: Any, b: Any) -> Any:
        lora_input = x * 0.5 if separate_input else None
        return fused_lora_linear(x, lora_input, weight, bias, a, b, 1.5, weight_in_out)

    def reference(x: Any, bias: Any, a: Any, b: Any) -> Any:
        base = (x @ weight if weight_in_out else x @ weight.t()) + bias
        return base + 1.5 * ((x * 0.5 if separate_input else x) @ a.t()) @ b.t()

    inputs = (x, bias, a, b)
    torch.testing.assert_close(fused(*inputs), reference(*inputs))
    assert torch.autograd.gradcheck(fused, inputs)
    assert torch.autograd.gradgradcheck(fused, inputs)
