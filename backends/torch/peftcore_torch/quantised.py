"""bitsandbytes' quantised linear layers and weights, seen by the torch backend.

A ``Linear4bit`` (nf4 or fp4, with or without double quantisation) holds a
``Params4bit``: packed 4-bit codes plus a ``QuantState`` (block scales, code book and,
double-quantised, the scales' own scales). A ``Linear8bitLt`` holds an ``Int8Params``:
int8 codes plus one float scale per output row (``SCB``), which the layer moves into its
``state`` on its first forward. Each stands for a dense ``(out, in)`` weight; here it is
dequantised to float32, and a dense value is quantised back with the weight's own
settings (quant type, block size, double quantisation, storage) and written into the
parameter in place (its codes and quant state replaced), so it keeps its identity.

bitsandbytes is never imported here: a quantised weight can only exist once it has been
imported, so the types are looked up in ``sys.modules``, and ``import peftcore_torch``
leaves bitsandbytes unloaded.

On an x86 CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight in place for
its CPU kernel the first time the layer runs in eval mode without gradients (codes
reordered, block scales rounded to bfloat16, ``quant_state.packing_format_for_cpu``).
That is bitsandbytes' own doing, not an edit, so a fingerprint here ignores the layout:
it is of the parameter's and its quant state's identities while the weight is repacked.
Dequantising a repacked weight first undoes the packing on a copy.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Hashable, Optional

import numpy as np
import torch
from torch import nn

from peftcore.errors import AdapterError


def _bnb() -> Any:
    return sys.modules.get("bitsandbytes")


def quantised_kind(tensor: Any) -> Optional[str]:
    """``"4bit"`` for a ``Params4bit`` holding quantised codes, ``"8bit"`` for an
    ``Int8Params`` holding int8 codes, None for anything else (bitsandbytes not loaded)."""
    bnb = _bnb()
    if bnb is None or not isinstance(tensor, torch.Tensor):
        return None
    nn_module = getattr(bnb, "nn", None)
    if nn_module is None:  # bitsandbytes is being imported
        return None
    if isinstance(tensor, nn_module.Params4bit) and getattr(tensor, "quant_state", None) is not None:
        return "4bit"
    if isinstance(tensor, nn_module.Int8Params) and tensor.dtype == torch.int8:
        return "8bit"
    return None


def is_quantised_linear(module: Any) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``."""
    bnb = _bnb()
    nn_module = getattr(bnb, "nn", None) if bnb is not None else None
    if nn_module is None:
        return False
    return isinstance(module, (nn_module.Linear4bit, nn_module.Linear8bitLt))


def attach_row_scales(layer: nn.Module) -> None:
    """Give a ``Linear8bitLt``'s weight its row scales (``SCB``) back where the layer's
    first forward moved them into ``layer.state``, so the weight alone can be dequantised."""
    weight: Any = getattr(layer, "weight", None)
    scales = getattr(getattr(layer, "state", None), "SCB", None)
    if quantised_kind(weight) == "8bit" and getattr(weight, "SCB", None) is None and scales is not None:
        weight.SCB = scales


def dense_dtype(tensor: Any) -> torch.dtype:
    """The dtype of the dense weight a quantised one stands for: the dtype it was
    quantised from (4-bit), float16 (8-bit: bitsandbytes quantises from float16)."""
    if quantised_kind(tensor) == "4bit":
        state = tensor.quant_state
        return getattr(state, "original_dtype", state.dtype) if _repacked(state) else state.dtype
    return torch.float16


def dense_shape(tensor: Any) -> tuple[int, ...]:
    """The ``(out, in)`` shape of the dense weight a quantised one stands for."""
    if quantised_kind(tensor) == "4bit":
        return tuple(int(d) for d in tensor.quant_state.shape)
    return tuple(int(d) for d in tensor.shape)


def dense_numel(tensor: Any) -> int:
    """How many weights a quantised tensor stands for (HF PEFT counts them so)."""
    return int(np.prod(dense_shape(tensor)))


def _repacked(state: Any) -> bool:
    return bool(getattr(state, "packing_format_for_cpu", False))


def _row_scales(tensor: Any) -> torch.Tensor:
    scales = getattr(tensor, "SCB", None)
    if scales is None:
        raise AdapterError(
            "an Int8Params weight has no row scales (SCB) of its own; read it through its Linear8bitLt layer"
        )
    return scales


def dequantise(tensor: Any) -> torch.Tensor:
    """The dense float32 ``(out, in)`` weight a quantised tensor stands for."""
    bnb = _bnb()
    if quantised_kind(tensor) == "4bit":
        data, state = tensor.data, tensor.quant_state
        if _repacked(state):  # undone on a copy: the inverse rewrites the state it is given
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return bnb.functional.dequantize_4bit(data, state).to(torch.float32)
    return bnb.functional.int8_vectorwise_dequant(tensor.data, _row_scales(tensor).to(tensor.device)).to(torch.float32)


