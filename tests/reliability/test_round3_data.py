"""Issue 23 (reliability round 3), the data classes: 3 (what is loaded is finite where
it reaches the outputs), 6 (all-or-nothing multi-tensor writes) and 7 (non-finite
XPrompt scores). Class 4 (bounded matching work) is in ``test_round3_matching.py``.
Tests are named ``test_class<N>_...``; "untouched" always means every tensor of the
model (adapters and base) bit-identical, and the same adapters, plans and configs."""

from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("transformers")

import peftcore  # noqa: E402
from peftcore import AdapterError, BackendError, LoraConfig, PromptTuningConfig, XPromptConfig, xprompt_prune  # noqa: E402
from peftcore.io import WEIGHTS_NAME  # noqa: E402
from tests.integration.tiny import llama_lm, random_ids  # noqa: E402


def snapshot(pm: Any) -> dict[str, Any]:
    """Everything a failed call must leave as it was."""
    return {
        "tensors": {k: v.detach().clone() for k, v in pm.state_dict().items()},
        "plans": dict(pm.plans),
        "configs": {k: v.to_dict() for k, v in pm.peft_config.items()},
        "active": list(pm.active_adapters),
    }


def same_bits(a: Any, b: Any) -> bool:
    """Bit-identical (NaN included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(bits), b.view(bits))
    return torch.equal(a, b)


def assert_untouched(pm: Any, before: dict[str, Any]) -> None:
    after = snapshot(pm)
    assert after["plans"] == before["plans"] and after["configs"] == before["configs"]
    assert after["active"] == before["active"]
    assert after["tensors"].keys() == before["tensors"].keys()
    changed = [k for k, v in before["tensors"].items() if not same_bits(v, after["tensors"][k])]
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


# -- 3. what is loaded is finite where it reaches the outputs ----------------------------
def rewrite_weights(directory: Any, change: Any) -> None:
    """Apply ``change(tensors)`` to the adapter's weights file, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    weights = directory / WEIGHTS_NAME
    with safe_open(str(weights), "np") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    change(tensors)
    save_file(tensors, str(weights), metadata=metadata)


def lora(**changes: Any) -> LoraConfig:
    fields: dict[str, Any] = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return LoraConfig(**{**fields, **changes})


def saved_adapter(tmp_path: Any, config: LoraConfig, name: str = "adapter", **save: Any) -> Any:
    directory = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftcore.get_peft_model(llama_lm(), config).save_pretrained(directory, **save)
    return directory


def assert_refused_everywhere(directory: Any, pattern: str, torch_dtype: Any = None) -> None:
    """``from_pretrained``, ``load_adapter`` under a new name and ``load_adapter`` over the
    same adapter (loaded with ``allow_non_finite=True``) refuse it and change nothing."""
    def base() -> Any:
        return llama_lm().to(torch_dtype) if torch_dtype else llama_lm()

    plain = base()
    plain_before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(AdapterError, match=pattern):
        peftcore.PeftModel.from_pretrained(plain, directory)
    assert all(same_bits(v, plain.state_dict()[k]) for k, v in plain_before.items())
    pm = peftcore.get_peft_model(base(), lora(lora_alpha=2))
    before = snapshot(pm)
    with pytest.raises(AdapterError, match=pattern):
        pm.load_adapter(directory, "other")
    assert_untouched(pm, before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peftcore.PeftModel.from_pretrained(base(), directory, allow_non_finite=True)
    before = snapshot(loaded)
    with pytest.raises(AdapterError, match=pattern):
        loaded.load_adapter(directory, "default")
    assert_untouched(loaded, before)


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), 1e300])
@pytest.mark.parametrize("layer", ["embed_tokens", "lm_head"])
def test_class3_non_finite_embedding_matrices_beside_the_adapter_are_refused(tmp_path: Any, value: float, layer: str) -> None:
    directory = saved_adapter(tmp_path, lora(target_modules=["embed_tokens", "lm_head", "q_proj"]), save_embedding_layers=True)

    def poison(tensors: dict) -> None:
        key = next(k for k in tensors if layer in k and not k.split(".")[-2].startswith("lora"))
        tensors[key] = tensors[key].astype(np.float64)
        tensors[key][3, 1] = value

    rewrite_weights(directory, poison)
    assert_refused_everywhere(directory, rf"embedding matrix for layer 'model.{layer}'|'{layer}'.*(NaN/Inf|beyond)")


