"""Adapter files interoperate with the real Hugging Face ``peft`` package, both ways.

Every model here is a tiny ``transformers`` model built locally from a config with
seeded random weights (nothing is downloaded). For each architecture we check that

- an adapter saved by peftcore loads in HF PEFT and gives the same outputs (a), and
- an adapter saved by HF PEFT loads in peftcore and gives the same outputs (b),

plus merging, unloading, the identity at init, rsLoRA and rank/alpha patterns, and the
errors a damaged adapter file raises.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import peftcore  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

VOCAB = 100
WEIGHTS = "adapter_model.safetensors"
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- tiny models ---------------------------------------------------------------------------
def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build()
    return model.eval()


def gpt2(tie: bool = True) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=tie
    )
    return _seeded(lambda: transformers.GPT2LMHeadModel(config))


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )
    return _seeded(lambda: transformers.BertModel(config))


def bert_cls() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
    )
    return _seeded(lambda: transformers.BertForSequenceClassification(config))


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    return _seeded(lambda: transformers.LlamaForCausalLM(config))


def input_ids() -> Any:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 7), generator=generator)


def output_of(model: Any) -> Any:
    """Logits when the model has them, else the last hidden state (eval mode, no grad)."""
    model.eval()
    with torch.no_grad():
        out = model(input_ids=input_ids())
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def perturb_trainable(model: nn.Module, seed: int = 2) -> None:
    """Add noise to every trainable tensor (LoRA A/B and modules_to_save copies), so
    an adapter that was saved or loaded wrongly cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


# -- cases ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    lora: Dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("gpt2-attn", gpt2, {"target_modules": ["c_attn", "c_proj"]}),
    Case("gpt2-wte", gpt2, {"target_modules": ["c_attn", "wte"]}),
    Case("bert-qv", bert, {"target_modules": ["query", "value"]}),
    Case("bert-cls", bert_cls, {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
    Case("llama-7", llama, {"target_modules": LLAMA_LINEARS}),
    Case("llama-all-linear", llama, {"target_modules": "all-linear"}),
    Case(
        "llama-rslora-patterns",
        llama,
        {
            "target_modules": LLAMA_LINEARS,
            "r": 4,
            "lora_alpha": 16,
            "use_rslora": True,
            "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
            "alpha_pattern": {"v_proj": 5, "layers.0.mlp.up_proj": 3},
        },
    ),
]
CASE_IDS = [c.name for c in CASES]

_BASES: Dict[str, nn.Module] = {}


def base_of(case: Case) -> nn.Module:
    """A fresh copy of the case's base model (built once per builder, then deep-copied)."""
    key = case.build.__name__
    if key not in _BASES:
        _BASES[key] = case.build()
    return copy.deepcopy(_BASES[key])


def core_config(case: Case, **extra: Any) -> peftcore.LoraConfig:
    return peftcore.LoraConfig(**{"r": 4, "lora_alpha": 8, **case.lora, **extra})


def hf_config(case: Case, **extra: Any) -> Any:
    kwargs: Dict[str, Any] = {"r": 4, "lora_alpha": 8, **case.lora, **extra}
    if case.build is gpt2:
        kwargs["fan_in_fan_out"] = True  # what HF PEFT wants for Conv1D
    return peft.LoraConfig(**kwargs)


def hf_scalings(model: nn.Module) -> Dict[str, float]:
    """``{layer path: scaling}`` of a (HF or peftcore) LoRA model's ``default`` adapter."""
    found: Dict[str, float] = {}
    for path, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling and hasattr(module, "base_layer"):
            path = path.replace("base_model.model.", "", 1)
            found[path] = float(scaling["default"])
    return found


def tensor_shapes(directory: Path) -> Dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in load_file(str(directory / WEIGHTS)).items()}


# -- (a) peftcore -> HF PEFT -----------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_peftcore_adapter_loads_in_hf_peft(case: Case, tmp_path: Path) -> None:
    core = peftcore.get_peft_model(base_of(case), core_config(case, init_lora_weights=False))
    perturb_trainable(core.model)
    expected = output_of(core)
    assert not torch.allclose(expected, output_of(base_of(case)), atol=1e-3), "adapter is a no-op"
    core.save_pretrained(tmp_path)

    hf = peft.PeftModel.from_pretrained(base_of(case), str(tmp_path))
    assert_close_to_scale(output_of(hf), expected)
    assert hf_scalings(hf) == pytest.approx(hf_scalings(core.model))


