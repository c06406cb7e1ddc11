"""Saving a PiSSA/OLoRA adapter as a plain LoRA (HF PEFT's ``path_initial_model_for_weight_conversion``).

PiSSA and OLoRA move part of the base weight into the adapter at init: ``W = W_res +
s * B0 @ A0``. After training, ``W_res + s * B @ A = W + s * (B @ A - B0 @ A0)``, and that
change is a LoRA of twice the rank on the *original* weight: ``A' = [A; A0]`` and
``B' = [B, -B0]``, with ``lora_alpha`` doubled too so the scaling stays ``s`` (times
``sqrt(2)`` under rsLoRA, whose scaling is ``alpha / sqrt(r)``). The initial adapter's
tensors are read from the directory it was saved to before training; the result is
saved with ``init_lora_weights=True``, so it loads on the original base model, in
peftcore or HF PEFT, with no change to the base weight.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional

import numpy as np

from peftcore.errors import AdapterError
from peftcore.graph import ModelGraph
from peftcore.io import match_tensors, read_adapter
from peftcore.methods.lora import AddLora, LoraConfig
from peftcore.plan import RewritePlan

__all__ = ["convert_to_plain_lora"]


def convert_to_plain_lora(
    graph: Optional[ModelGraph],
    adapter_name: str,
    config: Any,
    plan: RewritePlan,
    tensors: Mapping[str, np.ndarray],
    initial_dir: str | os.PathLike[str],
) -> tuple[LoraConfig, RewritePlan, dict[str, np.ndarray]]:
    """``(config, plan, tensors)`` of the plain LoRA equal to the trained adapter
    ``tensors`` (of ``config`` and ``plan``) less the initial adapter saved in ``initial_dir``."""
    if not isinstance(config, LoraConfig):
        raise AdapterError(
            f"path_initial_model_for_weight_conversion converts LoRA adapters; {adapter_name!r} is a {type(config).__name__}"
        )
    if config.use_dora:
        raise AdapterError(
            "path_initial_model_for_weight_conversion converts plain LoRA adapters; a DoRA adapter's magnitude "
            "is of the PiSSA/OLoRA residual base weight, so it has no plain-LoRA form for the original base"
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise AdapterError(
            "path_initial_model_for_weight_conversion does not support rank_pattern or alpha_pattern together "
            "with use_rslora=True (as in HF PEFT)"
        )
    if graph is None:
        raise AdapterError("path_initial_model_for_weight_conversion needs the model's layer graph to plan the converted adapter")
    initial = read_adapter(os.fspath(initial_dir))
    if not isinstance(initial.config, LoraConfig):
        raise AdapterError(f"{os.fspath(initial_dir)!r} holds no LoRA adapter to convert against")
    initial_tensors = match_tensors(plan, initial.tensors, os.fspath(initial_dir))
    factor = math.sqrt(2.0) if config.use_rslora else 2.0
    converted_config = config.replace(
        init_lora_weights=True,
        r=config.r * 2,
        lora_alpha=config.lora_alpha * factor,
        rank_pattern={key: 2 * value for key, value in config.rank_pattern.items()},
        alpha_pattern={key: 2 * value for key, value in config.alpha_pattern.items()},
    )
    converted_plan = converted_config.plan(graph, adapter_name)
    out = dict(tensors)
    for op in plan.ops:
        if not isinstance(op, AddLora):
            continue
        a_key, b_key = f"{op.path}.lora_A", f"{op.path}.lora_B"
        out[a_key] = np.concatenate([tensors[a_key], initial_tensors[a_key].astype(tensors[a_key].dtype)], axis=0)
        out[b_key] = np.concatenate([tensors[b_key], -initial_tensors[b_key].astype(tensors[b_key].dtype)], axis=1)
    return converted_config, converted_plan, out
