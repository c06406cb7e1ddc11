"""Swap a loaded LoRA adapter's weights for another adapter's, in place: Hugging Face PEFT's
``hotswap_adapter`` and ``prepare_model_for_compiled_hotswap``, for every backend.

A compiled model (``torch.compile``) has its adapters' tensor shapes and its Python numbers
(the LoRA scaling) baked into its graphs and guards; new *values* in the same tensors need no
new graph. So:

* :func:`hotswap_adapter` writes the new adapter's factors into the existing tensors. A lower
  rank fills the first rows of A and columns of B and zeroes the rest; a different scaling is
  folded into B (``B * new_scaling / scaling``), so the layer's scaling, a constant of the
  graph, stays. The adapter then computes exactly the new adapter's function (to rounding),
  and a later ``save_pretrained`` writes an equivalent adapter with the folded B.
* :func:`prepare_model_for_compiled_hotswap` (before compiling) pads every loaded adapter to
  ``target_rank`` with zeros, so adapters of any rank up to it can be swapped in later. The
  padded adapter's outputs are unchanged.

Everything is checked before anything is written, and a failing write puts back what it
wrote (:func:`peftcore.all_or_nothing.restoring_tensors`).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Optional, Union

import numpy as np

from peftcore.adapter_files import adapter_dir, plan_of_files, to_device
from peftcore.all_or_nothing import restoring_tensors
from peftcore.errors import AdapterError, ConfigError
from peftcore.io import read_adapter
from peftcore.methods.lora import AddLora, LoraConfig
from peftcore.plan import FreezeBase, RewritePlan

CHECK_COMPILED = ("error", "warn", "ignore")


def _peft_model(model: Any, check_compiled: str = "ignore") -> Any:
    """The PeftModel itself, also from inside a ``torch.compile`` wrapper (``_orig_mod``)."""
    from peftcore.peft_model import PeftModel

    inner = getattr(model, "_orig_mod", None)
    if inner is not None:
        if check_compiled == "error":
            raise AdapterError(
                "prepare_model_for_compiled_hotswap must run before the model is compiled: call it on the "
                "uncompiled model, then torch.compile it (or pass check_compiled='warn' / 'ignore')"
            )
        if check_compiled == "warn":
            warnings.warn("preparing an already compiled model for hotswapping: it may recompile", stacklevel=3)
        model = inner
    if not isinstance(model, PeftModel):
        raise AdapterError(f"expected a peftcore PeftModel (or a compiled one), got {type(model).__name__}")
    return model


def _lora_ops(plan: RewritePlan, where: str) -> dict[str, AddLora]:
    others = [op for op in plan.ops if not isinstance(op, (AddLora, FreezeBase))]
    if others:
        raise AdapterError(f"{where}: hotswapping covers LoRA adapters only; the plan also has {others[0].op!r} ops")
    grouped = [op.path for op in plan.ops if isinstance(op, AddLora) and getattr(op, "groups", 1) > 1]
    if grouped:
        raise AdapterError(
            f"{where}: hotswapping covers LoRA on ungrouped layers; {grouped[0]!r} is a convolution with groups > 1, "
            "whose B factor is split by group"
        )
    dora = [op.path for op in plan.ops if isinstance(op, AddLora) and op.use_dora]
    if dora:
        raise AdapterError(f"{where}: hotswapping covers plain LoRA adapters only; it uses DoRA (on {dora[0]!r})")
    return {op.path: op for op in plan.ops if isinstance(op, AddLora)}


def _padded(a: np.ndarray, b: np.ndarray, rank: int, b_factor: float) -> tuple[np.ndarray, np.ndarray]:
    """A ``(r, in, ...)`` and B ``(out, r, ...)`` (a convolution's factors have kernel axes) as
    rank ``rank`` factors with zeros beyond r, B times ``b_factor``."""
    r = a.shape[0]
    padded_a = np.zeros((rank, *a.shape[1:]), dtype=a.dtype)
    padded_b = np.zeros((b.shape[0], rank, *b.shape[2:]), dtype=b.dtype)
    padded_a[:r] = a
    padded_b[:, :r] = b * b_factor if b_factor != 1.0 else b
    return padded_a, padded_b


def prepare_model_for_compiled_hotswap(
    model: Any, *, target_rank: Optional[int] = None, config: Any = None, check_compiled: str = "error"
) -> None:
    """Before compiling: pad every loaded LoRA adapter to ``target_rank`` (zeros, outputs
    unchanged), so :func:`hotswap_adapter` can later swap in adapters of any rank up to it
    without recompiling. ``config`` (HF PEFT's argument, a config or a dict of them) is
    accepted for compatibility; scalings need no preparation here (see the module docstring)."""
    if check_compiled not in CHECK_COMPILED:
        raise ConfigError(f"check_compiled must be one of {CHECK_COMPILED}, got {check_compiled!r}")
    peft_model = _peft_model(model, check_compiled)
    if target_rank is None:
        return
    if not isinstance(target_rank, int) or isinstance(target_rank, bool) or target_rank <= 0:
        raise ConfigError(f"target_rank must be a positive integer, got {target_rank!r}")
    for name in list(peft_model.plans):
        ops = _lora_ops(peft_model.plans[name], f"adapter {name!r}")
        ranks = {op.r for op in ops.values()}
        if not ops or ranks == {target_rank}:
            continue
        if max(ranks) > target_rank:
            raise ConfigError(f"adapter {name!r} has rank {max(ranks)}, above target_rank={target_rank}")
        _pad_adapter(peft_model, name, ops, target_rank)


def _pad_adapter(peft_model: Any, name: str, ops: dict[str, AddLora], rank: int) -> None:
    config = peft_model.peft_config[name]
    scalings = {op.scaling for op in ops.values()}
    if not isinstance(config, LoraConfig) or config.rank_pattern or config.alpha_pattern or len(scalings) != 1:
        raise AdapterError(
            f"adapter {name!r}: padding to target_rank needs one rank and one scaling for all its layers "
            "(no rank_pattern / alpha_pattern)"
        )
    if name in peft_model.merged_adapters:
        raise AdapterError(f"adapter {name!r} is merged; unmerge it before preparing for hotswapping")
    scaling = scalings.pop()
    tensors = peft_model.export_adapter(name)
    padded = dict(tensors)
    for path in ops:
        padded[f"{path}.lora_A"], padded[f"{path}.lora_B"] = _padded(
            tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"], rank, 1.0
        )
    alpha = scaling * (math.sqrt(rank) if config.use_rslora else rank)
    active = list(peft_model.active_adapters)
    peft_model.delete_adapter(name)
    peft_model.add_adapter(name, config.replace(r=rank, lora_alpha=alpha))
    peft_model.import_adapter(name, padded)
    if name in active:
        peft_model.set_adapter(active)


def hotswap_adapter(
    model: Any, model_name_or_path: Union[str, os.PathLike], adapter_name: str, torch_device: Optional[str] = None,
    **kwargs: Any,
) -> None:
    """Replace the weights of the loaded LoRA adapter ``adapter_name`` by those saved at
    ``model_name_or_path``, in place: same layers, the same or a lower rank (see
    :func:`prepare_model_for_compiled_hotswap` for higher ones). A compiled model keeps its
    graphs. ``torch_device`` and hub arguments are accepted as in ``load_adapter``."""
    peft_model = _peft_model(model)
    if adapter_name not in peft_model.plans:
        raise AdapterError(f"hotswap_adapter: no adapter named {adapter_name!r} is loaded; load_adapter() it first")
    allow_non_finite = bool(kwargs.pop("allow_non_finite", False))
    files = read_adapter(adapter_dir(model_name_or_path, kwargs))
    where = f"hotswap_adapter({files.directory!r})"
    current = _lora_ops(peft_model.plans[adapter_name], f"adapter {adapter_name!r}")
    plan = plan_of_files(files, files.config, peft_model.model_graph, adapter_name)
    incoming = _lora_ops(plan, where)
    if set(incoming) != set(current):
        differing = sorted(set(incoming) ^ set(current))
        raise AdapterError(f"{where}: the adapters adapt different layers (e.g. {differing[0]!r}); hotswap needs the same ones")
    for path, op in incoming.items():
        now = current[path]
        if (op.layer_kind, op.in_features, op.out_features) != (now.layer_kind, now.in_features, now.out_features):
            raise AdapterError(f"{where}: layer {path!r} differs in kind or size from the loaded adapter's")
        if op.r > now.r:
            raise AdapterError(
                f"{where}: layer {path!r} has rank {op.r}, above the loaded rank {now.r}; call "
                f"prepare_model_for_compiled_hotswap(model, target_rank={op.r}) before compiling"
            )
        if now.scaling == 0.0:
            raise AdapterError(f"{where}: the loaded adapter's scaling is 0 on {path!r}; a new scaling cannot be folded in")
    if adapter_name in peft_model.merged_adapters:
        raise AdapterError(f"hotswap_adapter: adapter {adapter_name!r} is merged; unmerge it first")
    tensors, embeddings, _ = peft_model._tensors_of_files(files, plan, True, allow_non_finite)
    if embeddings:
        raise AdapterError(f"{where}: the adapter carries embedding matrices; hotswap swaps LoRA factors only")
    swapped = {}
    for path, op in incoming.items():
        now = current[path]
        swapped[f"{path}.lora_A"], swapped[f"{path}.lora_B"] = _padded(
            np.asarray(tensors[f"{path}.lora_A"]), np.asarray(tensors[f"{path}.lora_B"]), now.r, op.scaling / now.scaling
        )
    if not allow_non_finite and not all(np.isfinite(v).all() for v in swapped.values()):
        raise AdapterError(f"{where}: folding the new scaling into B overflows")
    with restoring_tensors(peft_model, adapter_name):
        peft_model.import_adapter(adapter_name, swapped)
    to_device(peft_model, torch_device)
