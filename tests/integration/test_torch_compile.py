"""``torch.compile(peft_model, fullgraph=True)``: LoRA and prompt tuning trace into one graph
each, with no graph break, for inference, for training and for cached one-token decoding, and
compute what the eager model computes. Dynamo's ``eager`` backend is used: the claim is about
tracing, which is the same whatever compiler then runs the graph.

A mixed-adapter batch is routed per call, outside any graph, so under compile it is refused
plainly; the model lock is not taken inside a compiled graph (docs/reliability.md)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import peftcore  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def gpt2() -> Any:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel(config)


CONFIGS = {
    "lora": lambda: peftcore.LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False),
    "prompt": lambda: peftcore.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
}


def compiled(model: Any) -> Any:
    torch._dynamo.reset()
    return torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break is an error


def trainable_grads(model: Any) -> dict:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_inference_and_training_trace_into_one_graph(method: str) -> None:
    model = peftcore.get_peft_model(gpt2(), CONFIGS[method]())
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    graph_model = compiled(model)
    model.eval()
    with torch.no_grad():
        assert_close_to_scale(graph_model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.train()
    graph_model(input_ids=ids).logits.square().mean().backward()
    traced = trainable_grads(model)
    model(input_ids=ids).logits.square().mean().backward()
    eager = trainable_grads(model)
    assert traced and set(traced) == set(eager)
    for name in eager:
        assert_close_to_scale(traced[name], eager[name], err_msg=name)


def test_cached_decoding_traces_and_matches_eager_decoding() -> None:
    model = peftcore.get_peft_model(gpt2(), CONFIGS["lora"]()).eval()
    graph_model = compiled(model)
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))

    def greedy(call: Any) -> list:
        tokens, ids, cache = [], prompt, None
        with torch.no_grad():
            for _ in range(6):
                out = call(input_ids=ids, past_key_values=cache, use_cache=True)
                cache, ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
                tokens.append(int(ids))
        return tokens

    assert greedy(graph_model) == greedy(model)


def test_a_mixed_batch_under_compile_is_refused_plainly() -> None:
    model = peftcore.get_peft_model(gpt2(), CONFIGS["lora"]()).eval()
    model.add_adapter("other", CONFIGS["lora"]())
    ids = torch.randint(0, 64, (2, 4))
    # dynamo reports the AdapterError raised while tracing inside its own error, message included
    with pytest.raises(Exception, match="AdapterError.*cannot run inside torch.compile"):
        compiled(model)(input_ids=ids, adapter_names=["default", "other"])
    with torch.no_grad():  # the eager model still routes rows
        model(input_ids=ids, adapter_names=["default", "other"])
