"""The JAX adapter layers (LoRA on ``nnx.Linear``/``nnx.Embed``, BitFit, prompt tuning)
and their builders.

Each layer is an ``nnx.Module`` around its base layer, which it holds as ``base_layer``;
adapter tensors are ``nnx.Param`` objects in ``nnx.Dict`` stores keyed by adapter name,
so ``nnx.state``/``nnx.split`` and optimizers see them. The lifecycle (add, delete,
export, load, merge with an exact unmerge, unwrap) is the core's
:class:`~peftcore.adapter_layer.AdapterLayerCore`; here are only the tensors' making,
the forward computations on jax.numpy and each adapter's change to its base tensor.

NNX stores a linear kernel ``(in, out)`` and LoRA keeps A ``(in, r)`` and B ``(r, out)``
in the same orientation; export and import transpose to the canonical ``(r, in)`` and
``(out, r)``.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftcore.adapter_layer import AdapterLayerCore, wrap_layer
from peftcore.errors import AdapterError, PlanError
from peftcore.methods.bitfit import TrainBias
from peftcore.methods.lora import AddLora
from peftcore.methods.lora_conv import AddLoraConv
from peftcore.methods.lora_init import BaseWeightInit
from peftcore.methods.prompt_tuning import RESIDUAL_TENSORS, AddPrompt
from peftcore.runtime import OpBuilders
from peftcore_jax.runtime import CONV_LORA_LIMITATION, JAX_TENSORS, replace_layer

_ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "identity": lambda x: x,
                "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class AdapterLayer(AdapterLayerCore, nnx.Module):
    """A base layer plus named adapters, as an NNX module."""

    primitives = JAX_TENSORS

    def __init__(self, base_layer: Any, path: str) -> None:
        self.base_layer = base_layer
        self.path = path
        self.init_adapter_state()
        for name in (*self.adapter_tensor_names, *self.other_param_names):
            setattr(self, name, nnx.Dict())  # not a dict: nnx transforms must see dropout's RNG state
        # adapter initialisation and dropout: one stream per layer path, so layers of the
        # same shape (each block's q_proj) start from different values and draw other masks
        self.rngs = nnx.Rngs(zlib.crc32(path.encode()))

    def base_tensor(self, role: str) -> Any:
        attribute = ("embedding" if isinstance(self.base_layer, nnx.Embed) else "kernel") if role == "weight" else role
        return getattr(self.base_layer, attribute, None)

    def new_param(self, value: Any) -> nnx.Param:
        """A trainable parameter holding ``value`` in the base weight's dtype."""
        return nnx.Param(jnp.asarray(value, dtype=self.base_weight().dtype))

    def __call__(self, x: Any) -> Any:
        return self.forward(x)

    def forward(self, x: Any) -> Any:
        raise NotImplementedError


class LoraLayer(BaseWeightInit, AdapterLayer):
    """LoRA on an ``nnx.Linear`` (``x @ A @ B * scaling`` added) or an ``nnx.Embed`` (rows
    of A looked up, then projected by B; no dropout, as in HF PEFT). PiSSA, OLoRA and the
    orthogonal init are the core's (:class:`~peftcore.methods.lora_init.BaseWeightInit`)."""

    adapter_tensor_names = ("lora_A", "lora_B")
    other_param_names = ("scaling", "r", "lora_dropout")
    lora_A: nnx.Dict
    lora_B: nnx.Dict
    scaling: nnx.Dict
    lora_dropout: nnx.Dict

    def features(self) -> tuple[int, int]:
        return tuple(int(d) for d in self.base_weight().shape)  # type: ignore[return-value]

    def new_adapter(self, adapter_name: str, op: AddLora) -> dict[str, Any]:
        key_a, key_b = self.rngs.params(), self.rngs.params()
        shape_a, shape_b = (op.in_features, op.r), (op.r, op.out_features)
        if op.layer_kind == "embedding" and op.init != "random":
            a, b = jnp.zeros(shape_a), jax.random.normal(key_b, shape_b)
        else:
            if op.init == "gaussian":
                a = jax.random.normal(key_a, shape_a) / op.r
            else:  # torch's kaiming_uniform_(a=sqrt(5)) on the canonical (r, in) shape
                bound = 1.0 / math.sqrt(max(op.in_features, 1))
                a = jax.random.uniform(key_a, shape_a, minval=-bound, maxval=bound)
            bound_b = 1.0 / math.sqrt(op.r)
            b = jax.random.uniform(key_b, shape_b, minval=-bound_b, maxval=bound_b) if op.init == "random" else jnp.zeros(shape_b)
        dropout = nnx.Dropout(op.dropout, rngs=self.rngs) if op.dropout > 0 and op.layer_kind == "linear" else None
        return {"lora_A": self.new_param(a), "lora_B": self.new_param(b), "scaling": float(op.scaling),
                "r": int(op.r), "lora_dropout": dropout}

    def canonical_export(self, name: str, array: np.ndarray) -> np.ndarray:
        return array.T

    def native_import(self, name: str, array: Any) -> Any:
        return array.T

    def canonical_base_weight(self) -> np.ndarray:
        return self.primitives.to_numpy(self.base_weight()).T  # the kernel is (in, out)

    def init_normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """The layer's own RNG stream, for the orthogonal init."""
        return np.asarray(jax.random.normal(self.rngs.params(), shape), dtype=np.float64)

    def delta_weight(self, adapter_name: str) -> Any:
        a, b = (self.primitives.to_numpy(store[adapter_name]).astype(np.float64) for store in (self.lora_A, self.lora_B))
        return self.scaling[adapter_name] * (a @ b)

    def forward(self, x: Any) -> Any:
        result = self.base_layer(x)
        embed = isinstance(self.base_layer, nnx.Embed)
        for name in self.adapters_to_run():
            a, b = self.lora_A[name][...], self.lora_B[name][...]
            dropout = self.lora_dropout[name]
            hidden = a[x] if embed else (dropout(x) if dropout is not None else x) @ a
            result = result + (hidden @ b * self.scaling[name]).astype(result.dtype)
        return result


