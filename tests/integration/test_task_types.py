"""HF PEFT's task types on tiny models: each saves the heads HF saves and handles its inputs
as HF does (labels, token type ids, start/end positions), checked against the real HF PEFT."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import peftcore  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from tests.integration.tiny import VOCAB, llama_lm, random_ids, seeded, t5_lm  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
N = 3


def _bert(head, num_labels=3):
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=num_labels, type_vocab_size=2,
    )
    return lambda: seeded(lambda: head(config))


def _inputs(task):
    ids = random_ids(2, 6)
    inputs = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 6, [1, 1, 1, 1, 1, 0]])}
    if task in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"):
        # (HF PEFT 0.21's question-answering model never passes token_type_ids on, a bug
        # peftcore does not copy: the comparison uses all-zero ones, which mean the same)
        types = [0, 0, 0, 0, 0, 0] if task == "QUESTION_ANS" else [0, 0, 0, 1, 1, 1]
        inputs["token_type_ids"] = torch.tensor([types] * 2)
    if task == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = random_ids(2, 4, seed=4)
    labels = {
        "SEQ_CLS": {"labels": torch.tensor([0, 2])},
        "TOKEN_CLS": {"labels": torch.tensor([[0, 1, 2, 1, 0, 2], [2, 2, 1, 0, 1, -100]])},
        "QUESTION_ANS": {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 4])},
        "CAUSAL_LM": {"labels": ids},
        "SEQ_2_SEQ_LM": {"labels": random_ids(2, 4, seed=3)},
        "FEATURE_EXTRACTION": {},
    }[task]
    return inputs, labels


CASES = {
    "SEQ_CLS": (_bert(transformers.BertForSequenceClassification), ("classifier",)),
    "TOKEN_CLS": (_bert(transformers.BertForTokenClassification), ("classifier",)),
    "QUESTION_ANS": (_bert(transformers.BertForQuestionAnswering, num_labels=2), ("qa_outputs",)),
    "FEATURE_EXTRACTION": (_bert(transformers.BertModel), ()),
    "CAUSAL_LM": (llama_lm, ()),
    "SEQ_2_SEQ_LM": (t5_lm, ()),
}


def _outputs(model, inputs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(**inputs)
    if hasattr(out, "start_logits"):
        return torch.stack([out.start_logits, out.end_logits])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _randomise(model):
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("method", ["prompt", "lora"])
@pytest.mark.parametrize("task", sorted(CASES))
def test_task_type_trains_saves_its_heads_and_loads_in_hf_peft(task, method, tmp_path):
    build, heads = CASES[task]
    if method == "prompt":
        config = peftcore.PromptTuningConfig(num_virtual_tokens=N, task_type=task)
    else:
        targets = ["q", "v"] if task == "SEQ_2_SEQ_LM" else ["q_proj", "v_proj"] if task == "CAUSAL_LM" else ["query", "value"]
        config = peftcore.LoraConfig(r=4, target_modules=targets, task_type=task)
    model = peftcore.get_peft_model(build(), config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    for head in heads:
        assert any(f".{head}." in n for n in trainable), (head, trainable)
    inputs, labels = _inputs(task)
    if labels:  # the task's own inputs train it
        model.train()
        loss = model(**inputs, **labels).loss
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        model.eval()
    _randomise(model)
    expected = _outputs(model, inputs)
    model.save_pretrained(str(tmp_path))
    from safetensors.numpy import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    head_prefix = "base_model." if method == "prompt" else "base_model.model."
    for head in heads:
        assert f"{head_prefix}{head}.weight" in keys and f"{head_prefix}{head}.bias" in keys, sorted(keys)
    hf_model = peft.PeftModel.from_pretrained(build(), str(tmp_path))
    assert_close_to_scale(_outputs(hf_model, inputs), expected)
    if labels and not (method == "prompt" and task == "TOKEN_CLS"):  # HF cannot align token labels with a prompt
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert_close_to_scale(model(**inputs, **labels).loss, hf_model(**inputs, **labels).loss)
