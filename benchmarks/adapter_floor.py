"""The least work a LoRA adapter adds to a model, timed alone: about the best a row's
target can be met by on this machine.

An unmerged LoRA layer computes ``x W + s (x A^T) B^T``. Whatever a library does about
Python overhead, copies or fusion, it must still run the two thin products of every
adapted layer (and in training the four of the backward pass), and it must read every
distinct adapter's factors once per forward pass. These thin products are bound by
memory, not by arithmetic: on a CPU they cost far more than their share of the model's
multiply-adds (``2r/d``) suggests. Without autograd an adapter may instead be folded into
a temporary copy of the weight, which pays where it has many tokens. Each function here
returns a callable that runs just that work, at the row's shapes, with BLAS products
(what both libraries call), on tensors made once and reused (so they are as warm in the
caches as they can be, which errs on the side of a lower bound). A row times this work
alone as one more contender in its rounds; the reference plus it, over the reference,
is the least a library doing this work could reach (:meth:`harness.Result.bound_ratio`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from models import ALPHA, LORA_TARGETS, RANK

Shape = Tuple[int, int]  # (in_features, out_features) of one adapted layer


def adapted_shapes(model: Any) -> List[Shape]:
    """``(in, out)`` of every layer of ``model`` (an unadapted GPT-2-shaped model) that
    the benchmarks' adapter targets (``models.LORA_TARGETS``)."""
    shapes = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in LORA_TARGETS:
            continue
        if hasattr(module, "nx"):  # transformers' Conv1D, weight (in, out)
            shapes.append((int(module.nx), int(module.nf)))
        else:
            shapes.append((int(module.in_features), int(module.out_features)))
    if not shapes:
        raise ValueError(f"no layer named one of {LORA_TARGETS} in {type(model).__name__}")
    return shapes


def training_products(shapes: Sequence[Shape], tokens: int, device: str) -> Callable[[], None]:
    """One training step's LoRA products at ``tokens`` tokens: per layer, the forward's
    ``h = s A x^T`` and ``out += h^T B^T``, the backward's ``g_h = s B^T g^T``,
    ``g_x += g_h^T A``, ``g_A = g_h x`` and ``g_B = (h g)^T``."""
    import torch

    tensors: Dict[Shape, Dict[str, Any]] = {}
    for features_in, features_out in set(shapes):
        tensors[(features_in, features_out)] = {
            "x": torch.randn(tokens, features_in, device=device),
            "g": torch.randn(tokens, features_out, device=device),
            "out": torch.zeros(tokens, features_out, device=device),
            "grad_x": torch.zeros(tokens, features_in, device=device),
            "a": torch.randn(RANK, features_in, device=device) * 0.01,
            "b": torch.randn(features_out, RANK, device=device) * 0.01,
            "grad_a": torch.empty(RANK, features_in, device=device),
            "grad_b_t": torch.empty(RANK, features_out, device=device),
        }
    layers = [tensors[shape] for shape in shapes]
    scaling = ALPHA / RANK

    def run() -> None:
        with torch.no_grad():
            for t in layers:
                hidden_t = (t["a"] @ t["x"].t()).mul_(scaling)
                t["out"].addmm_(hidden_t.t(), t["b"].t())
                grad_hidden_t = (t["b"].t() @ t["g"].t()).mul_(scaling)
                t["grad_x"].addmm_(grad_hidden_t.t(), t["a"])
                torch.mm(grad_hidden_t, t["x"], out=t["grad_a"])
                torch.mm(hidden_t, t["g"], out=t["grad_b_t"])

    return run


def mixed_batch_work(
    shapes: Sequence[Shape], adapters: int, tokens_per_call: Sequence[int], device: str
) -> Callable[[], None]:
    """The adapter work of a mixed batch over ``adapters`` distinct adapters, in a call
    of forward passes with ``tokens_per_call`` tokens each, shared evenly: in every pass
    each layer applies each adapter to its tokens the cheaper of the two known ways.
    Where an adapter has at least as many tokens as the layer's smaller side, it is
    folded into a temporary weight (``W + s A^T B^T``, then the base product uses that
    weight instead of ``W`` at no extra cost); otherwise its factors are read once and
    applied by two batched products over the adapters, the tokens already grouped by
    adapter (no gathers or copies)."""
    import torch

    layers = []
    for features_in, features_out in shapes:
        a = torch.randn(adapters, RANK, features_in, device=device) * 0.01
        b_t = torch.randn(adapters, RANK, features_out, device=device) * 0.01
        passes: Dict[int, Optional[Tuple[Any, Any]]] = {}  # tokens -> (x, out) by adapter; None: fold
        for tokens in set(tokens_per_call):
            share = max(1, tokens // adapters)
            passes[tokens] = None if share >= min(features_in, features_out) else (
                torch.randn(adapters, share, features_in, device=device),
                torch.zeros(adapters, share, features_out, device=device),
            )
        folds = any(grouped is None for grouped in passes.values())
        weight = torch.randn(features_in, features_out, device=device) if folds else None  # only folding reads it
        layers.append((a, b_t, weight, passes))
    scaling = ALPHA / RANK

    def run() -> None:
        with torch.no_grad():
            for tokens in tokens_per_call:
                for a, b_t, weight, passes in layers:
                    grouped = passes[tokens]
                    if grouped is None:
                        for adapter in range(a.shape[0]):
                            torch.addmm(weight, a[adapter].t(), b_t[adapter], alpha=scaling)
                    else:
                        x, out = grouped
                        out.baddbmm_(torch.bmm(x, a.transpose(1, 2)), b_t)

    return run