def test_class3_embedding_values_beyond_a_half_precision_model_are_refused(tmp_path: Any) -> None:
    directory = saved_adapter(tmp_path, lora(target_modules=["embed_tokens"]), save_embedding_layers=True)
    rewrite_weights(directory, lambda t: t["base_model.model.model.embed_tokens.base_layer.weight"].__setitem__((0, 0), 1e5))
    assert_refused_everywhere(directory, "embedding matrix for layer 'model.embed_tokens'.*beyond the largest float16",
                              torch.float16)


@pytest.mark.parametrize(
    "changes, entry",
    [
        (dict(lora_alpha=1e308), r"lora_alpha=1e\+308"),
        (dict(lora_alpha=1e300, r=4, use_rslora=True), r"lora_alpha=1e\+300"),
        (dict(alpha_pattern={"v_proj": 1e39}), r"alpha_pattern\['v_proj'\]=1e\+39"),
    ],
)
@pytest.mark.parametrize("writer", ["peftcore", "hf_peft"])
def test_class3_config_scalars_that_make_the_scaling_non_finite_are_refused(
    tmp_path: Any, changes: dict, entry: str, writer: str
) -> None:
    if writer == "peftcore":
        directory = saved_adapter(tmp_path, lora(**changes))
    else:  # an HF PEFT adapter: no stored plan, the scaling is computed from the config alone
        import peft

        fields = {**dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), **changes}
        directory = tmp_path / "hf"
        peft.get_peft_model(llama_lm(), peft.LoraConfig(**fields)).save_pretrained(directory)
    assert_refused_everywhere(directory, rf"the config's {entry}.*not finite in float32")


@pytest.mark.parametrize(
    "tensor, what",
    [("q_proj.lora_A", r"'[^']*q_proj.lora_A.weight' .*A x"),
     ("v_proj.lora_B", r"lora_A.weight' and '[^']*v_proj.lora_B.weight' .*B A x")],
)
def test_class3_finite_factors_whose_product_overflows_are_refused(tmp_path: Any, tensor: str, what: str) -> None:
    directory = saved_adapter(tmp_path, lora())

    def scale(tensors: dict) -> None:
        for key in tensors:
            if tensor in key:
                tensors[key] = tensors[key] * np.float32(1e38)  # every value stays finite in float32
                assert np.isfinite(tensors[key]).all()

    rewrite_weights(directory, scale)
    assert_refused_everywhere(directory, what)
    # what the check protects: loaded anyway, an input with entries in [-1, 1] gives Inf/NaN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peftcore.PeftModel.from_pretrained(llama_lm(), directory, allow_non_finite=True)
    path = "model.layers.0.self_attn." + tensor.split(".")[0]
    tensors = pm.export_adapter("default")
    a, b = tensors[f"{path}.lora_A"].astype(np.float64), tensors[f"{path}.lora_B"].astype(np.float64)
    product = a if "lora_A" in tensor else b @ a
    worst = np.sign(product[np.argmax(np.abs(product).sum(axis=1))])
    with torch.no_grad():
        out = pm.get_base_model().get_submodule(path)(torch.tensor(worst, dtype=torch.float32)[None])
    assert not torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["prefix_tuning", "unipelt"])
def test_class3_prefix_keys_whose_query_products_overflow_are_refused(tmp_path: Any, method: str) -> None:
    from peftcore import PrefixTuningConfig, UniPELTConfig

    config = (
        PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM") if method == "prefix_tuning"
        else UniPELTConfig(variant="P", num_virtual_tokens=4, task_type="CAUSAL_LM")
    )
    directory = tmp_path / method
    peftcore.get_peft_model(llama_lm(), config).save_pretrained(directory)

    def scale(tensors: dict) -> None:
        for key in tensors:
            if key.endswith("prompt_embeddings") or key.endswith("prefix.keys"):
                largest = float(np.abs(tensors[key]).max())
                tensors[key] = (tensors[key].astype(np.float64) * (3e38 / largest)).astype(np.float32)
                assert np.isfinite(tensors[key]).all()  # each value finite, their sums over a key are not

    rewrite_weights(directory, scale)
    base = llama_lm()
    with pytest.raises(AdapterError, match=r"q \. k over a prefix key"):
        peftcore.PeftModel.from_pretrained(base, directory)
    assert not any("prefix" in name for name, _ in base.named_parameters())


