"""The arithmetic of a LoRA linear layer, written for speed.

``y = x W' + bias + s (x A^T) B^T`` where ``W'`` is the base weight in the layout the
product needs, A is ``(r, in)``, B ``(out, r)`` and ``s`` the scaling.

:func:`fused_lora_linear` computes the base product and the low-rank update in one
autograd node, for a frozen ``nn.Linear`` or GPT-2 ``Conv1D`` base:

* the scaling multiplies the ``(r, tokens)`` intermediate, never a ``(tokens, out)`` tensor;
* the update is added into the base output by ``addmm_`` (no second output tensor);
* the gradient of ``x`` gets the low-rank part by ``addmm_`` into the base part, so
  autograd never sums two ``(tokens, in)`` gradients;
* the thin products (one side of width r) are written in the operand layout BLAS runs
  fastest: ``B^T @ g^T`` and ``(s h)^T @ g`` instead of autograd's ``g @ B`` and
  ``g^T @ h``, which MKL runs 3 to 10 times slower for these shapes.

The base product and its gradient use exactly the kernels ``nn.Linear``/``Conv1D`` and
their autograd formulas use, so the base part of the result is unchanged.

Without autograd, a float32/float64 layer fed at least as many tokens as its weight's
smaller side folds the adapter into a temporary copy of the weight instead
(:func:`folding_pays`): one product, and no pass over the output for the update.
"""

from __future__ import annotations

from typing import Any, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftcore_torch.output_head import contiguous_input
from peftcore_torch.tracing import compiling


