"""Prompt tuning's TEXT init with the tokenizer the user names, as Hugging Face PEFT loads it
(``AutoTokenizer.from_pretrained(tokenizer_name_or_path, **tokenizer_kwargs)``), and HF's
prompt-tuning recipe run with only the import changed. Local tokenizer directories only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import peftcore  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from tests.subprocess_env import child_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
INIT_TEXT = "Classify if the tweet is a complaint or not:"
WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] classify if the tweet is a complaint or not : text label no yes my order "
    "never arrived love this phone great service still waiting for refund thanks team worst app ever"
).split()
TWEETS = [
    ("my order never arrived", "yes"),
    ("love this phone", "no"),
    ("great service thanks team", "no"),
    ("still waiting for my refund", "yes"),
    ("worst app ever", "yes"),
    ("thanks for the great phone", "no"),
    ("my refund never arrived", "yes"),
    ("love the team", "no"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama saved with its own word-piece tokenizer, as ``model_name_or_path`` in HF's recipes."""
    directory = tmp_path_factory.mktemp("tiny-llama-with-tokenizer")
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    transformers.BertTokenizer(str(vocab)).save_pretrained(str(directory))
    vocab.unlink()  # the saved tokenizer.json is all that loading needs
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(directory))
    return str(directory)


def prompt_table(model: Any) -> torch.Tensor:
    """The prompt's rows, wherever the library keeps them."""
    if isinstance(model, peftcore.PeftModel):
        return model.get_input_embeddings().prompt_embeddings["default"].detach().clone()
    return model.prompt_encoder["default"].embedding.weight.detach().clone()


def test_text_init_loads_the_named_tokenizer_directory_as_hf_does(model_dir: str) -> None:
    kwargs = {"model_max_length": 32}
    ours = peftcore.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(model_dir),
        peftcore.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=14, prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT,
            tokenizer_name_or_path=model_dir, tokenizer_kwargs=kwargs,
        ),
    )
    theirs = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(model_dir),
        peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=14, prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT,
            tokenizer_name_or_path=model_dir, tokenizer_kwargs=kwargs,
        ),
    )
    # the text with its special tokens ([CLS] ... [SEP], 12 ids), repeated to 14 rows
    ids = transformers.AutoTokenizer.from_pretrained(model_dir)(INIT_TEXT)["input_ids"]
    assert ours.plans["default"].ops_of("prompt_embedding")[0].init_token_ids == tuple((ids * 2)[:14])
    torch.testing.assert_close(prompt_table(ours), prompt_table(theirs), rtol=0, atol=0)


def test_a_tokenizer_object_still_wins_over_the_name(model_dir: str) -> None:
    config = peftcore.PromptTuningConfig(
        num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="x",
        tokenizer_name_or_path="not/a-directory", tokenizer=lambda text: [5, 6],
    )
    model = peftcore.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(model_dir), config)
    assert model.plans["default"].ops_of("prompt_embedding")[0].init_token_ids == (5, 6, 5)


def test_a_tokenizer_that_cannot_load_is_a_config_error_with_transformers_message(tmp_path: Path) -> None:
    config = peftcore.PromptTuningConfig(
        num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="x",
        tokenizer_name_or_path=str(tmp_path),  # a directory with no tokenizer in it
    )
    with pytest.raises(peftcore.ConfigError, match="could not load the tokenizer") as info:
        peftcore.get_peft_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)), config)
    assert str(tmp_path) in str(info.value) and info.value.__cause__ is not None