def quantised_like(tensor: Any, dense: torch.Tensor) -> Any:
    """A new parameter of ``tensor``'s kind and settings holding ``dense`` (``(out, in)``),
    quantised as bitsandbytes quantises it; frozen, on ``tensor``'s device."""
    bnb = _bnb()
    device = tensor.device
    if quantised_kind(tensor) == "4bit":
        codes, state = bnb.functional.quantize_4bit(
            dense.to(device=device, dtype=dense_dtype(tensor)).contiguous(),
            blocksize=tensor.blocksize,
            compress_statistics=tensor.compress_statistics,
            quant_type=tensor.quant_type,
            quant_storage=tensor.quant_storage,
        )
        return bnb.nn.Params4bit(
            codes, requires_grad=False, quant_state=state, blocksize=tensor.blocksize,
            compress_statistics=tensor.compress_statistics, quant_type=tensor.quant_type,
            quant_storage=tensor.quant_storage, module=getattr(tensor, "module", None), bnb_quantized=True,
        )
    codes, scales, _ = bnb.functional.int8_vectorwise_quant(dense.to(device=device, dtype=torch.float16).contiguous())
    return bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)


def assign_quantised(target: Any, source: Any) -> Any:
    """Give the quantised parameter ``target`` the value of ``source`` (of its kind) in
    place, so the parameter keeps its identity; returns ``target``."""
    target.data = source.data
    if quantised_kind(target) == "4bit":
        target.quant_state = source.quant_state
        target.bnb_quantized = True
        module = getattr(target, "module", None)
        if module is not None:  # where Linear4bit recovers a lost quant state from, as bitsandbytes sets it
            module.quant_state = source.quant_state
    else:  # codes and scales on the weight: the layer's next forward takes them into its state
        target.CB = source.data
        target.SCB = source.SCB
    return target


def copy_quantised(tensor: Any) -> Any:
    """An independent copy of a quantised parameter: its codes and every piece of its
    quant state (block scales, nested scales, code book) or row scales, as they are now."""
    bnb = _bnb()
    if quantised_kind(tensor) == "4bit":
        return bnb.nn.Params4bit(
            tensor.data.detach().clone(), requires_grad=False, quant_state=copy.deepcopy(tensor.quant_state),
            blocksize=tensor.blocksize, compress_statistics=tensor.compress_statistics, quant_type=tensor.quant_type,
            quant_storage=tensor.quant_storage, module=getattr(tensor, "module", None), bnb_quantized=True,
        )
    codes = tensor.data.detach().clone()
    return bnb.nn.Int8Params(
        codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=_row_scales(tensor).detach().clone()
    )


def scale_tensors(tensor: Any) -> list[torch.Tensor]:
    """The tensors besides the codes that a quantised weight's value depends on."""
    if quantised_kind(tensor) == "4bit":
        state = tensor.quant_state
        found = [state.absmax, state.code]
        nested = getattr(state, "state2", None)
        if getattr(state, "nested", False) and nested is not None:
            found += [nested.absmax, nested.code, torch.as_tensor(state.offset)]
        return found
    scales = getattr(tensor, "SCB", None)
    return [scales] if scales is not None else []


def quantised_fingerprint(tensor: Any, bit_sums: Any) -> Hashable:
    """A fingerprint of a quantised weight's value: the identities of the parameter and
    its quant state, and the bit sums of its codes and scales (None while bitsandbytes
    has it repacked for its CPU kernel, which changes the bits but not the weight)."""
    state = getattr(tensor, "quant_state", None)
    sums = None
    if not _repacked(state):
        sums = (bit_sums(tensor.data), tuple(bit_sums(t.reshape(-1)) for t in scale_tensors(tensor)))
    return (id(tensor), id(state), sums)


def same_quantised_value(tensor: Any, fingerprint: Hashable, bit_sums: Any) -> bool:
    """Whether ``tensor`` still holds the value ``fingerprint`` was taken of: the same
    bits, or, where bitsandbytes repacked it (or unpacked it again) since, the same
    parameter and quant state."""
    if not (isinstance(fingerprint, tuple) and len(fingerprint) == 3):
        return False  # a fingerprint of a dense tensor: the weight was replaced since
    identity, state_identity, sums = fingerprint
    now = quantised_fingerprint(tensor, bit_sums)
    if sums is None or now[2] is None:  # type: ignore[index]
        return (identity, state_identity) == now[:2]  # type: ignore[index]
    return bool(sums == now[2])  # type: ignore[index]
