"""``transformers.Trainer`` with default ``TrainingArguments`` on peftcore models.

Checkpoints and ``save_model()`` must hold adapter files only, load in peftcore and in
HF PEFT with the trained outputs, and ``resume_from_checkpoint`` must restore the
optimizer state. No user code beyond ``get_peft_model`` is needed (see README.md).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest
import torch

from peftcore import LoraConfig, PeftModel, get_peft_model
from peftcore.testing.numerics import assert_close_to_scale
from tests.integration import tiny

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class Rows(torch.utils.data.Dataset):
    """A map-style dataset of dicts with a column the model does not take (``text``),
    which ``remove_unused_columns`` must drop."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


def lm_rows(n: int = 16, length: int = 8) -> Rows:
    ids = tiny.random_ids(n, length, seed=3)
    return Rows([{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row, "text": "x"} for row in ids])


def cls_rows(n: int = 16, length: int = 8) -> Rows:
    ids = tiny.random_ids(n, length, seed=4)
    return Rows([
        {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": int(row[0]) % 3, "text": "x"}
        for row in ids
    ])


CASES: dict[str, tuple[Callable[[], Any], Callable[[], LoraConfig], Callable[[], Rows]]] = {
    "gpt2_lm": (
        tiny.gpt2_lm,
        lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        lm_rows,
    ),
    "llama_lm": (
        tiny.llama_lm,
        lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        lm_rows,
    ),
    "bert_cls": (
        tiny.bert_cls,
        lambda: LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]),
        cls_rows,
    ),
}


def make_args(out: str, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = dict(
        output_dir=out, per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-2, save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, seed=0,
    )
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


def probe(model: Any) -> torch.Tensor:
    ids = tiny.random_ids(2, 8, seed=9)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainer_trains_saves_adapters_and_loads_in_both_libraries(case: str, tmp_path: Any) -> None:
    build, make_config, rows = CASES[case]
    model = get_peft_model(build(), make_config())
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    trainer = transformers.Trainer(model=model, args=make_args(str(tmp_path / "run")), train_dataset=rows())
    trainer.train()
    after = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no LoRA weight"
    trained = probe(model)

    out = str(tmp_path / "final")
    trainer.save_model(out)
    for folder in (out, str(tmp_path / "run" / "checkpoint-4")):
        names = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names, names
        assert not names & {"model.safetensors", "pytorch_model.bin"}, names

    loaded = PeftModel.from_pretrained(build(), out)
    assert_close_to_scale(probe(loaded), trained)
    hf_loaded = peft.PeftModel.from_pretrained(build(), out)
    assert_close_to_scale(probe(hf_loaded), trained)


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_from_checkpoint_restores_adapter_and_optimizer(case: str, tmp_path: Any) -> None:
    build, make_config, rows = CASES[case]
    run = str(tmp_path / "run")
    full = get_peft_model(build(), make_config())
    transformers.Trainer(model=full, args=make_args(run, num_train_epochs=2), train_dataset=rows()).train()
    assert os.path.isfile(os.path.join(run, "checkpoint-4", "optimizer.pt"))

    base = build()
    torch.manual_seed(123)  # other LoRA start weights: the checkpoint's must win
    resumed = get_peft_model(base, make_config())
    trainer = transformers.Trainer(
        model=resumed, args=make_args(str(tmp_path / "resumed"), num_train_epochs=2), train_dataset=rows()
    )
    checkpoint = os.path.join(run, "checkpoint-4")
    trainer.train(resume_from_checkpoint=checkpoint)
    assert trainer.state.global_step == 8
    expected = torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=True)
    assert expected["state"], "the checkpoint holds Adam's moments"
    # the optimizer continued from the checkpoint's moments: the runs end at the same weights
    for key, value in full.state_dict().items():
        if "lora_" in key:
            assert_close_to_scale(resumed.state_dict()[key], value)


def test_readme_trainer_example(tmp_path: Any) -> None:
    """The README's Trainer example, as written there (with the tiny model and data)."""
    from transformers import Trainer, TrainingArguments

    from peftcore import TaskType

    model = get_peft_model(tiny.gpt2_lm(), LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), num_train_epochs=1, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=lm_rows())
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny.gpt2_lm(), str(tmp_path / "adapter"))
    torch.testing.assert_close(probe(reloaded), probe(model))


@pytest.mark.parametrize("case", ["llama_lm", "bert_cls"])
def test_evaluate_and_load_best_model_at_end(case: str, tmp_path: Any) -> None:
    """Trainer finds the labels through the wrapped model (eval loss), and reloads the
    best checkpoint's adapter into the live model at the end."""
    build, make_config, rows = CASES[case]
    model = get_peft_model(build(), make_config())
    args = make_args(
        str(tmp_path / "run"), eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
        metric_for_best_model="loss", num_train_epochs=2,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows(), eval_dataset=rows(8))
    assert trainer.label_names == ["labels"]
    trainer.train()
    assert "eval_loss" in trainer.evaluate()
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.isfile(os.path.join(best, "adapter_model.safetensors"))
    from_best = PeftModel.from_pretrained(build(), best)
    assert_close_to_scale(probe(model), probe(from_best))
