"""DoRA's training step on a frozen plain ``nn.Linear``/``Conv1D``, as one autograd node.

``y = bias + scale * z`` with ``z = x W^T + s (x A^T) B^T`` and ``scale = m * inv_norm``
per output (``inv_norm`` a constant: DoRA's norm carries no gradient). Composed from
autograd's own pieces (the fused LoRA node, then ``addcmul``), backward would form
``g * scale``, an output-sized tensor, only to multiply it by W, A and B. Here it is
never formed: the scale is folded into the small operands instead,

* ``d x = g (scale * W) + s (g (scale * B)) A`` (the scaled weight is a temporary of the
  weight's size, used when it is smaller than the output: tokens >= in_features; else
  ``g * scale`` is formed as autograd would);
* ``d B = scale * (g^T (s x A^T))``, ``d A = s (scale * B)^T g^T x``;
* ``d m = inv_norm * sum_tokens(g * z)``, the one pass over the output that DoRA needs.

The base product and the LoRA products are those of :mod:`peftcore_torch.lora_kernels`.
A second derivative through this node is refused (``once_differentiable``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.autograd.function import once_differentiable

from peftcore_torch.lora_kernels import lora_linear_forward


class _FusedDoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        magnitude: torch.Tensor,
        inv_norm: torch.Tensor,
        scaling: float,
        weight_in_out: bool,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        scale = magnitude.detach() * inv_norm
        z, hidden_t = lora_linear_forward(x2, None, weight, None, lora_a, lora_b, scaling, weight_in_out)
        y = torch.addcmul(bias, z, scale) if bias is not None else z * scale
        need_a, need_b, need_m = ctx.needs_input_grad[3], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        ctx.save_for_backward(
            x2 if need_a else None, hidden_t if need_b else None, z if need_m else None,
            weight, lora_a, lora_b, scale, inv_norm,
        )
        ctx.scaling, ctx.weight_in_out = scaling, weight_in_out
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x2, hidden_t, z, weight, lora_a, lora_b, scale, inv_norm = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_bias = grad_a = grad_b = grad_m = None
        if need_m:
            grad_m = (g2 * z).sum(0).mul_(inv_norm)
        if need_bias:
            grad_bias = g2.sum(0)
        if need_x or need_a:
            scaled_b = lora_b * scale[:, None]
            grad_hidden_t = scaled_b.t() @ g2.t()  # (r, tokens)
            if ctx.scaling != 1.0:
                grad_hidden_t.mul_(ctx.scaling)
            if need_x:
                in_features = weight.shape[0] if ctx.weight_in_out else weight.shape[1]
                if g2.shape[0] >= in_features:  # the scaled weight is the smaller temporary
                    scaled_w = weight * (scale[None, :] if ctx.weight_in_out else scale[:, None])
                    grad_x = g2 @ (scaled_w.t() if ctx.weight_in_out else scaled_w)
                else:
                    grad_x = (g2 * scale) @ (weight.t() if ctx.weight_in_out else weight)
                grad_x.addmm_(grad_hidden_t.t(), lora_a)
                grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1])
            if need_a:
                grad_a = grad_hidden_t @ x2
        if need_b:
            grad_b = (hidden_t @ g2).t().mul_(scale[:, None])
        return grad_x, None, grad_bias, grad_a, grad_b, grad_m, None, None, None


def fused_dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    inv_norm: torch.Tensor,
    scaling: float,
    weight_in_out: bool,
) -> torch.Tensor:
    """``bias + (m * inv_norm) * (x W^T + s x A^T B^T)`` for a frozen weight, one node."""
    return _FusedDoraLinear.apply(x, weight, bias, lora_a, lora_b, magnitude, inv_norm, scaling, weight_in_out)
