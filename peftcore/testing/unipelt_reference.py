"""A framework-neutral one-block attention toy and the numpy reference of UniPELT on it.

The toy is a transformer block with single-head attention (``layers.0.attn.{q,k,v,o}``)
and a ReLU feed-forward block (``layers.0.ffn.{fc1,fc2}``), both residual::

    h   = x + o(softmax(q(x) k(x)^T / sqrt(d) + mask) v(x))
    out = h + fc2(relu(fc1(h)))

Each backend builds it natively (its conformance kit's ``build`` with an
:class:`AttentionToySpec`) with attention that accepts prefixes.
:func:`unipelt_reference` computes from exported adapter tensors what the adapted toy
must output, and the gate values it must record, so the shared suite checks a backend
against the paper's equations rather than against itself:

- LoRA on a linear ``W``: ``W x + g_L(x) * B A x`` (``scaling`` when ungated);
- prefix: keys ``[g_P(x) P_K; K]`` and values ``[g_P(x) P_V; V]``, the prefix visible
  to every query, real keys masked as before;
- adapter after ``fc2``: ``y + g_A(y) * up(act(down(y)))``;

with ``g(z) = mean over positions of sigmoid(w . z + b)``, one value per example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional

import numpy as np

from peftcore.methods.lora import AddLora
from peftcore.methods.prefix_tuning import ENCODER_CHILD, AddPrefixEncoder
from peftcore.methods.unipelt_ops import AddBottleneckAdapter, AddGate, AddPrefix
from peftcore.plan import RewritePlan

BLOCK = "layers.0"
LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.fc1", "ffn.fc2")


@dataclass(frozen=True)
class AttentionToySpec:
    """A one-block attention toy: width ``dim``, feed-forward width ``ffn_dim``, causal or
    not, run on float inputs of shape ``(batch, seq_len, dim)``."""

    toy_family: ClassVar[str] = "attention_block"

    name: str
    dim: int = 8
    ffn_dim: int = 12
    causal: bool = False
    batch: int = 3
    seq_len: int = 5

    @property
    def input_shape(self) -> tuple:
        return (self.batch, self.seq_len, self.dim)

    def linear_shapes(self) -> dict[str, tuple]:
        """``(out, in)`` of every linear layer, by path."""
        d, f = self.dim, self.ffn_dim
        dims = {"attn.q": (d, d), "attn.k": (d, d), "attn.v": (d, d), "attn.o": (d, d), "ffn.fc1": (f, d), "ffn.fc2": (d, f)}
        return {f"{BLOCK}.{rel}": dims[rel] for rel in LINEARS}

    def weight_shapes(self) -> dict[str, tuple]:
        shapes: dict[str, tuple] = {}
        for path, (out_dim, in_dim) in self.linear_shapes().items():
            shapes[f"{path}.weight"] = (out_dim, in_dim)
            shapes[f"{path}.bias"] = (out_dim,)
        return shapes

    def random_weights(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in self.weight_shapes().items()}

    def random_inputs(self, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(self.input_shape).astype(np.float32)

    @staticmethod
    def unipelt_layout() -> dict[str, Any]:
        """The ``UniPELTConfig`` fields that place UniPELT in this toy's block."""
        return {"attention_module": "attn", "lora_modules": ["attn.q", "attn.v"], "key_module": "attn.k", "ffn_output_module": "ffn.fc2"}


ATTENTION_TOYS = (AttentionToySpec("encoder_block"), AttentionToySpec("causal_block", causal=True))

_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda z: np.maximum(z, 0.0),
    "tanh": np.tanh,
    "gelu": lambda z: 0.5 * z * (1.0 + np.vectorize(math.erf)(z / np.sqrt(2.0))),
    "silu": lambda z: z / (1.0 + np.exp(-z)),
}


