"""``from peftcore import X`` for Hugging Face PEFT's public names (``peft.__all__``): HF's
meaning where peftcore has the feature, checked against real HF PEFT, and an ImportError
naming the feature where it has not."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import peftcore  # noqa: E402
from peftcore.hf_names import NOT_IMPLEMENTED  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from tests.integration import tiny  # noqa: E402
from tests.subprocess_env import child_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def importable(name: str) -> bool:
    try:
        exec(f"from peftcore import {name}", {})
    except ImportError as error:
        assert "does not implement" in str(error) and name in str(error), error
        assert name in NOT_IMPLEMENTED, f"{name}: {error}"
        return False
    return True


def test_every_hf_name_imports_or_says_what_is_not_implemented() -> None:
    names = sorted(peft.__all__)
    ours = [name for name in names if importable(name)]
    rest = [name for name in names if name not in ours]
    assert set(rest) == set(NOT_IMPLEMENTED) & set(names)
    # the README states the figure measured here
    readme = (ROOT / "README.md").read_text()
    assert f"{len(ours)} of the {len(names)} names" in readme, (len(ours), len(names))
    with pytest.raises(ImportError, match="AdaLoRA, which peftcore does not implement"):
        from peftcore import AdaLoraConfig  # noqa: F401
    with pytest.raises(AttributeError):
        peftcore.no_such_name  # noqa: B018
    assert "PeftModelForCausalLM" in dir(peftcore)


def test_import_peftcore_and_a_missing_name_leave_torch_out() -> None:
    code = (
        "import sys, peftcore\n"
        "from peftcore import LoraConfig, PeftError, PromptLearningConfig, PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "try:\n    from peftcore import VeraConfig\nexcept ImportError:\n    pass\n"
        "print([m for m in ('torch', 'transformers') if m in sys.modules])\n"
        "from peftcore import PeftModelForCausalLM\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(ROOT), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "True"]


def test_config_mapping_errors_and_prompt_learning_type_match_hf() -> None:
    ours = peftcore.PEFT_TYPE_TO_CONFIG_MAPPING
    shared = set(ours) & set(peft.PEFT_TYPE_TO_CONFIG_MAPPING)
    assert {"LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"} <= shared
    for peft_type in shared:
        assert ours[peft_type].__name__ == peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].__name__
    assert peftcore.IA3Config is ours["IA3"]
    for library in (peft, peftcore):
        prompt = library.PromptTuningConfig(num_virtual_tokens=2)
        assert isinstance(prompt, library.PromptLearningConfig)
        assert isinstance(library.PrefixTuningConfig(num_virtual_tokens=2), library.PromptLearningConfig)
        assert not isinstance(library.LoraConfig(), library.PromptLearningConfig)
        with pytest.raises(library.NoMatchingPeftModuleError) as info:
            library.get_peft_model(tiny.llama_lm(), library.LoraConfig(target_modules=["no_such_layer"]))
        assert isinstance(info.value, (ValueError, library.PeftError))
    assert issubclass(peftcore.NoMatchingPeftModuleError, peftcore.PeftError)


# -- the task classes ---------------------------------------------------------------------------
def bert(cls_name: str) -> Callable[[], Any]:
    def build() -> Any:
        config = transformers.BertConfig(
            vocab_size=tiny.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, num_labels=3,
        )
        return tiny.seeded(lambda: getattr(transformers, cls_name)(config))

    return build


TASKS = {
    "CAUSAL_LM": (tiny.llama_lm, ["q_proj", "v_proj"]),
    "SEQ_2_SEQ_LM": (tiny.t5_lm, ["q", "v"]),
    "SEQ_CLS": (tiny.bert_cls, ["query", "value"]),
    "TOKEN_CLS": (bert("BertForTokenClassification"), ["query", "value"]),
    "QUESTION_ANS": (bert("BertForQuestionAnswering"), ["query", "value"]),
    "FEATURE_EXTRACTION": (bert("BertModel"), ["query", "value"]),
}


@pytest.mark.parametrize("task_type", list(TASKS))
def test_get_peft_model_returns_hf_s_task_class(task_type: str, tmp_path: Path) -> None:
    build, targets = TASKS[task_type]
    ours = peftcore.get_peft_model(build(), peftcore.LoraConfig(task_type=task_type, target_modules=targets))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(task_type=task_type, target_modules=targets))
    assert type(ours).__name__ == type(theirs).__name__
    assert type(ours) is peftcore.MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task_type]
    assert isinstance(ours, peftcore.PeftModel) and isinstance(ours, torch.nn.Module)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.save_pretrained(str(tmp_path))
    loaded = peftcore.PeftModel.from_pretrained(build(), str(tmp_path))
    assert type(loaded) is type(ours)
    assert type(pickle.loads(pickle.dumps(ours))) is type(ours)


def test_task_mapping_and_hf_style_construction() -> None:
    assert {k: v.__name__ for k, v in peftcore.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items()} == {
        k: v.__name__ for k, v in peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items()
    }
    config = peftcore.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], init_lora_weights=False)
    built = peftcore.PeftModelForCausalLM(tiny.llama_lm(), config, adapter_name="a")
    torch.manual_seed(0)
    wrapped = peftcore.get_peft_model(tiny.llama_lm(), config, adapter_name="a")
    assert type(built) is type(wrapped) and built.active_adapter == "a"
    assert set(built.state_dict()) == set(wrapped.state_dict())
    with pytest.raises(peftcore.ConfigError, match="PeftModelForSequenceClassification"):
        peftcore.PeftModelForCausalLM(tiny.bert_cls(), peftcore.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    plain = peftcore.get_peft_model(tiny.llama_lm(), peftcore.LoraConfig(target_modules=["q_proj"]))
    assert isinstance(plain, peftcore.PeftModel) and type(plain) not in peftcore.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.values()


# -- status, weights and helpers ----------------------------------------------------------------
def _pair() -> tuple[Any, Any]:
    """The same two-adapter LoRA model in both libraries, one adapter merged after switching."""
    models = []
    for library in (peftcore, peft):
        model = library.get_peft_model(tiny.llama_lm(), library.LoraConfig(target_modules=["q_proj", "v_proj"]))
        model.add_adapter("other", library.LoraConfig(target_modules=["q_proj"]))
        model.set_adapter("other")
        model.merge_adapter()
        models.append(model)
    return models[0], models[1]


def test_layer_and_model_status_match_hf() -> None:
    ours, theirs = _pair()
    fields = ("name", "enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices")
    our_layers = sorted(peftcore.get_layer_status(ours), key=lambda s: s.name)
    their_layers = sorted(peft.get_layer_status(theirs), key=lambda s: s.name)
    assert [[getattr(s, f) for f in fields] for s in our_layers] == [[getattr(s, f) for f in fields] for s in their_layers]
    model_fields = (
        "base_model_type", "peft_types", "trainable_params", "total_params", "num_adapter_layers", "enabled",
        "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices", "quantization_backend",
    )
    our_status, their_status = peftcore.get_model_status(ours), peft.get_model_status(theirs)
    assert {f: getattr(our_status, f) for f in model_fields} == {f: getattr(their_status, f) for f in model_fields}
    assert our_status.merged_adapters == ["other"] and our_status.active_adapters == ["other"]
    with pytest.raises(ValueError, match="No adapter layers"):
        peftcore.get_layer_status(tiny.llama_lm())


def test_load_peft_weights_and_base_state_match_hf(tmp_path: Path) -> None:
    ours = peftcore.get_peft_model(tiny.llama_lm(), peftcore.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    ours.save_pretrained(str(tmp_path))
    mine, hf = peftcore.load_peft_weights(str(tmp_path)), peft.load_peft_weights(str(tmp_path))
    assert set(mine) == set(hf)
    for key in hf:
        torch.testing.assert_close(mine[key], hf[key], rtol=0, atol=0)
    base = peftcore.get_base_model_state_dict(ours)
    assert set(base) == set(tiny.llama_lm().state_dict())


def test_cast_mixed_precision_params_and_shift_tokens_right_match_hf() -> None:
    ours = peftcore.get_peft_model(tiny.llama_lm(), peftcore.LoraConfig(target_modules=["q_proj"]))
    theirs = peft.get_peft_model(tiny.llama_lm(), peft.LoraConfig(target_modules=["q_proj"]))
    peftcore.cast_mixed_precision_params(ours, torch.bfloat16)
    peft.cast_mixed_precision_params(theirs, torch.bfloat16)
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    labels = torch.tensor([[5, 6, -100, -100], [7, 8, 9, -100]])
    assert torch.equal(peftcore.shift_tokens_right(labels, 0, 2), peft.shift_tokens_right(labels, 0, 2))


def test_not_implemented_names_say_what_they_belong_to() -> None:
    for name, feature in NOT_IMPLEMENTED.items():
        with pytest.raises(ImportError, match=re.escape(feature)):
            getattr(peftcore, name)


PROMPT_MODULE_CONFIGS = {
    "PromptEmbedding": lambda lib: lib.PromptTuningConfig(
        num_virtual_tokens=3, token_dim=8, num_transformer_submodules=2, num_layers=2, num_attention_heads=2
    ),
    "PromptEncoder-MLP": lambda lib: lib.PromptEncoderConfig(
        num_virtual_tokens=3, token_dim=8, encoder_hidden_size=6, num_transformer_submodules=1, num_layers=2,
        num_attention_heads=2,
    ),
    "PromptEncoder-LSTM": lambda lib: lib.PromptEncoderConfig(
        num_virtual_tokens=3, token_dim=8, encoder_hidden_size=6, num_transformer_submodules=1, num_layers=2,
        num_attention_heads=2, encoder_reparameterization_type="LSTM",
    ),
    "PrefixEncoder": lambda lib: lib.PrefixTuningConfig(
        num_virtual_tokens=3, token_dim=8, num_layers=2, num_attention_heads=2, encoder_hidden_size=6,
    ),
    "PrefixEncoder-projection": lambda lib: lib.PrefixTuningConfig(
        num_virtual_tokens=3, token_dim=8, num_layers=2, num_attention_heads=2, encoder_hidden_size=6,
        prefix_projection=True,
    ),
}


@pytest.mark.parametrize("case", list(PROMPT_MODULE_CONFIGS))
def test_standalone_prompt_modules_match_hf(case: str) -> None:
    name = case.split("-")[0]
    make = PROMPT_MODULE_CONFIGS[case]
    words = torch.nn.Embedding(20, 8)
    args = (words,) if name == "PromptEmbedding" else ()
    theirs = getattr(peft, name)(make(peft), *args)
    ours = getattr(peftcore, name)(make(peftcore), *args)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    indices = torch.arange(ours.embedding.num_embeddings).unsqueeze(0)
    assert_close_to_scale(ours(indices), theirs(indices))


def test_prompt_embedding_text_init_and_missing_sizes() -> None:
    words = torch.nn.Embedding(20, 8)
    config = peftcore.PromptTuningConfig(
        num_virtual_tokens=4, token_dim=8, num_transformer_submodules=1, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="x", tokenizer=lambda text: [5, 6, 7],
    )
    module = peftcore.PromptEmbedding(config, words)
    torch.testing.assert_close(module.embedding.weight, words.weight[[5, 6, 7, 5]], rtol=0, atol=0)
    with pytest.raises(peftcore.ConfigError, match="token_dim must be set"):
        peftcore.PrefixEncoder(peftcore.PrefixTuningConfig(num_virtual_tokens=2, num_layers=2))
