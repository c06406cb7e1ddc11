"""LoRA on bitsandbytes-quantised base models (QLoRA), on CPU, against HF PEFT.

Bases: a tiny Llama quantised by hand (``nn.Linear`` replaced by ``Linear4bit`` nf4/fp4,
with and without double quantisation, or ``Linear8bitLt``) and the same model loaded
with transformers' ``BitsAndBytesConfig``. peftcore and HF PEFT run the same bitsandbytes
base forward and add the same float32 update, so their outputs agree to float32 rounding
(``FLOAT32_RTOL`` of the output scale).

Merging dequantises, adds and quantises again, as HF PEFT does. The merged weight then
carries a fresh 4-bit (or 8-bit) rounding of ``W + delta``: against the full-precision
merge (the dequantised original weight plus the float32 delta) the error is bounded by
one quantisation step of each block, checked here as at most ``QUANT_STEP`` (4-bit: 1/5,
8-bit: 1/100) of the largest magnitude of the full-precision merge, and it equals HF PEFT's
merged weight exactly. Unmerge restores the copy of the quantised weight the first merge
kept: codes and quant state bit-identical.

Model sizes: hidden 64 and head width 16, so every projection's output width is a
multiple of 32, which bitsandbytes' CPU repacking of a 4-bit weight (eval mode, no
gradients, AVX512-BF16) needs.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes", reason="QLoRA tests need bitsandbytes (pip install bitsandbytes==0.50.2)")

import peftcore  # noqa: E402
from peftcore.testing.numerics import FLOAT32_RTOL, HALF_RTOL, assert_close_to_scale  # noqa: E402
from peftcore_torch import prepare_model_for_kbit_training  # noqa: E402
from peftcore_torch.quantised import dequantise  # noqa: E402
from tests.subprocess_env import child_env  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64
TARGETS = ["q_proj", "v_proj", "down_proj"]
QUANT_STEP = {"4bit": 0.2, "8bit": 0.01}
#: (name, kind, quant_type, double quantisation)
HAND = [
    ("nf4", "4bit", "nf4", False),
    ("nf4-double", "4bit", "nf4", True),
    ("fp4", "4bit", "fp4", False),
    ("fp4-double", "4bit", "fp4", True),
    ("int8", "8bit", None, False),
]


def llama(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(config)


def quantise_by_hand(model: Any, kind: str, quant_type: Any, double: bool) -> Any:
    """Every ``nn.Linear`` but the head replaced by its bitsandbytes layer, in eval mode."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear or name == "lm_head":
                continue
            has_bias = child.bias is not None
            if kind == "4bit":
                layer = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=has_bias, compute_dtype=torch.float32,
                    compress_statistics=double, quant_type=quant_type,
                )
                layer.weight = bnb.nn.Params4bit(
                    child.weight.data.clone(), requires_grad=False, compress_statistics=double, quant_type=quant_type,
                    module=layer,
                )
            else:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias, has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(child.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            if has_bias:
                layer.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(module, name, layer.to("cpu"))
    return model.eval()


def hand_quantised(case: tuple) -> Any:
    _, kind, quant_type, double = case
    return quantise_by_hand(llama(), kind, quant_type, double)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory: Any) -> str:
    path = tmp_path_factory.mktemp("llama")
    llama().save_pretrained(path)
    return str(path)


def loaded_quantised(path: str, kind: str, dtype: Any = torch.float32) -> Any:
    """The saved tiny Llama loaded with transformers' BitsAndBytesConfig, on CPU, its
    other parameters in ``dtype``."""
    if kind == "4bit":
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    else:
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM.from_pretrained(
            path, quantization_config=config, device_map="cpu", dtype=dtype
        ).eval()


def ids(seed: int = 1) -> Any:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (2, 8), generator=generator)


def logits(model: Any, tokens: Any, repacked: bool = False) -> Any:
    """The model's logits without gradients, in train mode unless ``repacked``.

    In eval mode without gradients on an AVX512-BF16 CPU, bitsandbytes repacks each
    4-bit weight for a CPU kernel that rounds the input to bfloat16, which turns float32
    rounding differences upstream (HF PEFT's ``lora_B(lora_A(x)) * s`` against ours) into
    bfloat16-sized ones; in train mode it dequantises and multiplies in float32. These
    models have no dropout, so train mode changes nothing else."""
    was_training = model.training
    model.train(not repacked)
    try:
        with torch.no_grad():
            return model(input_ids=tokens).logits
    finally:
        model.train(was_training)


