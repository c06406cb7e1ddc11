"""Cached decoding of prompt-family adapters equals uncached decoding, whatever the cache is called.

transformers 5.x passes the key/value cache to ``forward`` as ``cache=`` and still accepts
the older ``past_key_values=`` (deprecated); 4.x knows only ``past_key_values``. The
prompt input hook must recognise a decoding step under either name, or it prepends the
virtual tokens again at every step.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import peftcore  # noqa: E402
from peftcore import (  # noqa: E402
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    ResidualPromptTuningConfig,
    UniPELTConfig,
)
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402
from peftcore_torch.prompt_inputs import CACHE_NAMES, find_cache  # noqa: E402
from tests.integration.tiny import gpt2_lm, llama_lm, random_ids  # noqa: E402

N = 4
STEPS = 5

CONFIGS: dict[str, Callable[[], Any]] = {
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB"),
    "residual": lambda: ResidualPromptTuningConfig(num_virtual_tokens=N, bottleneck_size=16),
    "unipelt": lambda: UniPELTConfig(r=4, num_virtual_tokens=3, bottleneck_size=8),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=N),
    "prefix-projection": lambda: PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=16),
    "p-tuning-mlp": lambda: PromptEncoderConfig(num_virtual_tokens=N, encoder_hidden_size=16),
    "p-tuning-lstm": lambda: PromptEncoderConfig(num_virtual_tokens=N, encoder_reparameterization_type="LSTM", encoder_hidden_size=16),
}
MODELS = {"llama": llama_lm, "gpt2": gpt2_lm}


def adapted(model_name: str, method: str) -> Any:
    model = peftcore.get_peft_model(MODELS[model_name](), CONFIGS[method]())
    with torch.no_grad():  # move every adapter off its identity init so a wrong step shows
        generator = torch.Generator().manual_seed(7)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def batch(left_pad: bool) -> tuple[Any, Any]:
    ids = random_ids(2, 5)
    mask = torch.ones_like(ids)
    if left_pad:
        ids[1, :2] = 0
        mask[1, :2] = 0
    return ids, mask


def uncached_greedy(model: Any, ids: Any, mask: Any) -> Any:
    seq, seq_mask = ids, mask
    for _ in range(STEPS):
        positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=seq, attention_mask=seq_mask, position_ids=positions, use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], dim=1)
    return seq


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("left_pad", [False, True], ids=["full", "left-padded"])
def test_generate_matches_uncached_greedy_decoding(method: str, model_name: str, left_pad: bool) -> None:
    model = adapted(model_name, method)
    ids, mask = batch(left_pad)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
        expected = uncached_greedy(model, ids, mask)
    assert torch.equal(generated, expected)


def cache_names_this_model_accepts(model: Any) -> list[str]:
    """``cache`` where the installed transformers has it; ``past_key_values`` always works."""
    parameters = inspect.signature(model.forward).parameters
    return [name for name in CACHE_NAMES if name in parameters] + (
        ["past_key_values"] if "past_key_values" not in parameters else []
    )


@pytest.mark.parametrize("model_name", list(MODELS))
def test_a_cache_passed_by_hand_under_either_name_is_recognised(model_name: str) -> None:
    model = adapted(model_name, "prompt")
    ids, mask = batch(left_pad=True)
    with torch.no_grad():
        full_positions = (mask.cumsum(-1) - 1).clamp(min=0)
        for name in cache_names_this_model_accepts(model):
            first = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=full_positions[:, :-1],
                          use_cache=True)
            cache = find_cache(first)
            assert cache is not None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers 5 warns that past_key_values is deprecated
                step = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=full_positions[:, -1:],
                             use_cache=True, **{name: cache})
            whole = model(input_ids=ids, attention_mask=mask, position_ids=full_positions, use_cache=False)
            assert_close_to_scale(step.logits[:, -1], whole.logits[:, -1], err_msg=name)


def test_find_cache_reads_either_name_from_outputs_and_arguments() -> None:
    marker = object()
    for name in CACHE_NAMES:
        assert find_cache({name: marker}) is marker
        assert find_cache(transformers.modeling_outputs.CausalLMOutputWithPast(**{name: marker})
                          if name in inspect.signature(transformers.modeling_outputs.CausalLMOutputWithPast).parameters
                          else {name: marker}) is marker
    assert find_cache({"logits": 1}) is None
