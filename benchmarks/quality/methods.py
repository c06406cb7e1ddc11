"""The methods compared, each as a peftcore config factory with its learning-rate grid.

Every peftcore config uses ``task_type="SEQ_CLS"``, so the new three-class head of
``AutoModelForSequenceClassification`` is trained in full by every method (as it is, of
course, by full fine-tuning). Sizes follow the papers' usual small settings:

- ``lora``: rank 8, alpha 16 on every ``query`` and ``value`` projection;
- ``bitfit``: every bias of the encoder;
- ``prompt_tuning`` / ``residual_prompt_tuning``: ``prompt_length`` virtual tokens (20 by
  default) initialised from sampled vocabulary rows; the residual one trains them through
  a shared bottleneck MLP (64 units, ReLU, layer norm on its output, as in Razdaibiedina et
  al.'s ``P + LN(W_up relu(W_down P))``) with a skip connection, baked into a plain prompt
  before evaluation;
- ``xprompt``: a trained prompt-tuning prompt, pruned (half of the tokens, a quarter of the
  survivors' pieces, by loss sensitivity), rewound and retrained (see ``train.py``);
- ``unipelt``: UniPELT ``"APL"``: gated LoRA (rank 8), prefix (10 vectors) and bottleneck
  adapter (48 units) in every block; its single parts are compared with ``lora``,
  ``prefix_tuning`` and ``adapter`` (UniPELT with only its gated adapter, ``variant="A"``);
- ``prefix_tuning``: 10 key/value vectors per layer, trained directly;
- ``p_tuning``: 20 virtual tokens from HF's MLP prompt encoder (128 hidden units).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

DEFAULT_PROMPT_LENGTH = 20


@dataclass(frozen=True)
class MethodSpec:
    """One method: how to build its config and which learning rates to try.

    ``make_config(prompt_length)`` returns a peftcore config, or ``None`` for full
    fine-tuning. ``quick_lr`` is the single learning rate of ``--quick`` mode.
    ``after_wrap(peft_model)``, if set, changes the new adapter before training (ablations)."""

    name: str
    label: str
    make_config: Callable[[int], Optional[Any]]
    lr_grid: tuple[float, ...]
    quick_lr: float
    two_phase: bool = False  # XPrompt: train, prune, retrain
    uses_prompt_length: bool = False
    notes: str = field(default="", compare=False)
    after_wrap: Optional[Callable[[Any], None]] = field(default=None, compare=False)


def _full(prompt_length: int) -> None:
    return None


def _lora(prompt_length: int) -> Any:
    import peftcore

    return peftcore.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")


def _bitfit(prompt_length: int) -> Any:
    import peftcore

    return peftcore.BitFitConfig(task_type="SEQ_CLS")


def _prompt(prompt_length: int) -> Any:
    import peftcore

    return peftcore.PromptTuningConfig(num_virtual_tokens=prompt_length, prompt_tuning_init="SAMPLE_VOCAB",
                                       task_type="SEQ_CLS")


def _residual_prompt(prompt_length: int) -> Any:
    import peftcore

    # the paper's reparameterisation, P + LN(up(relu(down(P)))), layer norm included;
    # peftcore starts the layer norm's scale at 0, so the first prompt is the sampled one
    return peftcore.ResidualPromptTuningConfig(num_virtual_tokens=prompt_length, prompt_tuning_init="SAMPLE_VOCAB",
                                               bottleneck_size=64, layer_norm=True, task_type="SEQ_CLS")


def _unipelt(prompt_length: int) -> Any:
    import peftcore

    return peftcore.UniPELTConfig(variant="APL", r=8, num_virtual_tokens=10, bottleneck_size=48, task_type="SEQ_CLS")


def _adapter(prompt_length: int) -> Any:
    import peftcore

    return peftcore.UniPELTConfig(variant="A", bottleneck_size=48, task_type="SEQ_CLS")


def _prefix(prompt_length: int) -> Any:
    import peftcore

    return peftcore.PrefixTuningConfig(num_virtual_tokens=10, task_type="SEQ_CLS")


def _p_tuning(prompt_length: int) -> Any:
    import peftcore

    return peftcore.PromptEncoderConfig(num_virtual_tokens=prompt_length, encoder_hidden_size=128,
                                        encoder_reparameterization_type="MLP", task_type="SEQ_CLS")


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("full", "full fine-tuning", _full, (3e-5, 1e-4), 1e-4),
        MethodSpec("lora", "LoRA", _lora, (5e-4, 2e-3), 2e-3),
        MethodSpec("bitfit", "BitFit", _bitfit, (1e-3, 5e-3), 5e-3),
        MethodSpec("prompt_tuning", "prompt tuning", _prompt, (3e-3, 3e-2), 3e-2, uses_prompt_length=True),
        MethodSpec("residual_prompt_tuning", "residual prompt tuning", _residual_prompt, (3e-3, 3e-2), 3e-2,
                   uses_prompt_length=True),
        MethodSpec("xprompt", "XPrompt (pruned + retrained)", _prompt, (3e-3, 3e-2), 3e-2, two_phase=True,
                   uses_prompt_length=True),
        MethodSpec("unipelt", "UniPELT (APL)", _unipelt, (5e-4, 2e-3), 2e-3),
        MethodSpec("adapter", "gated adapter (UniPELT A)", _adapter, (5e-4, 2e-3), 2e-3),
        MethodSpec("prefix_tuning", "prefix tuning", _prefix, (3e-3, 3e-2), 3e-2),
        MethodSpec("p_tuning", "P-tuning", _p_tuning, (1e-3, 1e-2), 1e-2, uses_prompt_length=True),
    )
}

def _unipelt_lora_only(prompt_length: int) -> Any:
    import peftcore

    return peftcore.UniPELTConfig(variant="L", r=8, task_type="SEQ_CLS")


def _lora_alpha_4(prompt_length: int) -> Any:
    import peftcore

    return peftcore.LoraConfig(r=8, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS")


def _layer_norm_scale_one(peft_model: Any) -> None:
    """Start the residual MLP's layer norm at scale 1, as a standard LayerNorm (and the
    paper's code) does; peftcore starts it at 0 so the first prompt is the initial one."""
    import numpy as np

    tensors = {key: np.asarray(value) for key, value in peft_model.export_adapter("default").items()}
    for key in tensors:
        if key.endswith("residual_norm_weight"):
            tensors[key] = np.ones_like(tensors[key])
    peft_model.import_adapter("default", tensors)


#: Follow-up methods for ``ablate.py``: each tests an explanation of a claim that does not
#: hold here; they are never part of the main table.
ABLATIONS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("unipelt_lora_only", "UniPELT's gated LoRA alone (variant L)", _unipelt_lora_only, (2e-3,), 2e-3),
        MethodSpec("lora_alpha_4", "LoRA with alpha 4 (scaling 0.5)", _lora_alpha_4, (2e-3,), 2e-3),
        MethodSpec("residual_ln_scale_one", "residual prompt tuning, layer norm starting at scale 1",
                   _residual_prompt, (3e-2,), 3e-2, uses_prompt_length=True, after_wrap=_layer_norm_scale_one),
    )
}

#: XPrompt's pruning: share of tokens, share of the survivors' pieces, pieces per token.
XPROMPT_TOKEN_RATIO = 0.5
XPROMPT_PIECE_RATIO = 0.25
XPROMPT_PIECES = 4
XPROMPT_SCORING_BATCHES = 4


def method_spec(name: str) -> MethodSpec:
    """The spec of method ``name`` (a clear error for an unknown one)."""
    found = METHODS.get(name) or ABLATIONS.get(name)
    if found is None:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)} or the ablations {sorted(ABLATIONS)}")
    return found
