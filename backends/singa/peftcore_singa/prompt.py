"""Prompt tuning and residual prompt tuning for SINGA: virtual tokens at the input embedding.

:class:`PromptEmbedding` wraps the model's input ``layer.Embedding`` and holds each
adapter's prompt (``prompt_embeddings``, ``(num_virtual_tokens, dim)``) and, for residual
prompt tuning, its bottleneck MLP, all in the canonical (torch) layout: weights stacked
over tokens as ``(m, out, in)``, ``m`` being 1 for one shared MLP or ``n`` for one per
token. Tensors are named ``<path>.<tensor>.<adapter>``.

Forward prepends the running adapters' prompts to every sequence of the embedding
output ``(batch, seq, dim)``; the layers after it see ``seq + n`` positions. For P-tuning
the prompt is instead the output of the adapter's
:class:`~peftcore_singa.prompt_encoder.PromptEncoder` (HF PEFT's MLP or LSTM head), whose
tensors are ``<path>.encoder.<module name>.<adapter>``. Everything is
built from ``singa.autograd`` ops or from the small operators below, whose backward
passes are written here because SINGA's own do not fit: its matmul backward is 2-D only
and its ``erf`` backward is wrong (so the exact GELU needs its own). The residual MLP's
layer norm is composed of ``reduce_mean``/``sub``/``mul``/``sqrt``/``div``, whose
gradients are correct.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import numpy as np

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import autograd, singa_wrap, tensor  # noqa: E402

from peftcore.errors import AdapterError  # noqa: E402
from peftcore.methods.prompt_tuning import RESIDUAL_TENSORS, AddPrompt  # noqa: E402
from peftcore_singa.layers import AdapterLayer, constant  # noqa: E402
from peftcore_singa.lora import lora_dropout  # noqa: E402
from peftcore_singa.prompt_encoder import ENCODER_PREFIX, PromptEncoder  # noqa: E402
from peftcore_singa.tensors import copy_into, to_numpy  # noqa: E402

LAYER_NORM_EPS = 1e-5


class BatchedLinear(autograd.Operator):
    """``x @ w^T`` per batch entry: ``x`` is ``(m, k, in)``, ``w`` is ``(m, out, in)``."""

    def forward(self, x: Any, w: Any) -> Any:
        if autograd.training:
            self.inputs = (x, w)
        return singa_wrap.Mult(x, singa_wrap.Transpose(w, [0, 2, 1]))

    def backward(self, dy: Any) -> tuple:
        x, w = self.inputs
        return singa_wrap.Mult(dy, w), singa_wrap.Mult(singa_wrap.Transpose(dy, [0, 2, 1]), x)


class ExactGelu(autograd.Operator):
    """``x * Phi(x)`` with the normal CDF through ``erf`` (torch's default GELU)."""

    def forward(self, x: Any) -> Any:
        cdf = singa_wrap.MultFloat(singa_wrap.AddFloat(singa_wrap.Erf(singa_wrap.MultFloat(x, 1.0 / math.sqrt(2.0))), 1.0), 0.5)
        if autograd.training:
            self.inputs = (x, cdf)
        return singa_wrap.__mul__(x, cdf)

    def backward(self, dy: Any) -> Any:
        x, cdf = self.inputs
        # d/dx x*Phi(x) = Phi(x) + x * exp(-x^2/2) / sqrt(2 pi)
        density = singa_wrap.MultFloat(singa_wrap.Exp(singa_wrap.MultFloat(singa_wrap.Square(x), -0.5)), 1.0 / math.sqrt(2.0 * math.pi))
        return singa_wrap.__mul__(dy, singa_wrap.__add__(cdf, singa_wrap.__mul__(x, density)))


class PrependPrompt(autograd.Operator):
    """``prompt`` ``(n, dim)`` put in front of every sequence of ``embeds`` ``(batch, seq, dim)``."""

    def forward(self, prompt: Any, embeds: Any) -> Any:
        batch, _, dim = embeds.shape()
        n = prompt.shape()[0]
        if autograd.training:
            self.sizes = (batch, n, dim)
        rows = singa_wrap.Reshape(prompt, [1, n, dim])
        tiled = singa_wrap.ConcatOn(singa_wrap.VecTensor([rows] * batch), 0)
        return singa_wrap.ConcatOn(singa_wrap.VecTensor([tiled, embeds]), 1)

    def backward(self, dy: Any) -> tuple:
        batch, n, dim = self.sizes
        total = dy.shape()[1]
        per_sequence = singa_wrap.Reshape(singa_wrap.SliceOn(dy, 0, n, 1), [batch, n * dim])
        d_prompt = singa_wrap.Reshape(singa_wrap.Sum(per_sequence, 0), [n, dim])
        return d_prompt, singa_wrap.SliceOn(dy, n, total, 1)


_ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    "relu": autograd.relu,
    "gelu": lambda x: ExactGelu()(x)[0],
    "tanh": autograd.tanh,
    "sigmoid": autograd.sigmoid,
    "identity": lambda x: x,
}