@pytest.mark.parametrize(
    "changes, scaling",
    [(dict(lora_alpha=2e38), "1e+38"), (dict(lora_alpha=3e38, rank_pattern={"q_proj": 1}), "3e+38"),
     (dict(lora_alpha=1e38, alpha_pattern={"v_proj": 2e38}, use_rslora=True, r=4), "1e+38")],
)
def test_class3_a_scaling_finite_in_float32_can_still_overflow_with_the_tensors(
    tmp_path: Any, changes: dict, scaling: str
) -> None:
    directory = saved_adapter(tmp_path, lora(**changes))  # every scalar finite in float32
    assert_refused_everywhere(directory, rf"B A x, scaled by {re.escape(scaling)}")


def test_class3_legitimate_adapters_load_in_every_dtype(tmp_path: Any) -> None:
    directory = saved_adapter(tmp_path, lora(target_modules=["embed_tokens", "q_proj", "v_proj"], lora_alpha=16))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        pm = peftcore.PeftModel.from_pretrained(llama_lm().to(dtype), directory)
        with torch.no_grad():
            assert torch.isfinite(pm(input_ids=random_ids(2, 5)).logits).all()


# -- 6. all or nothing for every multi-tensor write ---------------------------------------
class Fault(RuntimeError):
    """A failure injected in the middle of a write."""


#: What an injected fault surfaces as: itself, or wrapped by the backend guard.
FAULT = (Fault, BackendError)


def fail_on_call(monkeypatch: Any, owner: Any, name: str, call: int) -> None:
    """Make ``owner.name`` do its work and then raise on its ``call``-th call (the
    earlier calls succeed): a write that fails part-way."""
    original = getattr(owner, name)
    count = {"n": 0}

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        count["n"] += 1
        if count["n"] == call:
            raise Fault(f"injected failure in {name} call {call}")
        return result

    monkeypatch.setattr(owner, name, wrapped)


def bert_lora() -> Any:
    from tests.integration.tiny import bert_cls

    return peftcore.get_peft_model(bert_cls(), lora(target_modules=["query", "value"]))


@pytest.mark.parametrize("bad", ["wrong_size", "nan", "inf_adapter_tensor", "wrong_size_adapter_tensor"])
def test_class6_set_peft_model_state_dict_checks_every_entry_before_writing_any(bad: str) -> None:
    from peftcore import get_peft_model_state_dict, set_peft_model_state_dict

    pm = bert_lora()
    state = {k: v + 1.0 for k, v in get_peft_model_state_dict(pm).items()}  # every adapter tensor would change
    bias_key = "base_model.model.bert.encoder.layer.1.attention.self.query.base_layer.bias"
    bias = pm.get_base_model().bert.encoder.layer[1].attention.self.query.base_layer.bias.detach().clone()
    state[bias_key] = bias + 1.0
    last = sorted(k for k in state if "lora" in k)[-1]
    if bad == "wrong_size":
        state[bias_key] = torch.zeros(bias.numel() + 1)
    elif bad == "nan":
        state[bias_key][5] = float("nan")
    elif bad == "inf_adapter_tensor":
        state[last][0, 0] = float("inf")
    else:
        state[last] = state[last][:, :1]
    before = snapshot(pm)
    with pytest.raises(AdapterError, match="values; the model's|NaN/Inf|shape"):
        set_peft_model_state_dict(pm, state)
    assert_untouched(pm, before)
    if bad == "nan":  # the caller may still opt in, and then everything is written
        set_peft_model_state_dict(pm, state, allow_non_finite=True)
        written = pm.get_base_model().bert.encoder.layer[1].attention.self.query.base_layer.bias
        assert torch.isnan(written[5]) and torch.equal(written[:5], bias[:5] + 1.0)


def test_class6_a_state_dict_write_failing_part_way_is_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftcore import get_peft_model_state_dict, set_peft_model_state_dict
    from peftcore_torch.runtime import TorchRuntime

    pm = bert_lora()
    state = {k: v + 1.0 for k, v in get_peft_model_state_dict(pm).items()}
    state["base_model.model.bert.encoder.layer.0.attention.self.value.base_layer.bias"] = torch.ones(32)
    state["base_model.model.bert.encoder.layer.1.attention.self.value.base_layer.bias"] = torch.ones(32)
    before = snapshot(pm)
    fail_on_call(monkeypatch, TorchRuntime, "write", 2)  # the second base entry
    with pytest.raises(FAULT, match="injected"):
        set_peft_model_state_dict(pm, state)
    monkeypatch.undo()
    assert_untouched(pm, before)


