"""UniPELT on tiny transformers models (BERT, GPT-2, Llama) with the torch backend."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import peftcore  # noqa: E402
from peftcore import (  # noqa: E402
    AdapterError,
    ConfigError,
    LoraConfig,
    PeftModel,
    PlanError,
    TargetNotFoundError,
    UniPELTConfig,
    gate_values,
)
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from peftcore_torch.lora import LoraLinear  # noqa: E402
from peftcore_torch.prefix import AttentionPrefix, RoutedConfig  # noqa: E402
from peftcore_torch.unipelt import GatedLoraLinear  # noqa: E402

VOCAB = 100
FAMILIES = ["bert", "gpt2", "llama"]


# -- tiny models ---------------------------------------------------------------------------
def tiny(family: str, attn: str = "sdpa", head: bool = True) -> Any:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family == "bert":
            config = transformers.BertConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=32, num_labels=3, attn_implementation=attn,
            )
            model = transformers.BertForSequenceClassification(config) if head else transformers.BertModel(config)
        elif family == "gpt2":
            config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                             bos_token_id=0, eos_token_id=0, attn_implementation=attn)
            model = transformers.GPT2LMHeadModel(config)
        else:
            config = transformers.LlamaConfig(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32, attn_implementation=attn,
            )
            model = transformers.LlamaForCausalLM(config)
    return model.eval()


def unipelt(family: str, **fields: Any) -> UniPELTConfig:
    task = {"task_type": "SEQ_CLS"} if family == "bert" else {}
    return UniPELTConfig(**{"r": 4, "num_virtual_tokens": 3, "bottleneck_size": 8, **task, **fields})


def ids(batch: int = 2, seq: int = 7, seed: int = 1) -> Any:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def output(model: Any, **inputs: Any) -> Any:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def perturb(model: Any, seed: int = 3) -> None:
    """Move every trainable tensor off its initial value, so nothing passes by being zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))


def loss_of(family: str, model: Any, tokens: Any) -> Any:
    if family == "bert":
        return model(input_ids=tokens, labels=tokens[:, 0] % 3).loss
    return model(input_ids=tokens, labels=tokens).loss