class BiasAdapter(AdapterLayer):
    """BitFit: each adapter keeps a full trained bias; forward adds ``trained - original``,
    exactly zero at initialisation. Merging writes it into the base ``nnx.Linear`` (given a
    bias first when it has none)."""

    adapter_tensor_names = ("bitfit_bias",)
    canonical_names = {"bitfit_bias": "bias"}
    merge_role = "bias"
    bitfit_bias: nnx.Dict

    def base_weight(self) -> Any:
        return self.base_tensor("weight")

    def new_adapter(self, adapter_name: str, op: TrainBias) -> dict[str, Any]:
        bias = self.base_tensor("bias")
        op.check_bias(tuple(bias.shape) if bias is not None else None)
        value = bias[...] if bias is not None else jnp.zeros((op.size,))
        return {"bitfit_bias": self.new_param(value)}

    def original_bias(self) -> Any:
        """The base bias as it was before any merge (None when the layer had none)."""
        if self.merged_adapters:
            return self.merge_original()
        bias = self.base_tensor("bias")
        return bias[...] if bias is not None else None

    def delta_weight(self, adapter_name: str) -> Any:
        original = self.original_bias()
        trained = self.bitfit_bias[adapter_name][...]
        return trained - original if original is not None else trained

    def forward(self, x: Any) -> Any:
        result = self.base_layer(x)
        running = self.adapters_to_run()
        if running:
            original = self.original_bias()
            change = sum(self.bitfit_bias[n][...] - (original if original is not None else 0.0) for n in running)
            result = result + jnp.asarray(change, result.dtype)
        return result

    def create_base_tensor(self, role: str) -> Any:
        size = int(self.bitfit_bias[self.adapter_names()[0]].shape[0])
        bias = nnx.Param(jnp.zeros((size,), self.base_weight().dtype), trainable=False)
        self.set_base_tensor(role, bias)
        return bias

    def set_base_tensor(self, role: str, tensor: Any) -> None:
        self.base_layer.bias = tensor
        self.base_layer.use_bias = tensor is not None