# -- (b) HF PEFT -> peftcore -----------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hf_peft_adapter_loads_in_peftcore(case: Case, tmp_path: Path) -> None:
    hf = peft.get_peft_model(base_of(case), hf_config(case, init_lora_weights=False))
    perturb_trainable(hf)
    expected = output_of(hf)
    assert not torch.allclose(expected, output_of(base_of(case)), atol=1e-3), "adapter is a no-op"
    hf.save_pretrained(str(tmp_path))

    core = peftcore.PeftModel.from_pretrained(base_of(case), tmp_path)
    assert_close_to_scale(output_of(core), expected)
    assert hf_scalings(core.model) == pytest.approx(hf_scalings(hf))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_same_tensor_keys_and_shapes_as_hf_peft(case: Case, tmp_path: Path) -> None:
    peftcore.get_peft_model(base_of(case), core_config(case)).save_pretrained(tmp_path / "core")
    peft.get_peft_model(base_of(case), hf_config(case)).save_pretrained(str(tmp_path / "hf"))
    assert tensor_shapes(tmp_path / "core") == tensor_shapes(tmp_path / "hf")


@pytest.mark.parametrize("modules_to_save", [None, ["classifier"]], ids=["auto", "explicit"])
def test_hf_seq_cls_adapter_loads_in_peftcore(tmp_path: Path, modules_to_save: Optional[list]) -> None:
    """HF PEFT's task_type="SEQ_CLS" appends "classifier" and "score" to modules_to_save
    (["classifier", "score"], or ["classifier", "classifier", "score"] when the user
    named the head too). A model has only one of them and HF PEFT loads such a file,
    so peftcore must too."""
    case = CASES[CASE_IDS.index("bert-cls")]
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["query", "value"], modules_to_save=modules_to_save,
        init_lora_weights=False,
    )
    hf = peft.get_peft_model(base_of(case), config)
    perturb_trainable(hf)
    expected = output_of(hf)
    hf.save_pretrained(str(tmp_path))
    assert "score" in json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]

    core = peftcore.PeftModel.from_pretrained(base_of(case), tmp_path)
    assert_close_to_scale(output_of(core), expected)


def test_trained_peftcore_adapter_round_trips_through_hf(tmp_path: Path) -> None:
    """peftcore -> HF -> peftcore keeps the outputs (the HF copy re-saves the adapter)."""
    case = CASES[CASE_IDS.index("llama-rslora-patterns")]
    core = peftcore.get_peft_model(base_of(case), core_config(case, init_lora_weights=False))
    expected = output_of(core)
    core.save_pretrained(tmp_path / "core")
    hf = peft.PeftModel.from_pretrained(base_of(case), str(tmp_path / "core"))
    hf.save_pretrained(str(tmp_path / "hf"))
    again = peftcore.PeftModel.from_pretrained(base_of(case), tmp_path / "hf")
    assert_close_to_scale(output_of(again), expected)


# -- behaviour on real architectures -----------------------------------------------------------
MERGE_CASES = [
    Case("gpt2-untied", lambda: gpt2(tie=False), {"target_modules": ["c_attn", "c_proj", "wte"]}),
    Case("bert-cls", bert_cls, {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
    Case("llama-all-linear", llama, {"target_modules": "all-linear", "use_rslora": True}),
]


def _train(model: Any, steps: int = 3) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=1e-2)
    ids = input_ids()
    for _ in range(steps):
        out = model(input_ids=ids)
        logits = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        loss = logits.float().pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()


@pytest.mark.parametrize("case", MERGE_CASES, ids=[c.name for c in MERGE_CASES])
def test_merged_matches_unmerged_after_training(case: Case) -> None:
    base = case.build()
    expected_base = output_of(base)
    core = peftcore.get_peft_model(copy.deepcopy(base), core_config(case))
    frozen_before = {n: p.detach().clone() for n, p in core.model.named_parameters() if not p.requires_grad}
    _train(core)
    for name, param in core.model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), f"frozen parameter {name} changed in training"
    unmerged = output_of(core)
    assert not torch.allclose(unmerged, expected_base, atol=1e-4), "training did not change the outputs"

    core.merge_adapter()
    assert_close_to_scale(output_of(core), unmerged)
    core.unmerge_adapter()
    assert_close_to_scale(output_of(core), unmerged)
    for name, param in core.model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), f"unmerge did not restore {name}"

    plain = core.merge_and_unload()
    assert_close_to_scale(output_of(plain), unmerged)
    assert {type(m).__name__ for m in plain.modules()} <= {type(m).__name__ for m in base.modules()}


