"""Prompt tuning and residual prompt tuning for torch: virtual tokens at the input embedding.

:class:`PromptEmbedding` wraps the model's input embedding layer and holds each adapter's
prompt (``prompt_embeddings``, ``(num_virtual_tokens, dim)``) and, for residual prompt
tuning, its bottleneck MLP (tensors stacked over tokens; one slice when shared). For
P-tuning the prompt is instead the output of a :class:`PromptEncoder` (HF PEFT's MLP or
LSTM). With HF's encoder-decoder layout (``num_transformer_submodules=2``) the stored table
has twice the rows; only the first ``num_virtual_tokens`` go into the model.

How the prompt reaches the model depends on the model:

- a plain model (its ``forward`` has no ``input_ids``/``inputs_embeds`` argument) gets the
  prompt prepended to every output of the embedding layer;
- a transformers-style model gets a forward pre-hook (:mod:`peftcore_torch.prompt_inputs`)
  that lengthens ``input_ids`` by placeholder ids and the attention mask, labels, token
  type ids and positions to match; the embedding layer then swaps the placeholders'
  vectors for the prompt. Generation with a cache prepends the prompt once;
- an encoder-decoder model (T5, BART) gets the prompt in front of its encoder's input
  (:class:`~peftcore_torch.prompt_inputs.EncoderPromptHook`), as HF PEFT does.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.errors import AdapterError
from peftcore.methods.prompt_tuning import RESIDUAL_TENSORS, AddPrompt
from peftcore_torch.layers import AdapterLayer

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


class PromptEncoder(nn.Module):
    """P-tuning's prompt encoder, laid out as HF PEFT's (``embedding``, ``mlp_head``,
    ``lstm_head``), so its state-dict names are the canonical ones."""

    def __init__(self, op: AddPrompt) -> None:
        super().__init__()
        d, h = op.token_dim, op.encoder_hidden
        self.embedding = nn.Embedding(op.num_virtual_tokens * op.num_transformer_submodules, d)
        self.lstm_head: Optional[nn.LSTM] = None
        if op.encoder == "lstm":
            self.lstm_head = nn.LSTM(
                d, h, num_layers=op.encoder_num_layers, dropout=op.encoder_dropout, bidirectional=True, batch_first=True
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self) -> torch.Tensor:
        tokens = self.embedding.weight.unsqueeze(0)
        if self.lstm_head is not None:
            tokens = self.lstm_head(tokens)[0]
        output: torch.Tensor = self.mlp_head(tokens)[0]
        return output


class PromptEmbedding(AdapterLayer):
    """An embedding layer whose output gets each active adapter's virtual tokens in front."""

    adapter_tensor_names = ("prompt_embeddings", *RESIDUAL_TENSORS)
    base_layer: nn.Embedding
    # the residual reparameterisation's tensors (made by name from RESIDUAL_TENSORS)
    residual_down_weight: nn.ParameterDict
    residual_down_bias: nn.ParameterDict
    residual_up_weight: nn.ParameterDict
    residual_up_bias: nn.ParameterDict
    residual_norm_weight: nn.ParameterDict
    residual_norm_bias: nn.ParameterDict

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prompt_embeddings = nn.ParameterDict()
        for name in RESIDUAL_TENSORS:
            setattr(self, name, nn.ParameterDict())
        self.residual_dropout = nn.ModuleDict()
        self.residual_activation: dict[str, str] = {}
        #: XPrompt's fixed masks (1 = kept), ``(num_virtual_tokens, dim)``, per adapter
        self.prompt_masks: dict[str, torch.Tensor] = {}
        #: virtual tokens each adapter puts in the model, when its table has more rows
        #: (HF's encoder-decoder layout keeps a second, unused block)
        self.prompt_lengths: dict[str, int] = {}
        #: adapters whose task type has the model ignore token type ids (HF PEFT's rule)
        self.drop_token_types: set[str] = set()
        #: P-tuning's prompt encoders, by adapter (their output is the prompt); HF PEFT's name
        self.prompt_encoder = nn.ModuleDict()
        #: set by the model's input hook: the first ``pending_prefix`` ids are placeholders
        self.pending_prefix = 0
        self.input_hook: Optional[Any] = None

    # -- building -------------------------------------------------------------------------
    def add(self, adapter_name: str, op: AddPrompt) -> None:
        self.check_can_add(adapter_name, op)
        table = self.base_layer.weight
        op.check_table(tuple(table.shape))
        if not op.keep_token_type_ids:
            self.drop_token_types.add(adapter_name)
        rows = op.num_virtual_tokens * op.num_transformer_submodules
        if rows != op.num_virtual_tokens:
            self.prompt_lengths[adapter_name] = op.num_virtual_tokens
        if op.encoder:
            weight = self.base_weight()
            self.prompt_encoder[adapter_name] = PromptEncoder(op).to(device=weight.device, dtype=weight.dtype)
            return
        prompt = self.new_tensor(rows, op.token_dim)
        with torch.no_grad():
            if op.init == "random":
                # the table's own scale: a unit normal would dwarf real token vectors
                nn.init.normal_(prompt, std=float(table.detach().float().std()) or 1.0)
            else:
                if op.init == "token_ids":
                    ids = torch.tensor(op.init_token_ids, device=table.device)
                else:
                    ids = torch.randint(0, op.num_embeddings, (op.num_virtual_tokens,), device=table.device)
                prompt.copy_(table.detach()[ids].repeat(op.num_transformer_submodules, 1))
        mask = op.element_mask()
        if mask is not None:
            self.prompt_masks[adapter_name] = torch.tensor(mask, dtype=prompt.dtype, device=prompt.device)
            with torch.no_grad():
                prompt.mul_(self.prompt_masks[adapter_name])
        self.prompt_embeddings[adapter_name] = prompt
        if op.residual:
            self._add_residual(adapter_name, op)

    def _add_residual(self, adapter_name: str, op: AddPrompt) -> None:
        shapes = op.residual_shapes()
        for name, shape in shapes.items():
            tensor = self.new_tensor(*shape)
            bound = op.residual_init_bound(name)
            with torch.no_grad():
                if bound:
                    tensor.uniform_(-bound, bound)
                else:
                    tensor.zero_()
            getattr(self, name)[adapter_name] = tensor
        self.residual_activation[adapter_name] = op.residual_activation
        self.residual_dropout[adapter_name] = nn.Dropout(op.residual_dropout) if op.residual_dropout > 0 else nn.Identity()

    def delete(self, adapter_name: str) -> None:
        super().delete(adapter_name)
        self.residual_activation.pop(adapter_name, None)
        self.prompt_masks.pop(adapter_name, None)
        self.prompt_lengths.pop(adapter_name, None)
        self.drop_token_types.discard(adapter_name)
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        if adapter_name in self.residual_dropout:
            del self.residual_dropout[adapter_name]

    # -- computing prompts ------------------------------------------------------------------
    def prompt(self, adapter_name: str) -> torch.Tensor:
        """The adapter's virtual token vectors, ``(num_virtual_tokens, dim)``."""
        if adapter_name in self.prompt_encoder:
            prompt = self.prompt_encoder[adapter_name]()
        else:
            prompt = self.prompt_embeddings[adapter_name]
        if adapter_name in self.prompt_lengths:
            prompt = prompt[: self.prompt_lengths[adapter_name]]
        mask = self.prompt_masks.get(adapter_name)
        if mask is not None:  # pruned entries stay exactly zero, and get no gradient
            if mask.device != prompt.device or mask.dtype != prompt.dtype:
                mask = self.prompt_masks[adapter_name] = mask.to(device=prompt.device, dtype=prompt.dtype)
            return prompt * mask[: prompt.shape[0]]  # the mask covers every stored block
        if adapter_name not in self.residual_down_weight:
            return prompt
        down_w, down_b = self.residual_down_weight[adapter_name], self.residual_down_bias[adapter_name]
        up_w, up_b = self.residual_up_weight[adapter_name], self.residual_up_bias[adapter_name]
        # (n, 1, d) @ (m, d, b): m is 1 (one shared MLP) or n (one per token)
        hidden = torch.matmul(prompt.unsqueeze(1), down_w.transpose(1, 2)).squeeze(1) + down_b
        hidden = self.residual_dropout[adapter_name](_ACTIVATIONS[self.residual_activation[adapter_name]](hidden))
        out = torch.matmul(hidden.unsqueeze(1), up_w.transpose(1, 2)).squeeze(1) + up_b
        if adapter_name in self.residual_norm_weight:
            out = F.layer_norm(out, out.shape[-1:]) * self.residual_norm_weight[adapter_name] + self.residual_norm_bias[adapter_name]
        return prompt + out

    def num_virtual_tokens(self) -> int:
        """How many vectors the running adapters put in front of the input."""
        return sum(self.prompt_lengths.get(a, self._rows(a)) for a in self.adapters_to_run())

    def _rows(self, adapter_name: str) -> int:
        encoder = self.prompt_encoder[adapter_name] if adapter_name in self.prompt_encoder else None
        if isinstance(encoder, PromptEncoder):
            return int(encoder.embedding.weight.shape[0])
        return int(self.prompt_embeddings[adapter_name].shape[0])

    # -- P-tuning's encoders in the generic adapter state ------------------------------------
    def adapter_names(self) -> list[str]:
        own = list(self.prompt_embeddings.keys())
        return own + [name for name in self.prompt_encoder.keys() if name not in own]

    def export(self, adapter_name: str) -> dict[str, torch.Tensor]:
        tensors = super().export(adapter_name)
        if adapter_name in self.prompt_encoder:
            encoder = self.prompt_encoder[adapter_name]
            tensors.update({f"encoder.{k}": v.detach() for k, v in encoder.state_dict().items()})
            was_training = encoder.training
            encoder.eval()
            try:
                with torch.no_grad():  # what HF PEFT saves and loads: the encoder's output
                    tensors["prompt_embeddings"] = encoder().detach()
            finally:
                encoder.train(was_training)
        return tensors

    def load(self, adapter_name: str, tensors: Mapping[str, Any]) -> None:
        super().load(adapter_name, tensors)
        if adapter_name not in self.prompt_encoder:
            return
        state = self.prompt_encoder[adapter_name].state_dict()
        for name, target in state.items():
            key = f"encoder.{name}"
            if key not in tensors:
                raise AdapterError(f"tensor {key!r} missing for adapter {adapter_name!r}")
            value = torch.as_tensor(tensors[key])
            if tuple(value.shape) != tuple(target.shape):
                raise AdapterError(f"tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value.to(device=target.device, dtype=target.dtype))

    def set_trainable(self, adapter_name: str, trainable: bool) -> None:
        super().set_trainable(adapter_name, trainable)
        if adapter_name in self.prompt_encoder:
            self.prompt_encoder[adapter_name].requires_grad_(trainable)

    def prompt_batch(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The running adapters' prompts, concatenated, for a batch: ``(batch, n, dim)``."""
        prompts = [self.prompt(a) for a in self.adapters_to_run()]
        joined = prompts[0] if len(prompts) == 1 else torch.cat(prompts, dim=0)
        return joined.to(dtype).unsqueeze(0).expand(batch, -1, -1)

    def forward(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        prefix, self.pending_prefix = self.pending_prefix, 0
        if prefix:
            embeds = self.base_layer(ids[:, prefix:], *args, **kwargs)
        else:
            embeds = self.base_layer(ids, *args, **kwargs)
            if self.input_hook is not None or not self.adapters_to_run():
                return embeds  # a hooked model's later generation steps: the prompt is cached
        if embeds.dim() == 2:  # one unbatched sequence
            return torch.cat([self.prompt_batch(1, embeds.dtype)[0], embeds], dim=0)
        return torch.cat([self.prompt_batch(embeds.shape[0], embeds.dtype), embeds], dim=1)

    # -- baking and merging -------------------------------------------------------------------
    def bake(self, adapter_name: str) -> None:
        """Store the residual MLP's output (eval mode) as the prompt and drop the MLP."""
        if adapter_name not in self.residual_down_weight:
            return
        dropout = self.residual_dropout[adapter_name]
        was_training = dropout.training
        dropout.eval()
        try:
            with torch.no_grad():
                value = self.prompt(adapter_name).detach().clone()
        finally:
            dropout.train(was_training)
        with torch.no_grad():
            self.prompt_embeddings[adapter_name][: value.shape[0]].copy_(value)
        for name in RESIDUAL_TENSORS:
            store = getattr(self, name)
            if adapter_name in store:
                del store[adapter_name]
        del self.residual_dropout[adapter_name]
        self.residual_activation.pop(adapter_name, None)

    def merge(self, adapter_names: list[str]) -> None:
        if any(self.has_adapter(a) for a in adapter_names):
            raise AdapterError("a prompt-tuning adapter adds virtual tokens; it has no weights to merge into the base")

    def unwrap(self, merge: bool) -> nn.Module:
        if merge and any(self.has_adapter(a) for a in self.active_adapters):
            raise AdapterError("a prompt-tuning adapter adds virtual tokens; it has no weights to merge into the base")
        if self.input_hook is not None:
            self.input_hook.remove()
            self.input_hook = None
        return self.base_layer