def base_product(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight_in_out: bool,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x2 @ W' + bias`` as ``nn.Linear`` (weight ``(out, in)``) or ``Conv1D`` (``(in, out)``)
    computes it, written into ``out`` when given."""
    w = weight if weight_in_out else weight.t()
    if bias is None:
        return torch.mm(x2, w, out=out)
    return torch.addmm(bias, x2, w, out=out)


def merged_weight(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, weight_in_out: bool
) -> torch.Tensor:
    """A temporary copy of the base weight with the adapter folded in, in the weight's layout."""
    if weight_in_out:
        return torch.addmm(weight, lora_a.t(), lora_b.t(), alpha=scaling)
    return torch.addmm(weight, lora_b, lora_a, alpha=scaling)


def folding_pays(tokens: int, weight: torch.Tensor) -> bool:
    """Without autograd, whether to fold the adapter into a temporary weight rather than
    add its update to the output: folding writes a weight-sized tensor, adding reads and
    writes the output, so fold when ``tokens`` is at least the weight's smaller side.
    Only in float32/float64: a 16-bit weight would round most of the update away."""
    return weight.dtype in (torch.float32, torch.float64) and tokens >= min(weight.shape)


def _scaled_hidden_t(lora_input: torch.Tensor, lora_a: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s (x A^T)^T`` as an ``(r, tokens)`` tensor."""
    hidden_t = lora_a @ lora_input.reshape(-1, lora_input.shape[-1]).t()
    return hidden_t.mul_(scaling) if scaling != 1.0 else hidden_t


def lora_linear_forward(
    x: torch.Tensor,
    lora_input: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    weight_in_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x W' + bias + s (x A^T) B^T, s (x A^T)^T)``: the output in ``x``'s shape and the
    scaled ``(r, tokens)`` intermediate a backward pass needs."""
    x2 = x.reshape(-1, x.shape[-1])
    out = base_product(x2, weight, bias, weight_in_out)
    hidden_t = _scaled_hidden_t(x2 if lora_input is None else lora_input, lora_a, scaling)
    out.addmm_(hidden_t.t(), lora_b.t())
    return out.view(*x.shape[:-1], out.shape[-1]), hidden_t


class _FusedLoraLinear(torch.autograd.Function):
    """One autograd node for base product plus LoRA update (frozen base weight)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        lora_input: Optional[torch.Tensor],
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        weight_in_out: bool,
    ) -> torch.Tensor:
        out, hidden_t = lora_linear_forward(x, lora_input, weight, bias, lora_a, lora_b, scaling, weight_in_out)
        source = x if lora_input is None else lora_input
        need_a, need_b = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        # x is kept when either factor trains: a double backward recomputes s (x A^T) from it
        saved_source = source if need_a or need_b else None
        ctx.save_for_backward(saved_source, hidden_t if need_b else None, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.weight_in_out = weight_in_out
        ctx.separate_input = lora_input is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        source, hidden_t, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_input, _, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_input = grad_bias = grad_a = grad_b = None
        if need_x or need_input or need_a:
            grad_hidden_t = lora_b.t() @ grad2.t()  # (r, tokens): d loss / d (x A^T), transposed
            if ctx.scaling != 1.0:
                grad_hidden_t = grad_hidden_t.mul_(ctx.scaling)
            if need_x:
                w = weight if ctx.weight_in_out else weight.t()
                grad_x = grad2 @ w.t()
                if not ctx.separate_input:
                    grad_x.addmm_(grad_hidden_t.t(), lora_a)
                grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1])
            if need_input:
                grad_input = (grad_hidden_t.t() @ lora_a).view(*grad.shape[:-1], lora_a.shape[1])
            if need_a:
                grad_a = grad_hidden_t @ source.reshape(-1, source.shape[-1])
        if need_b:
            if torch.is_grad_enabled():  # create_graph: hidden_t must be a function of x and A
                hidden_t = _scaled_hidden_t(source, lora_a, ctx.scaling)
            grad_b = (hidden_t @ grad2).t()
        if need_bias:
            grad_bias = grad2.sum(0)
        return grad_x, grad_input, None, grad_bias, grad_a, grad_b, None, None


def fused_lora_linear(
    x: torch.Tensor,
    lora_input: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    weight_in_out: bool,
) -> torch.Tensor:
    """Base linear plus one LoRA update. ``lora_input`` is ``x`` after dropout, or None
    when the adapter has no dropout (then x feeds both parts). The base weight must be
    frozen (see :func:`can_fuse`)."""
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lora_input, bias, lora_a, lora_b)
    ):
        return _FusedLoraLinear.apply(x, lora_input, weight, bias, lora_a, lora_b, scaling, weight_in_out)
    x2 = x.reshape(-1, x.shape[-1])
    if compiling():
        # traced for inductor: a plain sum, whose scale and add inductor fuses into the next
        # pointwise kernel; addmm_ would read the whole output again in a kernel of its own.
        # x A^T as F.linear of the unflattened input: with only flattened views of a one-row
        # input, inductor gave them the stride (0, 1), which BLAS cannot take, and aten copied
        # the row before each product (37 copies a decoding step here; HF PEFT's graph has none)
        hidden = F.linear(x if lora_input is None else lora_input, lora_a).reshape(-1, lora_a.shape[0])
        out = base_product(x2, weight, bias, weight_in_out) + torch.mm(hidden, lora_b.t()) * scaling
    elif lora_input is None and folding_pays(x2.shape[0], weight):
        out = base_product(x2, merged_weight(weight, lora_a, lora_b, scaling, weight_in_out), bias, weight_in_out)
    else:
        # no autograd: the scaling rides on the last product (addmm_'s alpha), one kernel fewer
        # per call, which is most of the adapter's cost when decoding one token at a time
        out = base_product(x2, weight, bias, weight_in_out)
        hidden = torch.mm(x2 if lora_input is None else lora_input.reshape(x2.shape), lora_a.t())
        out.addmm_(hidden, lora_b.t(), alpha=scaling)
    return out.view(*x.shape[:-1], out.shape[-1])


class PreparedLoraLinear:
    """One plain LoRA linear layer's inference arithmetic, its operands laid out once for
    many calls (the decoding steps of one ``generate``, :mod:`peftcore_torch.call_cache`):
    B is copied to a contiguous ``(r, out)`` matrix, the layout BLAS runs the thin
    ``hidden @ B^T`` product in fastest (on GPT-2's shapes 2.5 times faster than on
    ``B.t()``'s view for one row, a quarter faster for eight), and the checks that chose
    this product are not repeated. The base product is the one :func:`base_product`
    computes."""

    __slots__ = ("weight", "base_operand", "bias", "lora_a", "lora_b", "a_t", "b_t", "scaling", "weight_in_out", "dtype", "device")

    def __init__(
        self,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        weight_in_out: bool,
    ) -> None:
        self.weight, self.bias, self.lora_a, self.lora_b = weight, bias, lora_a, lora_b
        self.scaling, self.weight_in_out = scaling, weight_in_out
        self.base_operand = weight if weight_in_out else weight.t()
        self.a_t = lora_a.t()
        with torch.no_grad():
            self.b_t = lora_b.t().contiguous()
        self.dtype, self.device = weight.dtype, weight.device

    def fits(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is an input these operands serve: same dtype and device, no autograd."""
        return x.dtype is self.dtype and x.device == self.device and x.dim() >= 2 and not torch.is_grad_enabled()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if folding_pays(x2.shape[0], self.weight):  # a long prompt: one product with the adapter folded in
            folded = merged_weight(self.weight, self.lora_a, self.lora_b, self.scaling, self.weight_in_out)
            out = base_product(x2, folded, self.bias, self.weight_in_out)
        else:  # base_operand is already in the (in, out) layout
            out = base_product(x2, self.base_operand, self.bias, weight_in_out=True)
            out.addmm_(torch.mm(x2, self.a_t), self.b_t, alpha=self.scaling)
        return out.view(*x.shape[:-1], out.shape[-1])


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# torch registers global hooks by adding to these module-level dicts, never by rebinding them
_GLOBAL_HOOKS = tuple(
    getattr(nn.modules.module, name, {})
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run a hook (its own or a global one) other than
    :func:`~peftcore_torch.output_head.contiguous_input`, which only changes the layout of
    an input that the products here reshape anyway (an adapted output layer)."""
    state = module.__dict__
    if any(_GLOBAL_HOOKS):
        return True
    for name in _HOOK_DICTS:
        hooks = state.get(name)
        if hooks and any(hook is not contiguous_input for hook in hooks.values()):
            return True
    return False


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4 takes no device argument
        return bool(torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled())


def can_fuse(base: nn.Module, exact_type: bool, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """Whether :func:`fused_lora_linear` computes exactly what calling ``base`` then adding
    the update would: a plain (``exact_type``) unhooked layer with a frozen weight, one
    dtype and device throughout, and no autocast."""
    if not exact_type or x.dim() < 2 or has_hooks(base):
        return False
    weight, bias = cast(torch.Tensor, base.weight), cast(Optional[torch.Tensor], base.bias)
    if weight.requires_grad or not (x.dtype == weight.dtype == lora_a.dtype == lora_b.dtype):
        return False
    if bias is not None and bias.dtype != weight.dtype:
        return False
    device = weight.device
    if not (x.device == device == lora_a.device == lora_b.device):
        return False
    return not _autocast_on(device.type)