def gate(weight: np.ndarray, bias: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``(batch,)`` gate values: sigmoid of ``z @ weight.T + bias`` averaged over positions."""
    per_position = 1.0 / (1.0 + np.exp(-(z @ weight.T.astype(np.float64) + bias.astype(np.float64))))
    return per_position[..., 0].reshape(z.shape[0], -1).mean(axis=1)


def unipelt_reference(
    spec: AttentionToySpec,
    weights: Mapping[str, np.ndarray],
    inputs: np.ndarray,
    plan: Optional[RewritePlan] = None,
    tensors: Optional[Mapping[str, np.ndarray]] = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The toy's output (float64) with the plan's UniPELT ops, and the gate values
    (keyed ``<op path>.<gate stem>`` as ``gate_values`` reports them)."""
    ops = list(plan.ops) if plan is not None else []
    tensors = tensors or {}
    gates: dict[str, np.ndarray] = {}
    gate_ops = {(op.path, op.target): op for op in ops if isinstance(op, AddGate)}

    def gate_for(path: str, target: str, z: np.ndarray) -> Optional[np.ndarray]:
        op = gate_ops.get((path, target))
        if op is None:
            return None
        value = gate(tensors[f"{path}.{op.stem}.weight"], tensors[f"{path}.{op.stem}.bias"], z)
        gates[f"{path}.{op.stem}"] = value
        return value

    def linear(rel: str, z: np.ndarray) -> np.ndarray:
        path = f"{BLOCK}.{rel}"
        out = z @ weights[f"{path}.weight"].astype(np.float64).T + weights[f"{path}.bias"].astype(np.float64)
        for op in ops:
            if isinstance(op, AddLora) and op.path == path:
                a, b = tensors[f"{path}.lora_A"].astype(np.float64), tensors[f"{path}.lora_B"].astype(np.float64)
                update = z @ a.T @ b.T
                g = gate_for(path, "lora", z)
                out = out + (update * g[:, None, None] if g is not None else update * op.scaling)
            if isinstance(op, AddBottleneckAdapter) and op.path == path:
                name = f"{path}.adapter"
                hidden = _ACTIVATIONS[op.activation](out @ tensors[f"{name}.down.weight"].T + tensors[f"{name}.down.bias"])
                update = hidden @ tensors[f"{name}.up.weight"].T + tensors[f"{name}.up.bias"]
                g = gate_for(path, "adapter", out)
                out = out + (update * g[:, None, None] if g is not None else update)
        return out

    x = inputs.astype(np.float64)
    q, k, v = linear("attn.q", x), linear("attn.k", x), linear("attn.v", x)
    seq = x.shape[1]
    visible = np.tril(np.ones((seq, seq), dtype=bool)) if spec.causal else np.ones((seq, seq), dtype=bool)
    attention = f"{BLOCK}.attn"
    for op in ops:
        if isinstance(op, AddPrefix) and op.path == attention:
            g = gate_for(attention, "prefix", x)
            scale = g[:, None, None] if g is not None else np.ones((x.shape[0], 1, 1))
            prefix_k = scale * tensors[f"{attention}.prefix.keys"].astype(np.float64)[None]
            prefix_v = scale * tensors[f"{attention}.prefix.values"].astype(np.float64)[None]
            k, v = np.concatenate([prefix_k, k], axis=1), np.concatenate([prefix_v, v], axis=1)
            visible = np.concatenate([np.ones((seq, op.num_virtual_tokens), dtype=bool), visible], axis=1)
        if isinstance(op, AddPrefixEncoder) and attention in op.attention_paths:
            # prefix tuning: layer l's keys and values are columns [2ld, (2l+2)d) of one table
            table = prefix_table(op, {k[len(op.path) + len(ENCODER_CHILD) + 2 :]: v for k, v in tensors.items()
                                      if k.startswith(f"{op.path}.{ENCODER_CHILD}.")})
            start = 2 * op.attention_paths.index(attention) * op.width
            prefix_k = np.broadcast_to(table[None, :, start : start + op.width], (x.shape[0], op.num_virtual_tokens, op.width))
            prefix_v = np.broadcast_to(table[None, :, start + op.width : start + 2 * op.width], prefix_k.shape)
            k, v = np.concatenate([prefix_k, k], axis=1), np.concatenate([prefix_v, v], axis=1)
            visible = np.concatenate([np.ones((seq, op.num_virtual_tokens), dtype=bool), visible], axis=1)
    scores = q @ np.swapaxes(k, 1, 2) / np.sqrt(spec.dim)
    scores = np.where(visible[None], scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probabilities = scores / scores.sum(axis=-1, keepdims=True)
    h = x + linear("attn.o", probabilities @ v)
    out = h + linear("ffn.fc2", np.maximum(linear("ffn.fc1", h), 0.0))
    return out, gates


def prefix_table(op: AddPrefixEncoder, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """Prefix tuning's table ``(num_virtual_tokens, num_layers * 2 * width)``: stored, or
    HF's MLP (``Linear -> tanh -> Linear``) over the trained vectors."""
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    if not op.projection_hidden:
        return t["prompt_embeddings"]
    hidden = np.tanh(t["embedding.weight"] @ t["transform.0.weight"].T + t["transform.0.bias"])
    return hidden @ t["transform.2.weight"].T + t["transform.2.bias"]