def layer_norm(x: Any) -> Any:
    """Normalise each row of 2-D ``x`` to zero mean and unit variance (no affine part)."""
    centered = autograd.sub(x, autograd.reduce_mean(x, axes=[1], keepdims=1))
    variance = autograd.reduce_mean(autograd.mul(centered, centered), axes=[1], keepdims=1)
    return autograd.div(centered, autograd.sqrt(autograd.add(variance, constant(LAYER_NORM_EPS, x))))


class PromptEmbedding(AdapterLayer):
    """An embedding layer whose output gets each active adapter's virtual tokens in front."""

    adapter_tensor_names = ("prompt_embeddings", *RESIDUAL_TENSORS)

    def __init__(self, base_layer: Any, path: str) -> None:
        super().__init__(base_layer, path)
        self.residual_activation: dict[str, str] = {}
        self.residual_dropout: dict[str, float] = {}
        #: XPrompt's fixed masks (1 = kept), frozen ``(num_virtual_tokens, dim)`` tensors
        self.prompt_masks: dict[str, Any] = {}
        #: P-tuning's prompt encoders, by adapter (their output is the prompt)
        self.prompt_encoders: dict[str, PromptEncoder] = {}

    # -- building -------------------------------------------------------------------------
    def add(self, adapter_name: str, op: AddPrompt) -> None:
        self.check_can_add(adapter_name, op)
        table = self.base_layer.W
        op.check_table(tuple(table.shape))
        if op.encoder:
            self.prompt_encoders[adapter_name] = PromptEncoder(
                op, lambda shape, name: self.new_tensor(shape, f"{ENCODER_PREFIX}{name}.{adapter_name}")
            )
            return
        prompt = self.new_tensor((op.num_virtual_tokens, op.token_dim), f"prompt_embeddings.{adapter_name}")
        if op.init == "random":
            # the table's own scale: a unit normal would dwarf real token vectors
            prompt.gaussian(0.0, float(np.std(to_numpy(table))) or 1.0)
        else:
            if op.init == "token_ids":
                ids = np.asarray(op.init_token_ids, dtype=np.int64)
            else:
                ids = np.random.randint(0, op.num_embeddings, size=op.num_virtual_tokens)
            copy_into(prompt, to_numpy(table)[ids])
        mask = op.element_mask()
        if mask is not None:
            frozen = tensor.Tensor(tuple(prompt.shape), prompt.device, prompt.dtype, requires_grad=False, stores_grad=False)
            copy_into(frozen, np.asarray(mask))
            copy_into(prompt, to_numpy(prompt) * np.asarray(mask))
            self.prompt_masks[adapter_name] = frozen
        self.prompt_embeddings[adapter_name] = prompt
        if op.residual:
            self._add_residual(adapter_name, op)

    def _add_residual(self, adapter_name: str, op: AddPrompt) -> None:
        for name, shape in op.residual_shapes().items():
            t = self.new_tensor(shape, f"{name}.{adapter_name}")
            bound = op.residual_init_bound(name)
            if bound:
                t.uniform(-bound, bound)
            else:
                t.set_value(0.0)
            getattr(self, name)[adapter_name] = t
        self.residual_activation[adapter_name] = op.residual_activation
        self.residual_dropout[adapter_name] = float(op.residual_dropout)

    def delete(self, adapter_name: str) -> None:
        super().delete(adapter_name)
        self.residual_activation.pop(adapter_name, None)
        self.residual_dropout.pop(adapter_name, None)
        self.prompt_masks.pop(adapter_name, None)
        self.prompt_encoders.pop(adapter_name, None)

    # -- P-tuning's encoders in the generic adapter state ------------------------------------
    def adapter_names(self) -> list[str]:
        own = super().adapter_names()
        return own + [name for name in self.prompt_encoders if name not in own]

    def adapter_tensors(self, adapter_name: Optional[str] = None) -> list[Any]:
        found = super().adapter_tensors(adapter_name)
        for name, encoder in self.prompt_encoders.items():
            if adapter_name is None or name == adapter_name:
                found.extend(encoder.tensors.values())
        return found

    def export(self, adapter_name: str) -> dict[str, np.ndarray]:
        tensors = super().export(adapter_name)
        encoder = self.prompt_encoders.get(adapter_name)
        if encoder is not None:
            tensors.update({ENCODER_PREFIX + k: np.ascontiguousarray(to_numpy(t)) for k, t in encoder.tensors.items()})
            tensors["prompt_embeddings"] = np.ascontiguousarray(self._eval_prompt(adapter_name))
        return tensors

    def load(self, adapter_name: str, tensors: Mapping[str, Any]) -> None:
        super().load(adapter_name, tensors)
        encoder = self.prompt_encoders.get(adapter_name)
        if encoder is None:
            return
        pending = []
        for name, target in encoder.tensors.items():
            key = ENCODER_PREFIX + name
            if key not in tensors:
                raise AdapterError(f"tensor {key!r} missing for adapter {adapter_name!r}")
            value = np.asarray(tensors[key])
            if tuple(value.shape) != tuple(target.shape):
                raise AdapterError(f"tensor {key!r} has shape {value.shape}, expected {tuple(target.shape)}")
            pending.append((target, value))
        for target, value in pending:
            copy_into(target, value)

    def _eval_prompt(self, adapter_name: str) -> np.ndarray:
        """The adapter's prompt in eval mode (no dropout), as numpy."""
        previous = autograd.training
        autograd.training = False
        try:
            return to_numpy(self.prompt(adapter_name))
        finally:
            autograd.training = previous

    # -- computing prompts ------------------------------------------------------------------
    def prompt(self, adapter_name: str) -> Any:
        """The adapter's virtual token vectors, ``(num_virtual_tokens, dim)``."""
        if adapter_name in self.prompt_encoders:
            return self.prompt_encoders[adapter_name]()
        prompt = self.prompt_embeddings[adapter_name]
        if adapter_name in self.prompt_masks:  # pruned entries stay zero and get no gradient
            return autograd.mul(prompt, self.prompt_masks[adapter_name])
        if adapter_name not in self.residual_down_weight:
            return prompt
        n, dim = (int(d) for d in prompt.shape)
        down_w, up_w = self.residual_down_weight[adapter_name], self.residual_up_weight[adapter_name]
        stacks, bottleneck = int(down_w.shape[0]), int(down_w.shape[1])
        per_stack = n // stacks  # all n tokens through one MLP, or one token through each
        hidden = BatchedLinear()(autograd.reshape(prompt, [stacks, per_stack, dim]), down_w)[0]
        hidden = autograd.add(autograd.reshape(hidden, [n, bottleneck]), self.residual_down_bias[adapter_name])
        hidden = _ACTIVATIONS[self.residual_activation[adapter_name]](hidden)
        hidden = lora_dropout(hidden, self.residual_dropout[adapter_name])
        out = BatchedLinear()(autograd.reshape(hidden, [stacks, per_stack, bottleneck]), up_w)[0]
        out = autograd.add(autograd.reshape(out, [n, dim]), self.residual_up_bias[adapter_name])
        if adapter_name in self.residual_norm_weight:
            out = autograd.mul(layer_norm(out), self.residual_norm_weight[adapter_name])
            out = autograd.add(out, self.residual_norm_bias[adapter_name])
        return autograd.add(prompt, out)

    def forward(self, ids: Any) -> Any:
        embeds = self.base_layer(ids)
        running = self.adapters_to_run()
        if not running:
            return embeds
        self.device_check(embeds, *(t for name in running for t in self.adapter_tensors(name)))
        prompts = [self.prompt(name) for name in running]
        joined = prompts[0] if len(prompts) == 1 else autograd.cat(prompts, axis=0)
        return PrependPrompt()(joined, embeds)[0]

    # -- baking and merging -------------------------------------------------------------------
    def bake(self, adapter_name: str) -> None:
        """Store the residual MLP's output (eval mode: no dropout) as the prompt and drop the MLP."""
        if adapter_name not in self.residual_down_weight:
            return
        value = self._eval_prompt(adapter_name)
        copy_into(self.prompt_embeddings[adapter_name], value)
        for name in RESIDUAL_TENSORS:
            getattr(self, name).pop(adapter_name, None)
        self.residual_activation.pop(adapter_name, None)
        self.residual_dropout.pop(adapter_name, None)

    def merge(self, adapter_names: Any) -> None:
        if any(self.has_adapter(a) for a in adapter_names):
            raise AdapterError("a prompt-tuning adapter adds virtual tokens; it has no weights to merge into the base")

    def unmerge(self) -> None:
        """Nothing was merged."""

    def unwrap(self, merge: bool) -> Any:
        if merge and any(self.has_adapter(a) for a in self.active_adapters):
            raise AdapterError("a prompt-tuning adapter adds virtual tokens; it has no weights to merge into the base")
        return self.base_layer