def test_a_hub_name_offline_fails_with_transformers_error_wrapped() -> None:
    code = (
        "import peftcore, transformers\n"
        "config = peftcore.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init='TEXT',\n"
        "    prompt_tuning_init_text='hello', tokenizer_name_or_path='peftcore-tests/no-such-tokenizer')\n"
        "model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=40, hidden_size=16,\n"
        "    intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))\n"
        "try:\n"
        "    peftcore.get_peft_model(model, config)\n"
        "except peftcore.ConfigError as error:\n"
        "    print(type(error.__cause__).__name__, '|', error)\n"
    )
    env = child_env(ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "could not load the tokenizer 'peftcore-tests/no-such-tokenizer'" in result.stdout, result.stdout


# -- HF PEFT's prompt-tuning recipe (causal LM, TEXT init), only the import changed ------------
def hf_prompt_tuning_recipe(library: ModuleType, model_name_or_path: str) -> tuple[list[float], list[int], Any]:
    """HF PEFT's "prompt tuning for causal language modeling" recipe, on local files; ``library``
    is what the script imported as ``peft``."""
    PromptTuningConfig, PromptTuningInit = library.PromptTuningConfig, library.PromptTuningInit  # noqa: N806
    TaskType, get_peft_model = library.TaskType, library.get_peft_model  # noqa: N806
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    peft_config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.TEXT,
        num_virtual_tokens=8,
        prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=model_name_or_path,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    max_length, batch_size, lr, num_epochs = 16, 4, 3e-2, 2

    def preprocess(examples: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        rows = {"input_ids": [], "attention_mask": [], "labels": []}
        for text, label in examples:
            prompt = tokenizer(f"tweet text : {text} label : ", add_special_tokens=False)["input_ids"]
            target = tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.pad_token_id]
            ids = prompt + target
            pad = max_length - len(ids)
            rows["input_ids"].append([tokenizer.pad_token_id] * pad + ids)
            rows["attention_mask"].append([0] * pad + [1] * len(ids))
            rows["labels"].append([-100] * (pad + len(prompt)) + target)
        return {key: torch.tensor(value) for key, value in rows.items()}

    batches = [preprocess(TWEETS[i : i + batch_size]) for i in range(0, len(TWEETS), batch_size)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path)
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer, num_warmup_steps=0, num_training_steps=len(batches) * num_epochs
    )
    losses = []
    for _ in range(num_epochs):
        model.train()
        for batch in batches:
            outputs = model(**batch)
            loss = outputs.loss
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    model.eval()
    inputs = tokenizer(["tweet text : my order never arrived label : "], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        outputs = model.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4, eos_token_id=3,
        )
    return losses, outputs[0].tolist(), model


def test_hf_prompt_tuning_recipe_runs_with_only_the_import_changed(model_dir: str, capsys: pytest.CaptureFixture) -> None:
    hf_losses, hf_generated, _ = hf_prompt_tuning_recipe(peft, model_dir)
    hf_printed = capsys.readouterr().out
    our_losses, our_generated, ours = hf_prompt_tuning_recipe(peftcore, model_dir)
    assert capsys.readouterr().out == hf_printed  # print_trainable_parameters says the same
    assert_close_to_scale(our_losses, hf_losses)
    assert our_losses[-1] < our_losses[0]
    # the first generated token is the trained models' shared prediction; after it HF's cached
    # generate drifts from greedy decoding (a known HF PEFT difference), so ours is checked
    # against greedy decoding by full forward passes
    prompt_length = len(our_generated) - 4
    assert our_generated[: prompt_length + 1] == hf_generated[: prompt_length + 1]
    ids = torch.tensor([our_generated[:prompt_length]])
    with torch.no_grad():
        for _ in range(4):
            next_id = ours(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert ids[0].tolist() == our_generated


def test_text_init_is_saved_as_hf_saves_it(model_dir: str, tmp_path: Path) -> None:
    import json

    for library in (peftcore, peft):
        config = library.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT,
            tokenizer_name_or_path=model_dir,
        )
        library.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(
            str(tmp_path / library.__name__)
        )
    ours, theirs = (json.loads((tmp_path / name / "adapter_config.json").read_text()) for name in ("peftcore", "peft"))
    fields = ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs")
    assert [ours[f] for f in fields] == [theirs[f] for f in fields] == ["TEXT", INIT_TEXT, model_dir, None]
    # each library loads it with the saved prompt (peftcore also to go on training it)
    hf_loaded = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(model_dir), str(tmp_path / "peftcore")
    )
    ours_loaded = peftcore.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(model_dir), str(tmp_path / "peftcore"), is_trainable=True
    )
    torch.testing.assert_close(prompt_table(ours_loaded), prompt_table(hf_loaded), rtol=0, atol=0)