def core_lora(model: Any, **extra: Any) -> Any:
    config = peftcore.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **extra)
    return peftcore.get_peft_model(model, config)


def q_proj(model: Any) -> Any:
    return model.get_base_model().model.layers[0].self_attn.q_proj


def quantised_state(weight: Any) -> list:
    """The codes and every scale tensor of a quantised weight, detached copies."""
    if type(weight).__name__ == "Params4bit":
        state = weight.quant_state
        parts = [weight.data, state.absmax, state.code]
        if state.nested:
            parts += [state.state2.absmax, state.state2.code, torch.as_tensor(state.offset)]
        return [p.detach().clone() for p in parts]
    return [weight.data.detach().clone(), weight.SCB.detach().clone()]


# -- layers and imports --------------------------------------------------------------------
def test_importing_peftcore_torch_leaves_bitsandbytes_unloaded() -> None:
    code = "import sys, peftcore, peftcore_torch, peftcore_torch.builders; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=child_env(ROOT))
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("case", HAND, ids=[c[0] for c in HAND])
def test_quantised_layers_are_described_dense_and_wrapped(case: tuple) -> None:
    model = core_lora(hand_quantised(case))
    node = model.model_graph.get("model.layers.0.mlp.down_proj")
    assert (node.kind, node.in_features, node.out_features, node.params["weight"]) == ("linear", 128, 64, (64, 128))
    assert node.dtype == ("float32" if case[1] == "4bit" else "float16")
    layer = q_proj(model)
    assert type(layer).__name__ == "LoraQuantisedLinear"
    assert repr(layer).startswith(f"lora.{'Linear4bit' if case[1] == '4bit' else 'Linear8bitLt'}(")
    assert layer.lora_A["default"].weight.dtype == torch.float32