class PromptEmbedding(AdapterLayer):
    """Prompt tuning on the input ``nnx.Embed``: the running adapters' virtual tokens go in
    front of its ``(batch, seq, dim)`` output. An XPrompt-pruned prompt keeps its mask;
    residual prompt tuning passes the prompt through its MLP (one shared by all tokens,
    or one per token), which :meth:`bake` folds into a plain prompt."""

    adapter_tensor_names = ("prompt_embeddings", *RESIDUAL_TENSORS)
    other_param_names = ("prompt_masks", "residual_activation", "residual_dropout")
    prompt_embeddings: nnx.Dict
    prompt_masks: nnx.Dict
    residual_down_weight: nnx.Dict
    residual_norm_weight: nnx.Dict
    residual_activation: nnx.Dict
    residual_dropout: nnx.Dict

    def new_adapter(self, adapter_name: str, op: AddPrompt) -> dict[str, Any]:
        table = self.base_layer.embedding[...]
        op.check_table(tuple(table.shape))
        shape = (op.num_virtual_tokens, op.token_dim)
        if op.init == "random":  # the table's own scale: a unit normal would dwarf real tokens
            prompt = jax.random.normal(self.rngs.params(), shape) * (float(jnp.std(table)) or 1.0)
        else:
            ids = op.init_token_ids if op.init == "token_ids" else jax.random.randint(self.rngs.params(), (shape[0],), 0, op.num_embeddings)
            prompt = table[jnp.asarray(ids)]
        kept = op.element_mask()
        mask = jnp.asarray(kept, dtype=table.dtype) if kept is not None else None
        values: dict[str, Any] = {"prompt_embeddings": self.new_param(prompt if mask is None else prompt * mask), "prompt_masks": mask}
        for name, tensor_shape in op.residual_shapes().items():
            bound = op.residual_init_bound(name)
            start = jax.random.uniform(self.rngs.params(), tensor_shape, minval=-bound, maxval=bound) if bound else jnp.zeros(tensor_shape)
            values[name] = self.new_param(start)
        if op.residual:
            values.update(residual_activation=op.residual_activation, residual_dropout=nnx.Dropout(op.residual_dropout, rngs=self.rngs))
        return values

    def prompt(self, name: str, deterministic: Any = None) -> Any:
        """The adapter's virtual tokens ``(n, dim)``; ``deterministic`` as nnx.Dropout's."""
        prompt, mask = self.prompt_embeddings[name][...], self.prompt_masks.get(name)
        if mask is not None:
            return prompt * mask  # pruned entries stay zero and get no gradient
        if name not in self.residual_down_weight:
            return prompt
        tensor = {t: getattr(self, t)[name][...] for t in RESIDUAL_TENSORS if name in getattr(self, t)}
        per_token = {t: jnp.broadcast_to(v, (prompt.shape[0], *v.shape[1:])) for t, v in tensor.items()}
        hidden = jnp.einsum("nd,nbd->nb", prompt, per_token["residual_down_weight"]) + per_token["residual_down_bias"]
        hidden = self.residual_dropout[name](_ACTIVATIONS[self.residual_activation[name]](hidden), deterministic=deterministic)
        out = jnp.einsum("nb,ndb->nd", hidden, per_token["residual_up_weight"]) + per_token["residual_up_bias"]
        if "residual_norm_weight" in tensor:
            normed = (out - out.mean(-1, keepdims=True)) / jnp.sqrt(out.var(-1, keepdims=True) + 1e-5)
            out = normed * per_token["residual_norm_weight"] + per_token["residual_norm_bias"]
        return prompt + out

    def forward(self, ids: Any) -> Any:
        embeds = self.base_layer(ids)
        running = self.adapters_to_run()
        if not running:
            return embeds
        joined = jnp.concatenate([self.prompt(name) for name in running], axis=0).astype(embeds.dtype)
        batch = jnp.broadcast_to(joined, (embeds.shape[0], *joined.shape))
        return jnp.concatenate([batch, embeds], axis=1)

    def bake(self, adapter_name: str) -> None:
        """Store the residual MLP's output (no dropout) as the prompt and drop the MLP."""
        if adapter_name in self.residual_down_weight:
            self.primitives.write(self.prompt_embeddings[adapter_name], self.prompt(adapter_name, deterministic=True))
            for name in (*RESIDUAL_TENSORS, "residual_activation", "residual_dropout"):
                getattr(self, name).pop(adapter_name, None)

    def merge(self, adapter_names: Any) -> None:
        if any(self.has_adapter(a) for a in adapter_names):
            raise AdapterError("a prompt-tuning adapter adds virtual tokens; it has no weights to merge into the base")

    def unwrap(self, merge: bool) -> Any:
        if merge:
            self.merge(self.active_adapters)
        return self.base_layer


def _base(layers: dict, path: str) -> Any:
    target = layers.get(path)
    return target.base_layer if isinstance(target, AdapterLayerCore) else target


def build_lora(model: Any, layers: dict, op: AddLora, adapter_name: str) -> None:
    base = _base(layers, op.path)
    if not isinstance(base, (nnx.Linear, nnx.Embed)):
        raise PlanError(f"jax backend puts LoRA on nnx.Linear and nnx.Embed; {op.path!r} is {type(base).__name__}")
    wrap_layer(replace_layer, model, layers, op.path, LoraLayer).add(adapter_name, op)


def build_bitfit(model: Any, layers: dict, op: TrainBias, adapter_name: str) -> None:
    base = _base(layers, op.path)
    if not isinstance(base, nnx.Linear):
        raise PlanError(f"jax backend trains the bias of nnx.Linear layers; {op.path!r} is {type(base).__name__}")
    wrap_layer(replace_layer, model, layers, op.path, BiasAdapter).add(adapter_name, op)


def build_prompt(model: Any, layers: dict, op: AddPrompt, adapter_name: str) -> None:
    base = _base(layers, op.path)
    if not isinstance(base, nnx.Embed) or op.num_transformer_submodules != 1 or op.encoder:
        raise PlanError(f"jax backend prompts one nnx.Embed (no prompt encoder); cannot build {op.path!r}")
    wrap_layer(replace_layer, model, layers, op.path, PromptEmbedding).add(adapter_name, op)


def refuse_lora_conv(model: Any, layers: dict, op: AddLoraConv, adapter_name: str) -> None:
    """LoRA on an ``nnx.Conv`` is a limitation of this backend: refused with its reason."""
    raise PlanError(f"jax backend cannot put LoRA on {op.path!r}: {CONV_LORA_LIMITATION}")


BUILDERS: OpBuilders = {
    AddLora: build_lora, AddLoraConv: refuse_lora_conv, TrainBias: build_bitfit, AddPrompt: build_prompt,
}