def _module_types(model: nn.Module) -> Dict[str, type]:
    return {path: type(module) for path, module in model.named_modules()}


@pytest.mark.parametrize(
    "case",
    [CASES[CASE_IDS.index(n)] for n in ("gpt2-wte", "gpt2-attn", "bert-cls", "llama-all-linear")],
    ids=["gpt2-wte", "gpt2-attn", "bert-cls", "llama-all-linear"],
)
def test_unload_restores_original_modules(case: Case) -> None:
    base = base_of(case)
    expected = output_of(base)
    types_before = _module_types(base)
    core = peftcore.get_peft_model(copy.deepcopy(base), core_config(case, init_lora_weights=False))
    plain = core.unload()
    assert _module_types(plain) == types_before
    for path, module in plain.named_modules():
        name = path.rsplit(".", 1)[-1]
        if name in ("c_attn", "c_proj"):
            assert type(module) is Conv1D, path
        elif name == "wte":
            assert type(module) is nn.Embedding, path
        elif name in LLAMA_LINEARS or name in ("query", "value", "classifier"):
            assert type(module) is nn.Linear, path
    assert torch.equal(output_of(plain), expected)


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_lora_at_init_is_exactly_the_base_model(case: Case, init: Any) -> None:
    expected = output_of(base_of(case))
    core = peftcore.get_peft_model(base_of(case), core_config(case, init_lora_weights=init))
    assert torch.equal(output_of(core), expected)


# -- damaged adapter files ---------------------------------------------------------------------
def _rewrite_weights(directory: Path, edit: Callable[[Dict[str, Any]], None], keep_metadata: bool) -> None:
    path = str(directory / WEIGHTS)
    with safe_open(path, framework="np") as handle:
        metadata: Optional[Dict[str, str]] = dict(handle.metadata() or {})
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata if keep_metadata else {"format": "pt"})


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    case = CASES[CASE_IDS.index("llama-7")]
    directory = tmp_path_factory.mktemp("llama-adapter")
    peftcore.get_peft_model(base_of(case), core_config(case, init_lora_weights=False)).save_pretrained(directory)
    return directory


def _copy_dir(source: Path, target: Path) -> Path:
    target.mkdir()
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


@pytest.mark.parametrize("keep_metadata", [True, False], ids=["with-plan", "hf-style"])
def test_missing_tensor_is_an_adapter_error_naming_it(saved_llama: Path, tmp_path: Path, keep_metadata: bool) -> None:
    directory = _copy_dir(saved_llama, tmp_path / "adapter")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    _rewrite_weights(directory, lambda t: t.pop(key), keep_metadata)
    with pytest.raises(peftcore.AdapterError, match=key.replace(".", r"\.")):
        peftcore.PeftModel.from_pretrained(base_of(CASES[CASE_IDS.index("llama-7")]), directory)


@pytest.mark.parametrize("keep_metadata", [True, False], ids=["with-plan", "hf-style"])
def test_wrong_shape_is_an_adapter_error_naming_it(saved_llama: Path, tmp_path: Path, keep_metadata: bool) -> None:
    directory = _copy_dir(saved_llama, tmp_path / "adapter")
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"

    def widen(tensors: Dict[str, Any]) -> None:
        import numpy as np

        tensors[key] = np.zeros((tensors[key].shape[0] + 1, tensors[key].shape[1]), dtype=tensors[key].dtype)

    _rewrite_weights(directory, widen, keep_metadata)
    base = base_of(CASES[CASE_IDS.index("llama-7")])
    types_before = _module_types(base)
    with pytest.raises(peftcore.AdapterError, match=key.replace(".", r"\.")):
        peftcore.PeftModel.from_pretrained(base, directory)
    assert _module_types(base) == types_before, "a failed load left adapter layers in the model"


def test_same_files_load_in_hf_peft_after_peftcore_validation(saved_llama: Path) -> None:
    """The undamaged directory the error tests start from is a valid HF PEFT adapter."""
    case = CASES[CASE_IDS.index("llama-7")]
    core = peftcore.PeftModel.from_pretrained(base_of(case), saved_llama)
    hf = peft.PeftModel.from_pretrained(base_of(case), str(saved_llama))
    assert_close_to_scale(output_of(hf), output_of(core))
