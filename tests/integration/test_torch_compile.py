"""``torch.compile(peft_model, fullgraph=True)``: LoRA and prompt tuning trace into one graph
each, with no graph break, for inference, for training and for cached one-token decoding, and
compute what the eager model computes. ``hotswap_adapter`` then swaps another adapter's weights
(same or lower rank, another scaling) into the compiled model without a recompilation. Dynamo's ``eager`` backend is used: the claim is about
tracing, which is the same whatever compiler then runs the graph.

A mixed-adapter batch is routed per call, outside any graph, so under compile it is refused
plainly; the model lock is not taken inside a compiled graph (docs/reliability.md)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import peftcore  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from peftcore_torch.prompt_inputs import CACHE_NAMES  # noqa: E402

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
        tokens, ids, cache_kwargs = [], prompt, {}
        with torch.no_grad():
            for _ in range(6):
                out = call(input_ids=ids, use_cache=True, **cache_kwargs)
                # the cache goes back under the name the output carries (transformers renamed it in 5.x)
                name = next(name for name in CACHE_NAMES if name in out)
                cache_kwargs, ids = {name: out[name]}, out.logits[:, -1:].argmax(-1)
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


def _saved_lora(tmp_path: Any, name: str, r: int, alpha: float, seed: int) -> tuple:
    """A LoRA adapter of rank ``r`` saved to ``tmp_path / name``, and the eager outputs it gives."""
    torch.manual_seed(seed)
    model = peftcore.get_peft_model(gpt2(), peftcore.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False,
    )).eval()
    model.save_pretrained(str(tmp_path / name))
    return str(tmp_path / name), model


def _compilations() -> int:
    """Graphs dynamo has compiled since the counters were cleared."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def test_hotswap_on_a_compiled_model_needs_no_recompilation(tmp_path: Any) -> None:
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    first, _ = _saved_lora(tmp_path, "first", r=4, alpha=8, seed=1)
    lower_rank, lower_model = _saved_lora(tmp_path, "lower_rank", r=2, alpha=16, seed=2)  # other rank and scaling
    same_rank, same_model = _saved_lora(tmp_path, "same_rank", r=8, alpha=8, seed=3)
    model = peftcore.PeftModel.from_pretrained(gpt2(), first).eval()
    peftcore.prepare_model_for_compiled_hotswap(model, target_rank=8)
    torch._dynamo.utils.counters.clear()
    graph_model = compiled(model)
    with torch.no_grad():
        graph_model(input_ids=ids)
        graphs = _compilations()
        assert graphs >= 1
        for path, reference in ((lower_rank, lower_model), (same_rank, same_model)):
            peftcore.hotswap_adapter(graph_model, path, adapter_name="default")
            assert_close_to_scale(graph_model(input_ids=ids).logits, reference(input_ids=ids).logits)
        assert _compilations() == graphs, "hotswapping recompiled the model"


def test_hotswap_refuses_what_it_cannot_swap_and_changes_nothing(tmp_path: Any) -> None:
    first, first_model = _saved_lora(tmp_path, "first", r=2, alpha=4, seed=1)
    higher, _ = _saved_lora(tmp_path, "higher", r=4, alpha=4, seed=2)
    model = peftcore.PeftModel.from_pretrained(gpt2(), first).eval()
    before = {k: v.copy() for k, v in model.export_adapter("default").items()}
    with pytest.raises(peftcore.AdapterError, match="above the loaded rank 2.*target_rank=4"):
        peftcore.hotswap_adapter(model, higher, adapter_name="default")
    with pytest.raises(peftcore.AdapterError, match="no adapter named 'other'"):
        peftcore.hotswap_adapter(model, first, adapter_name="other")
    other_layers = tmp_path / "other_layers"
    peftcore.get_peft_model(gpt2(), peftcore.LoraConfig(r=2, target_modules=["c_fc"])).save_pretrained(str(other_layers))
    with pytest.raises(peftcore.AdapterError, match="adapt different layers"):
        peftcore.hotswap_adapter(model, str(other_layers), adapter_name="default")
    after = model.export_adapter("default")
    assert all(np.array_equal(after[k], before[k]) for k in before)
    with pytest.raises(peftcore.ConfigError, match="above target_rank=1"):
        peftcore.prepare_model_for_compiled_hotswap(model, target_rank=1)
    with pytest.raises(peftcore.AdapterError, match="before the model is compiled"):
        peftcore.prepare_model_for_compiled_hotswap(compiled(model), target_rank=4)