def test_dora_on_a_quantised_base_is_refused_and_nothing_is_left() -> None:
    model = hand_quantised(HAND[0])
    with pytest.raises(peftcore.errors.PlanError, match="QDoRA"):
        peftcore.get_peft_model(model, peftcore.LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


# -- outputs and files against HF PEFT ------------------------------------------------------
@pytest.mark.parametrize("case", HAND, ids=[c[0] for c in HAND])
def test_hand_quantised_adapters_move_both_ways_with_hf_outputs(case: tuple, tmp_path: Any) -> None:
    core = core_lora(hand_quantised(case))
    tokens = ids()
    ours = logits(core, tokens)
    with core.disable_adapter():
        assert torch.equal(logits(core, tokens), logits(hand_quantised(case), tokens))
    core.save_pretrained(tmp_path / "core")
    theirs = peft.PeftModel.from_pretrained(hand_quantised(case), tmp_path / "core")
    assert_close_to_scale(logits(theirs, tokens), ours, FLOAT32_RTOL)

    # bitsandbytes' bfloat16 CPU kernel (eval mode) rounds both alike, up to bfloat16's precision
    assert_close_to_scale(logits(theirs, tokens, repacked=True), logits(core, tokens, repacked=True), HALF_RTOL["bfloat16"])

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    hf = peft.get_peft_model(hand_quantised(case), config)
    hf.save_pretrained(tmp_path / "hf")
    back = peftcore.PeftModel.from_pretrained(hand_quantised(case), tmp_path / "hf")
    assert_close_to_scale(logits(back, tokens), logits(hf, tokens), FLOAT32_RTOL)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_bitsandbytes_config_model_matches_hf_peft_both_ways(kind: str, saved_llama: str, tmp_path: Any) -> None:
    hf = peft.get_peft_model(
        loaded_quantised(saved_llama, kind),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
    )
    expected_type = "Linear4bit" if kind == "4bit" else "Linear8bitLt"
    assert type(hf.base_model.model.model.layers[0].self_attn.q_proj).__name__ == expected_type  # HF's bnb layers
    hf.save_pretrained(tmp_path / "hf")
    core = peftcore.PeftModel.from_pretrained(loaded_quantised(saved_llama, kind), tmp_path / "hf")
    tokens = ids()
    expected = logits(hf, tokens)
    assert_close_to_scale(logits(core, tokens), expected, FLOAT32_RTOL)
    core.save_pretrained(tmp_path / "core")
    again = peft.PeftModel.from_pretrained(loaded_quantised(saved_llama, kind), tmp_path / "core")
    assert_close_to_scale(logits(again, tokens), expected, FLOAT32_RTOL)


@pytest.mark.parametrize("case", [HAND[1], HAND[4]], ids=[HAND[1][0], HAND[4][0]])
def test_mixed_adapter_batch_on_a_quantised_base(case: tuple) -> None:
    model = core_lora(hand_quantised(case))
    model.add_adapter("other", peftcore.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    tokens = ids()
    with torch.no_grad():
        mixed = model(input_ids=tokens, adapter_names=["default", "other"]).logits
    for row, name in enumerate(["default", "other"]):
        model.set_adapter(name)
        expected = logits(model, tokens, repacked=True)  # eval mode, as the mixed batch ran
        assert_close_to_scale(mixed[row], expected[row], FLOAT32_RTOL)


# -- training ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_training_updates_only_the_adapters_and_lowers_the_loss(kind: str, saved_llama: str, tmp_path: Any) -> None:
    # the usual QLoRA recipe checkpoints activations; the 8-bit case trains without
    checkpointing = kind == "4bit"
    base = prepare_model_for_kbit_training(loaded_quantised(saved_llama, kind), use_gradient_checkpointing=checkpointing)
    assert base.is_gradient_checkpointing == checkpointing
    model = peftcore.get_peft_model(base, peftcore.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    model.train()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    codes_before = quantised_state(q_proj(model).base_layer.weight) if kind == "4bit" else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimiser = torch.optim.AdamW(trainable, lr=1e-2)
    tokens = ids()
    losses = []
    for _ in range(6):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p.detach(), frozen[name]), name
    if codes_before is not None:
        assert all(torch.equal(a, b) for a, b in zip(codes_before, quantised_state(q_proj(model).base_layer.weight)))
    model.eval()
    tokens_out = logits(model, tokens)
    model.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(loaded_quantised(saved_llama, kind), tmp_path)
    assert_close_to_scale(logits(hf, tokens), tokens_out, FLOAT32_RTOL)


# -- merging -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", HAND, ids=[c[0] for c in HAND])
def test_merge_requantises_within_one_step_of_the_full_precision_merge_and_as_hf(case: tuple) -> None:
    kind = case[1]
    core = core_lora(hand_quantised(case))
    core.train()  # no forward yet, so no CPU repacking: HF PEFT dequantises the plain layout only
    layer = q_proj(core)
    original = dequantise(layer.base_tensor("weight"))
    full_precision = original + layer.delta_weight("default").detach()
    core.merge_adapter()
    merged = dequantise(layer.base_tensor("weight"))
    error = float((merged - full_precision).abs().max())
    assert error <= QUANT_STEP[kind] * float(full_precision.abs().max())
    assert error > 0  # the sum really was quantised again

    hf_base = hand_quantised(case)
    # HF PEFT wraps bitsandbytes layers in its own bnb LoRA layers (the ones that merge them)
    # only for a model transformers flagged as loaded in 4/8-bit
    setattr(hf_base, f"is_loaded_in_{kind}", True)
    hf = peft.get_peft_model(hf_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    hf.train()
    hf_layer = hf.base_model.model.model.layers[0].self_attn.q_proj
    for name in ("lora_A", "lora_B"):
        getattr(hf_layer, name)["default"].weight.data.copy_(getattr(layer, name)["default"].weight.data)
    hf_layer.merge()
    hf_weight = hf_layer.get_base_layer().weight
    hf_weight = hf_weight if kind == "4bit" else _with_row_scales(hf_layer.get_base_layer())
    torch.testing.assert_close(merged, dequantise(hf_weight), rtol=0, atol=1e-6 * float(full_precision.abs().max()))


@pytest.mark.parametrize("case", HAND[:4], ids=[c[0] for c in HAND[:4]])
def test_merge_after_bitsandbytes_repacked_the_weight_is_still_one_step_off(case: tuple) -> None:
    """On an AVX512-BF16 CPU an eval-mode forward repacks a 4-bit weight; the merge unpacks
    a copy before dequantising. (HF PEFT 0.21.2 dequantises the repacked codes as they
    are: on this machine its merged weight was off by a third of the mean weight.)"""
    core = core_lora(hand_quantised(case))
    logits(core, ids(), repacked=True)
    layer = q_proj(core)
    if not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack the weight: this CPU lacks AVX512-BF16")
    full_precision = dequantise(layer.base_tensor("weight")) + layer.delta_weight("default").detach()
    core.merge_adapter()
    error = (dequantise(layer.base_tensor("weight")) - full_precision).abs()
    assert float(error.max()) <= QUANT_STEP["4bit"] * float(full_precision.abs().max())
    assert float(error.mean()) <= 0.15 * float(full_precision.abs().mean())


def _with_row_scales(layer: Any) -> Any:
    from peftcore_torch.quantised import attach_row_scales

    attach_row_scales(layer)
    return layer.weight


@pytest.mark.parametrize("case", HAND, ids=[c[0] for c in HAND])
def test_unmerge_restores_the_quantised_weight_bit_exactly(case: tuple) -> None:
    core = core_lora(hand_quantised(case))
    tokens = ids()
    before_out = logits(core, tokens, repacked=True)  # bitsandbytes may repack 4-bit weights for its CPU kernel
    layer = q_proj(core)
    parameter = layer.base_layer.weight
    before = quantised_state(layer.base_tensor("weight"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "changed while merged" warning: the repacking is not an edit
        for _ in range(2):
            core.merge_adapter()
            merged_out = logits(core, tokens, repacked=True)  # repacks the merged weight on such CPUs
            if getattr(layer.base_layer, "support_avx512bf16_for_cpu", False):
                assert layer.base_layer.weight.quant_state.packing_format_for_cpu  # the case this test is for
            core.unmerge_adapter()
    assert layer.base_layer.weight is parameter  # written in place: optimizers and hooks holding it stay valid
    after = quantised_state(layer.base_tensor("weight"))
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert torch.equal(logits(core, tokens, repacked=True), before_out)
    assert_close_to_scale(merged_out, before_out, 0.5)  # the same model, up to the merged weight's new rounding


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_merge_and_unload_leaves_quantised_layers_that_compute_the_merge(kind: str, saved_llama: str) -> None:
    core = core_lora(loaded_quantised(saved_llama, kind))
    tokens = ids()
    unmerged = logits(core, tokens)
    layer = q_proj(core)
    expected_weight = dequantise(layer.base_tensor("weight")) + layer.delta_weight("default").detach()
    plain = core.merge_and_unload(safe_merge=True)
    q = plain.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == ("Linear4bit" if kind == "4bit" else "Linear8bitLt")
    weight = q.weight if kind == "4bit" else _with_row_scales(q)
    assert float((dequantise(weight) - expected_weight).abs().max()) <= QUANT_STEP[kind] * float(expected_weight.abs().max())
    assert_close_to_scale(logits(plain, tokens), unmerged, 0.5)


# -- preparation ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_prepare_model_for_kbit_training_matches_hf_on_a_quantised_model(kind: str, saved_llama: str) -> None:
    ours = prepare_model_for_kbit_training(loaded_quantised(saved_llama, kind, torch.bfloat16))
    theirs = peft.prepare_model_for_kbit_training(loaded_quantised(saved_llama, kind, torch.bfloat16))

    def state(model: Any) -> dict:
        return {name: (p.dtype, p.requires_grad, type(p).__name__) for name, p in model.named_parameters()}

    assert state(ours) == state(theirs)
    assert ours.model.norm.weight.dtype == torch.float32  # widened; the quantised weights kept their type
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing
    embeddings = ours.get_input_embeddings()(ids())
    assert embeddings.requires_grad == theirs.get_input_embeddings()(ids()).requires_grad