@pytest.mark.parametrize("where", ["adapter_layer", "embedding_matrix"])
@pytest.mark.parametrize("name", ["default", "new"])
def test_class6_load_adapter_failing_part_way_leaves_the_model_as_it_was(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, where: str, name: str
) -> None:
    from peftcore_torch.layers import AdapterLayer
    from peftcore_torch.peft_model import TorchPeftModel

    config = lora(target_modules=["embed_tokens", "lm_head", "q_proj", "v_proj"])
    directory = saved_adapter(tmp_path, config, save_embedding_layers=True)
    rewrite_weights(directory, lambda t: t.update({k: v + np.float32(0.5) for k, v in t.items()}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peftcore.get_peft_model(llama_lm(seed=3), config)
    before = snapshot(pm)
    if where == "adapter_layer":
        fail_on_call(monkeypatch, AdapterLayer, "load", 3)
    else:
        fail_on_call(monkeypatch, TorchPeftModel, "_set_base_weights", 1)
    with pytest.raises(FAULT, match="injected"):
        pm.load_adapter(directory, name)
    monkeypatch.undo()
    assert_untouched(pm, before)
    pm.load_adapter(directory, name)  # and it loads once nothing fails
    assert not same_bits(pm.get_base_model().model.embed_tokens.base_layer.weight,
                         before["tensors"]["base_model.model.model.embed_tokens.base_layer.weight"])


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
@pytest.mark.parametrize("weight", [1e80, float("nan"), "fault"])
def test_class6_add_weighted_adapter_is_all_or_nothing(
    monkeypatch: pytest.MonkeyPatch, combination: str, weight: Any
) -> None:
    from peftcore_torch.layers import AdapterLayer

    pm = peftcore.get_peft_model(llama_lm(), lora())
    pm.add_adapter("b", lora())
    before = snapshot(pm)
    if weight == "fault":
        fail_on_call(monkeypatch, AdapterLayer, "load", 2)
    error = FAULT if weight == "fault" else (ValueError, AdapterError)
    with pytest.raises(error, match="injected|finite|NaN/Inf"):
        pm.add_weighted_adapter(["default", "b"], [1.0, 1.0 if weight == "fault" else weight], "mix", combination)
    monkeypatch.undo()
    assert_untouched(pm, before)
    assert "mix" not in pm.peft_config


def residual_prompt_model() -> Any:
    from peftcore import ResidualPromptTuningConfig

    return peftcore.get_peft_model(llama_lm(), ResidualPromptTuningConfig(num_virtual_tokens=4, bottleneck_size=8)).eval()


@pytest.mark.parametrize("failure", ["fault", "overflow"])
def test_class6_a_failed_bake_leaves_the_adapter_unbaked(monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    from peftcore_torch.prompt import PromptEmbedding

    pm = residual_prompt_model()
    if failure == "overflow":  # finite tensors whose baked prompt is Inf
        tensors = pm.export_adapter("default")
        key = next(k for k in tensors if k.endswith("residual_norm_weight"))
        pm.import_adapter("default", {**tensors, key: np.full_like(tensors[key], 3e38)})
    else:
        fail_on_call(monkeypatch, PromptEmbedding, "bake", 1)  # bakes the layer, then fails
    before = snapshot(pm)
    ids = random_ids(2, 5)
    with torch.no_grad():
        out_before = pm(input_ids=ids).logits
    with pytest.raises(FAULT if failure == "fault" else AdapterError, match="injected|left unbaked"):
        pm.bake()
    monkeypatch.undo()
    assert_untouched(pm, before)
    with torch.no_grad():
        assert same_bits(pm(input_ids=ids).logits, out_before)


def test_class6_a_failed_xprompt_install_leaves_the_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftcore import model_ops

    pm = prompt_model()
    before = snapshot(pm)
    original = model_ops.apply_plan

    def failing(runtime: Any, model: Any, plan: Any, builders: Any) -> None:
        if any(getattr(op, "token_mask", ()) for op in plan.ops):
            raise Fault("injected failure installing the pruned prompt")
        original(runtime, model, plan, builders)

    monkeypatch.setattr(model_ops, "apply_plan", failing)
    with pytest.raises(FAULT, match="injected"):
        xprompt_prune(pm, batches(), lambda m, b: m(input_ids=b, labels=b).loss, XPromptConfig(), progress=False)
    monkeypatch.undo()
    assert_untouched(pm, before)
    assert list(pm.peft_config) == ["default"] and pm.active_adapters == ["default"]