# -- training, gates, merging, files -------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_training_lowers_loss_and_touches_only_the_adapter(family: str) -> None:
    model = tiny(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = peftcore.get_peft_model(model, unipelt(family, lora_dropout=0.1))
    peft_model.train()
    gates_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if ".gate_" in n and p.requires_grad}
    tokens = ids(8, 10)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(30):
        loss = loss_of(family, peft_model, tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # frozen tiny random models learn slowly; 0.1 nats is far beyond step-to-step noise
    assert losses[-1] < losses[0] - 0.1, losses
    gates_after = dict(peft_model.named_parameters())
    assert gates_before and all(not torch.equal(gates_after[n], v) for n, v in gates_before.items())  # the gates learn
    after = peft_model.unload().state_dict()
    changed = [k for k, v in original.items() if not torch.equal(after[k], v)]
    assert changed == []


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_values_are_readable_and_in_the_open_unit_interval(family: str) -> None:
    peft_model = peftcore.get_peft_model(tiny(family), unipelt(family))
    with pytest.raises(AdapterError, match="forward pass"):
        gate_values(peft_model)
    perturb(peft_model)
    output(peft_model, input_ids=ids(3))
    gates = gate_values(peft_model)
    expected = {f"{op.path}.{op.stem}" for op in peft_model.plans["default"].ops if op.op == "gate"}
    assert set(gates) == expected and len(expected) == 2 * 4 - (2 if family == "gpt2" else 0)
    for name, values in gates.items():
        assert values.shape == (3,), name
        assert ((values > 0) & (values < 1)).all(), name
    assert len({float(v[0]) for v in gates.values()}) > 1  # gates are separate, not one shared value


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_a_gated_adapter_is_a_clear_error(family: str) -> None:
    peft_model = peftcore.get_peft_model(tiny(family), unipelt(family))
    perturb(peft_model)
    before = output(peft_model, input_ids=ids())
    with pytest.raises(AdapterError, match=r"cannot be merged.*gate"):
        peft_model.merge_adapter()
    with pytest.raises(AdapterError, match="cannot be merged"):
        peft_model.merge_and_unload()
    layer = next(m for m in peft_model.model.modules() if isinstance(m, GatedLoraLinear))
    with pytest.raises(AdapterError, match="gated LoRA"):
        layer.merge(["default"])  # the layer refuses too, for callers that bypass PeftModel
    assert peft_model.merged_adapters == []
    torch.testing.assert_close(output(peft_model, input_ids=ids()), before, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_give_identical_outputs(family: str, tmp_path: Any) -> None:
    peft_model = peftcore.get_peft_model(tiny(family), unipelt(family, variant="APL"))
    perturb(peft_model)
    expected = output(peft_model, input_ids=ids())
    peft_model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny(family), str(tmp_path))
    torch.testing.assert_close(output(loaded, input_ids=ids()), expected, rtol=0, atol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    assert isinstance(loaded.peft_config["default"], UniPELTConfig)
    assert loaded.peft_config["default"].variant == "APL"


# -- attention masks ----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_matches_unbatched_rows(family: str) -> None:
    """The prefix widens the padding mask: a full row's outputs do not depend on its
    neighbours' padding, and a padded row's real tokens ignore the pads when nothing
    averages over them (the gates average over every position, pads included)."""
    for variant in ("APL", "P"):
        peft_model = peftcore.get_peft_model(tiny(family), unipelt(family, variant=variant))
        perturb(peft_model)
        tokens, mask = ids(2, 7), torch.ones(2, 7, dtype=torch.long)
        mask[1, 5:] = 0
        batched = output(peft_model, input_ids=tokens, attention_mask=mask)
        alone = output(peft_model, input_ids=tokens[:1], attention_mask=mask[:1])
        assert_close_to_scale(batched[0], alone[0])
        if variant == "P":
            peft_model.model.apply(_ungate)
            batched = output(peft_model, input_ids=tokens, attention_mask=mask)
            short = output(peft_model, input_ids=tokens[1:, :5], attention_mask=mask[1:, :5])
            assert_close_to_scale(batched[1, :5], short[0])


def _ungate(module: Any) -> None:
    if isinstance(module, AttentionPrefix):
        for name in list(module.gate_weight):
            del module.gate_weight[name]
            del module.gate_bias[name]


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_and_sdpa_attention_agree_with_a_prefix(family: str) -> None:
    outputs = []
    for attn in ("eager", "sdpa"):
        peft_model = peftcore.get_peft_model(tiny(family, attn), unipelt(family))
        perturb(peft_model)
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[0, :2] = 0
        outputs.append((output(peft_model, input_ids=ids()), output(peft_model, input_ids=ids(), attention_mask=mask)))
    for eager, sdpa in zip(*outputs):
        assert_close_to_scale(eager, sdpa)


def test_prefix_is_seen_by_every_query_of_a_causal_model() -> None:
    """In a causal model the first token attends only to itself, so its output changing
    when only the prefix changes shows that the prefix is visible to it."""
    peft_model = peftcore.get_peft_model(tiny("llama", "eager"), unipelt("llama", variant="P"))
    peft_model.model.apply(_ungate)
    first = output(peft_model, input_ids=ids())[:, 0]
    holder = peft_model.model.model.layers[0].self_attn.prefix
    with torch.no_grad():
        holder.prefix_keys["default"].zero_()
        holder.prefix_values["default"].fill_(0.5)
    assert not torch.allclose(output(peft_model, input_ids=ids())[:, 0], first)
    with peft_model.disable_adapter():
        base_first = output(peft_model, input_ids=ids())[:, 0]
    assert not torch.allclose(base_first, first)


# -- building, unloading, several adapters --------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_unload_restores_the_plain_model(family: str) -> None:
    base = output(tiny(family), input_ids=ids())
    peft_model = peftcore.get_peft_model(tiny(family), unipelt(family))
    perturb(peft_model)
    model = peft_model.unload()
    torch.testing.assert_close(output(model, input_ids=ids()), base, rtol=0, atol=0)
    assert not any(isinstance(m, AttentionPrefix) for m in model.modules())
    assert not any(isinstance(getattr(m, "config", None), RoutedConfig) for m in model.modules())
    assert set(model.state_dict()) == set(tiny(family).state_dict())


def test_deepcopy_of_an_adapted_model_runs_the_same() -> None:
    peft_model = peftcore.get_peft_model(tiny("llama"), unipelt("llama"))
    perturb(peft_model)
    clone = copy.deepcopy(peft_model.model)
    torch.testing.assert_close(output(clone, input_ids=ids()), output(peft_model, input_ids=ids()), rtol=0, atol=0)
    holder = clone.model.layers[0].self_attn.prefix
    assert holder.attention is clone.model.layers[0].self_attn


def test_unipelt_beside_a_plain_lora_adapter() -> None:
    peft_model = peftcore.get_peft_model(tiny("bert", head=False), LoraConfig(r=2, target_modules=["query"]), "plain")
    layer = peft_model.model.encoder.layer[0].attention.self.query
    assert type(layer) is LoraLinear
    peft_model.add_adapter("unipelt", unipelt("bert", task_type=None))
    assert peft_model.model.encoder.layer[0].attention.self.query is layer and isinstance(layer, GatedLoraLinear)
    perturb(peft_model)
    peft_model.set_adapter("unipelt")
    perturb(peft_model, seed=4)
    peft_model.set_adapter("plain")
    plain_out = output(peft_model, input_ids=ids())
    peft_model.merge_adapter()  # the ungated adapter still merges on the gated layer
    assert_close_to_scale(output(peft_model, input_ids=ids()), plain_out)
    peft_model.unmerge_adapter()
    peft_model.set_adapter("unipelt")
    assert not torch.allclose(output(peft_model, input_ids=ids()), plain_out)
    peft_model.delete_adapter("unipelt")
    torch.testing.assert_close(output(peft_model, input_ids=ids()), plain_out, rtol=0, atol=0)
    assert not peft_model.model.encoder.layer[0].attention.self.prefix.has_adapter("unipelt")


def test_layout_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="variant"):
        UniPELTConfig(variant="APX")
    with pytest.raises(TargetNotFoundError, match="has no module 'mlp.wrong'"):
        peftcore.get_peft_model(tiny("llama"), unipelt("llama", ffn_output_module="mlp.wrong"))
    with pytest.raises(TargetNotFoundError, match="not a linear layer"):
        peftcore.get_peft_model(tiny("llama"), unipelt("llama", variant="L", lora_modules=["input_layernorm"]))
    with pytest.raises(TargetNotFoundError, match="no transformer block"):
        peftcore.get_peft_model(tiny("llama"), unipelt("llama", layers_pattern="stages"))
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="no default UniPELT layout"):
        peftcore.get_peft_model(mlp, UniPELTConfig())


def test_unsupported_attention_implementation_is_refused() -> None:
    model = tiny("llama")
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(PlanError, match="eager.*sdpa"):
        peftcore.get_peft_model(model, unipelt("llama"))
    assert not any(isinstance(getattr(m, "config", None), RoutedConfig) for m in model.modules())


def test_layers_to_transform_and_variant_choose_the_ops() -> None:
    peft_model = peftcore.get_peft_model(tiny("gpt2"), UniPELTConfig(variant="AP", layers_to_transform=[1], bottleneck_size=8))
    ops = peft_model.plans["default"].ops
    assert [op.op for op in ops] == ["freeze_base", "prefix", "gate", "bottleneck_adapter", "gate"]
    assert {op.path for op in ops[1:]} == {"transformer.h.1.attn", "transformer.h.1.mlp.c_proj"}
    assert ops[1].width == 32 and ops[1].key_path == "transformer.h.1.attn.c_attn"
