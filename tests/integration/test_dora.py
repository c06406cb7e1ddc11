"""DoRA (``LoraConfig(use_dora=True)``) against real HF PEFT, on the same weights.

Tiny Llama (``nn.Linear`` and an ``nn.Embedding``) and GPT-2 (transformers' ``Conv1D``
and its token embedding): the output is the base model's at init, with HF's magnitude;
adapters saved by either library load in the other with the same outputs; merge and
unmerge leave the base weights bit-identical and merging gives HF's merged weights;
training lowers the loss and changes only A, B and the magnitude; the gradients of all
three are HF's on the same batch; a mixed-adapter batch naming a DoRA adapter is refused
as HF refuses it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from dora_checks import check_files_move_both_ways, check_merge_is_exact_and_as_hf, trained_like  # noqa: E402
from tiny import gpt2_lm, llama_lm, random_ids, train_steps  # noqa: E402

import peftcore  # noqa: E402
from peftcore.errors import AdapterError  # noqa: E402
from peftcore.testing.numerics import FLOAT32_RTOL, assert_close_to_scale  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

#: (model builder, targets): Linear + Embedding, Conv1D (GPT-2's token embedding is tied
#: to its output head, so merging into it would change the head too, in both libraries)
MODELS: dict[str, tuple[Callable[[], Any], list[str]]] = {
    "llama": (llama_lm, ["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "gpt2": (gpt2_lm, ["c_attn", "c_fc", "c_proj"]),
}


def _logits(model: Any, ids: Any) -> np.ndarray:
    with torch.no_grad():
        return model(ids).logits.numpy()


def _config(module: Any, targets: list[str], **extra: Any) -> Any:
    return module.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, **extra)


def _ours(base: Any, targets: list[str], **extra: Any) -> Any:
    return peftcore.get_peft_model(copy.deepcopy(base), _config(peftcore, targets, **extra))


def _hf(base: Any, targets: list[str], **extra: Any) -> Any:
    return peft.get_peft_model(copy.deepcopy(base), _config(peft, targets, **extra))


def _adapter_state(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("arch", MODELS)
def test_output_is_the_base_at_init_with_hf_magnitude(arch: str) -> None:
    build, targets = MODELS[arch]
    base, ids = build(), random_ids(2, 8)
    ours, theirs = _ours(base, targets), _hf(base, targets)
    np.testing.assert_array_equal(_logits(ours, ids), _logits(base, ids))
    hf_state = theirs.state_dict()
    magnitudes = {k: v for k, v in ours.state_dict().items() if "lora_magnitude_vector" in k}
    assert magnitudes and set(magnitudes) == {k for k in hf_state if "lora_magnitude_vector" in k}
    for key, value in magnitudes.items():
        assert_close_to_scale(value.numpy(), hf_state[key].numpy(), FLOAT32_RTOL, err_msg=key)


@pytest.mark.parametrize("arch", MODELS)
def test_files_move_both_ways(arch: str, tmp_path: Path) -> None:
    build, targets = MODELS[arch]
    base, ids = build(), random_ids(2, 8)
    ours = _ours(base, targets)
    check_files_move_both_ways(base, ours, _hf(base, targets), lambda model: _logits(model, ids), tmp_path)


@pytest.mark.parametrize("arch", MODELS)
def test_merge_unmerge_is_exact_and_merges_as_hf(arch: str) -> None:
    build, targets = MODELS[arch]
    base, ids = build(), random_ids(2, 8)
    ours = _ours(base, targets)
    trained_like(ours)
    theirs = _hf(base, targets)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    check_merge_is_exact_and_as_hf(ours, theirs, lambda model: _logits(model, ids))


@pytest.mark.parametrize("arch", MODELS)
def test_training_lowers_the_loss_and_changes_only_the_adapter(arch: str) -> None:
    build, targets = MODELS[arch]
    base, ids = build(), random_ids(4, 12)
    model = _ours(base, targets, lora_dropout=0.1)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(
        any(part in n for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"))
        for n in trainable
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_steps(model, {"input_ids": ids, "labels": ids}, steps=12, lr=1e-2)
    assert losses[-1] < losses[0]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_magnitude_vector" in k for k in changed)


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradients_match_hf(arch: str, mode: str) -> None:
    build, targets = MODELS[arch]
    base, ids = build(), random_ids(2, 10)
    ours = _ours(base, targets)
    trained_like(ours)
    theirs = _hf(base, targets)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    for model in (ours, theirs):
        model.train(mode == "train")
        torch.manual_seed(7)  # GPT-2's own dropouts draw the same masks in both
        model(input_ids=ids, labels=ids).loss.backward()
    their_params = dict(theirs.named_parameters())
    compared = 0
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            assert_close_to_scale(param.grad.numpy(), their_params[name].grad.numpy(), FLOAT32_RTOL, err_msg=name)
            compared += 1
    assert compared == sum(p.requires_grad for p in theirs.parameters())


def test_dropout_path_matches_hf_under_the_same_seed() -> None:
    """With dropout, DoRA needs ``W x'`` for the dropped input apart from the base output;
    on the same RNG stream both libraries draw the same masks."""
    build, targets = MODELS["llama"]
    base, ids = build(), random_ids(2, 10)
    ours = _ours(base, targets, lora_dropout=0.2)
    trained_like(ours)
    theirs = _hf(base, targets, lora_dropout=0.2)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    losses = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(11)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    their_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert_close_to_scale(param.grad.numpy(), their_params[name].grad.numpy(), FLOAT32_RTOL, err_msg=name)


def test_mixed_batch_with_dora_is_refused_as_hf_refuses_it() -> None:
    build, targets = MODELS["llama"]
    base, ids = build(), random_ids(3, 6)
    ours = _ours(base, targets)
    ours.add_adapter("plain", peftcore.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    theirs = _hf(base, targets)
    theirs.add_adapter("plain", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    names = ["default", "plain", "__base__"]
    theirs.eval()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        theirs(ids, adapter_names=names)
    with pytest.raises(AdapterError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        ours(ids, adapter_names=names)
    with pytest.raises(AdapterError, match="DoRA"):
        ours.generate(ids, adapter_names=names, max_new_tokens=2)
    # a batch that names only plain LoRA adapters runs, each row as its adapter alone
    mixed = ours(ids, adapter_names=["plain", "__base__", "plain"]).logits.detach().numpy()
    ours.set_adapter("plain")
    alone = _logits(ours, ids)
    with ours.disable_adapter():
        base_out = _logits(ours, ids)
    assert_close_to_scale(mixed[[0, 2]], alone[[0, 2]], FLOAT32_RTOL)
    assert_close_to_scale(mixed[1], base_out[1], FLOAT32_RTOL)


def test_a_stored_plan_disagreeing_on_use_dora_is_reported() -> None:
    build, targets = MODELS["llama"]
    model = _ours(build(), targets)
    plan = model.plans["default"]
    assert peftcore.LoraConfig(r=4, lora_alpha=8, target_modules=targets).plan_disagreement(plan) is not None
    assert model.peft_config["default"].plan_disagreement(plan) is None


def test_what_dora_does_not_combine_is_refused(tmp_path: Path) -> None:
    build, targets = MODELS["llama"]
    model = _ours(build(), targets)
    model.add_adapter("second", peftcore.LoraConfig(r=4, target_modules=targets, use_dora=True))
    with pytest.raises(ValueError, match="does not combine DoRA adapters"):
        model.add_weighted_adapter(["default", "second"], [0.5, 0.5], "both", combination_type="linear")
    assert "both" not in model.peft_config
    model.save_pretrained(str(tmp_path / "init"))
    with pytest.raises(AdapterError, match="DoRA"):
        model.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))


def test_the_cached_base_norm_follows_an_edited_base_weight() -> None:
    build, targets = MODELS["gpt2"]
    base, ids = build(), random_ids(2, 8)
    ours = _ours(base, targets)
    trained_like(ours)
    theirs = _hf(base, targets)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    _logits(ours, ids)  # the norms are cached now
    for model in (ours, theirs):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("base_layer.weight"):
                    param.mul_(1.5)
    assert_close_to_scale(_logits(ours, ids), _logits(theirs, ids), FLOAT32_RTOL)


def test_dora_with_a_pissa_init_matches_hf() -> None:
    """The magnitude is the norm of the residual base weight PiSSA leaves, as in HF PEFT."""
    base, ids = llama_lm(), random_ids(2, 8)
    targets = ["q_proj", "v_proj"]
    ours, theirs = _ours(base, targets, init_lora_weights="pissa"), _hf(base, targets, init_lora_weights="pissa")
    assert_close_to_scale(_logits(ours, ids), _logits(base, ids), FLOAT32_RTOL)
    their_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        if "lora_magnitude_vector" in key or key.endswith("base_layer.weight"):
            assert_close_to_scale(value.numpy(), their_state[key].numpy(), FLOAT32_RTOL, err_msg=key)


@pytest.mark.parametrize("weight_in_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("tokens", [3, 40], ids=["few-tokens", "many-tokens"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_fused_dora_node_gives_autograd_s_gradients(weight_in_out: bool, tokens: int, with_bias: bool) -> None:
    from peftcore_torch.dora_kernels import fused_dora_linear

    generator = torch.Generator().manual_seed(0)
    in_f, out_f, r, scaling = 12, 9, 3, 1.5
    x = torch.randn(2, tokens // 2 + 1, in_f, generator=generator, requires_grad=True)
    weight = torch.randn(*((in_f, out_f) if weight_in_out else (out_f, in_f)), generator=generator)
    bias = torch.randn(out_f, generator=generator, requires_grad=True) if with_bias else None
    a = torch.randn(r, in_f, generator=generator, requires_grad=True)
    b = torch.randn(out_f, r, generator=generator, requires_grad=True)
    magnitude = torch.rand(out_f, generator=generator).add_(0.5).requires_grad_()
    inv_norm = torch.rand(out_f, generator=generator)
    upstream = torch.randn(2, tokens // 2 + 1, out_f, generator=generator)
    leaves = [t for t in (x, bias, a, b, magnitude) if t is not None]

    canonical = weight.t() if weight_in_out else weight
    expected = (x @ canonical.t() + scaling * (x @ a.t()) @ b.t()) * (magnitude * inv_norm)
    expected = expected + bias if bias is not None else expected
    wanted = torch.autograd.grad(expected, leaves, upstream)
    got_out = fused_dora_linear(x, weight, bias, a, b, magnitude, inv_norm, scaling, weight_in_out)
    got = torch.autograd.grad(got_out, leaves, upstream)
    torch.testing.assert_close(got_out, expected, rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL * float(expected.abs().max()))
    for mine, theirs in zip(got, wanted):
        torch.testing.assert_close(mine, theirs, rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL * float(theirs.abs().max()))
