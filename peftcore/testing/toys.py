"""Framework-neutral toy models for the conformance suite, and their numpy reference.

A :class:`ToySpec` is a sequence of named steps. Each backend builds it natively from
canonical-layout weights (its conformance kit's ``build``); :func:`reference_forward`
computes in numpy what that model, with given adapters, must output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from peftcore.methods.bitfit import TrainBias
from peftcore.methods.lora import AddLora, TrainBaseBias
from peftcore.methods.prompt_tuning import AddPrompt
from peftcore.plan import RewritePlan


@dataclass(frozen=True)
class ToyStep:
    """One step. ``kind`` is ``linear`` (in_dim -> out_dim), ``embedding`` (vocab in_dim,
    width out_dim), ``conv`` (a 2-D convolution, in_dim -> out_dim channels, square
    ``kernel``, ``stride``, zero ``padding``), ``relu``, ``tanh``, ``mean`` (average over
    axis 1) or ``flatten`` (all but the first axis into one). ``name`` is the layer path
    (dotted for nested layers); the other steps have no parameters."""

    kind: str
    name: str = ""
    in_dim: int = 0
    out_dim: int = 0
    bias: bool = True
    kernel: int = 0
    stride: int = 1
    padding: int = 0


@dataclass(frozen=True)
class ToySpec:
    """A toy model: its steps and the shape of one input batch (``tokens``: int ids)."""

    name: str
    steps: tuple
    input_shape: tuple
    input_kind: str = "float"
    vocab: int = 0

    @property
    def layers(self) -> list[ToyStep]:
        return [s for s in self.steps if s.kind in ("linear", "embedding", "conv")]

    def weight_shapes(self) -> dict[str, tuple]:
        """Canonical shapes of every parameter, keyed ``<layer>.weight`` / ``<layer>.bias``."""
        shapes: dict[str, tuple] = {}
        for step in self.layers:
            if step.kind == "embedding":
                shapes[f"{step.name}.weight"] = (step.in_dim, step.out_dim)
            elif step.kind == "conv":
                shapes[f"{step.name}.weight"] = (step.out_dim, step.in_dim, step.kernel, step.kernel)
                if step.bias:
                    shapes[f"{step.name}.bias"] = (step.out_dim,)
            else:
                shapes[f"{step.name}.weight"] = (step.out_dim, step.in_dim)
                if step.bias:
                    shapes[f"{step.name}.bias"] = (step.out_dim,)
        return shapes

    def random_weights(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in self.weight_shapes().items()}

    def random_inputs(self, rng: np.random.Generator) -> np.ndarray:
        if self.input_kind == "tokens":
            return rng.integers(0, self.vocab, size=self.input_shape).astype(np.int64)
        return rng.standard_normal(self.input_shape).astype(np.float32)


MLP = ToySpec(
    name="mlp",
    steps=(
        ToyStep("linear", "fc1", 12, 16),
        ToyStep("relu"),
        ToyStep("linear", "block.fc2", 16, 16, bias=False),
        ToyStep("tanh"),
        ToyStep("linear", "head", 16, 5),
    ),
    input_shape=(7, 12),
)

TOKEN_MODEL = ToySpec(
    name="tokens",
    steps=(
        ToyStep("embedding", "embed", 30, 8),
        ToyStep("linear", "proj", 8, 12),
        ToyStep("relu"),
        ToyStep("mean"),
        ToyStep("linear", "head", 12, 3),
    ),
    input_shape=(4, 6),
    input_kind="tokens",
    vocab=30,
)

TOY_SPECS = (MLP, TOKEN_MODEL)

#: A small CNN for LoRA on convolutions (its own suite, :mod:`peftcore.testing.suite_conv`):
#: 8x8 images, a padded conv, a strided one, then a linear head on the flattened maps.
CNN = ToySpec(
    name="cnn",
    steps=(
        ToyStep("conv", "conv1", 2, 4, kernel=3, padding=1),
        ToyStep("relu"),
        ToyStep("conv", "block.conv2", 4, 6, kernel=3, stride=2, padding=1),
        ToyStep("relu"),
        ToyStep("flatten"),
        ToyStep("linear", "head", 6 * 4 * 4, 5),
    ),
    input_shape=(3, 2, 8, 8),
)


def lora_deltas(
    plan: RewritePlan, tensors: Mapping[str, np.ndarray], weights: Optional[Mapping[str, np.ndarray]] = None
) -> dict[str, np.ndarray]:
    """Each LoRA op's change to its layer's weight (:meth:`AddLora.delta`, canonical
    layout: ``(out, in)``, an embedding's ``(num_embeddings, dim)``), in float64, from
    exported tensors. A DoRA op's change needs the base weights (``weights``, keyed
    ``<layer>.weight``)."""
    deltas: dict[str, np.ndarray] = {}
    for op in plan.ops:
        if isinstance(op, AddLora):
            own = {name: tensors[f"{op.path}.{name}"].astype(np.float64) for name in op.tensor_specs()}
            base = weights.get(f"{op.path}.weight") if weights is not None else None
            change = op.delta(own, None if base is None else base.astype(np.float64))
            if change is None:
                raise ValueError(f"the reference of DoRA layer {op.path!r} needs its base weight")
            deltas[op.path] = change
    return deltas


@dataclass(frozen=True)
class AdapterEffects:
    """What one adapter does to a toy model, computed in numpy from its exported tensors.

    ``deltas``: LoRA weight changes (canonical layout, see :func:`lora_deltas`); ``biases``: BitFit's
    trained bias per layer (the full value); ``prompts``: virtual tokens put in front of
    an embedding layer's output, ``(n, dim)``.
    """

    deltas: Mapping[str, np.ndarray] = field(default_factory=dict)
    biases: Mapping[str, np.ndarray] = field(default_factory=dict)
    prompts: Mapping[str, np.ndarray] = field(default_factory=dict)


def adapter_effects(
    plan: RewritePlan, tensors: Mapping[str, np.ndarray], weights: Optional[Mapping[str, np.ndarray]] = None
) -> AdapterEffects:
    """The reference meaning of every op of ``plan`` that the toy models can show
    (``weights``: the base model's, which DoRA's change depends on)."""
    biases: dict[str, np.ndarray] = {}
    prompts: dict[str, np.ndarray] = {}
    for op in plan.ops:
        if isinstance(op, (TrainBias, TrainBaseBias)):  # BitFit's copy, or LoRA's bias trained in place
            biases[op.path] = tensors[f"{op.path}.bias"].astype(np.float64)
        elif isinstance(op, AddPrompt):
            prompts[op.path] = prompt_reference(op, {k[len(op.path) + 1 :]: v for k, v in tensors.items() if k.startswith(op.path + ".")})
    return AdapterEffects(deltas=lora_deltas(plan, tensors, weights), biases=biases, prompts=prompts)


def prompt_reference(op: AddPrompt, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """The virtual tokens of a prompt op: the prompt, through its residual MLP if it has one
    (eval mode: no dropout)."""
    if op.encoder:  # P-tuning: the encoder's output, its first num_virtual_tokens rows
        return prompt_encoder_reference(op, tensors)[: op.num_virtual_tokens]
    prompt = tensors["prompt_embeddings"].astype(np.float64)
    mask = op.element_mask()
    if mask is not None:
        prompt = prompt * np.asarray(mask)
    if not op.residual:
        return prompt
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    hidden = np.einsum("nd,nbd->nb", prompt, np.broadcast_to(t["residual_down_weight"], (len(prompt),) + t["residual_down_weight"].shape[1:]))
    hidden = _activation(op.residual_activation, hidden + t["residual_down_bias"])
    out = np.einsum("nb,ndb->nd", hidden, np.broadcast_to(t["residual_up_weight"], (len(prompt),) + t["residual_up_weight"].shape[1:]))
    out = out + t["residual_up_bias"]
    if op.residual_layer_norm:
        mean = out.mean(axis=-1, keepdims=True)
        var = out.var(axis=-1, keepdims=True)
        out = (out - mean) / np.sqrt(var + 1e-5) * t["residual_norm_weight"] + t["residual_norm_bias"]
    return prompt + out


def prompt_encoder_reference(op: AddPrompt, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """P-tuning's encoder (HF PEFT's modules, eval mode) over its trained input vectors."""
    t = {k[len("encoder.") :]: v.astype(np.float64) for k, v in tensors.items() if k.startswith("encoder.")}

    def linear(name: str, x: np.ndarray) -> np.ndarray:
        return x @ t[f"{name}.weight"].T + t[f"{name}.bias"]

    x = t["embedding.weight"]
    if op.encoder == "lstm":
        for layer in range(op.encoder_num_layers):
            outputs = []
            for suffix, order in (("", range(len(x))), ("_reverse", range(len(x) - 1, -1, -1))):
                w_ih, w_hh = t[f"lstm_head.weight_ih_l{layer}{suffix}"], t[f"lstm_head.weight_hh_l{layer}{suffix}"]
                bias = t[f"lstm_head.bias_ih_l{layer}{suffix}"] + t[f"lstm_head.bias_hh_l{layer}{suffix}"]
                h = np.zeros(w_hh.shape[1])
                c = np.zeros(w_hh.shape[1])
                out = np.zeros((len(x), w_hh.shape[1]))
                for step in order:  # torch's gate order: input, forget, cell, output
                    i, f, g, o = np.split(w_ih @ x[step] + w_hh @ h + bias, 4)
                    c = _activation("sigmoid", f) * c + _activation("sigmoid", i) * np.tanh(g)
                    h = _activation("sigmoid", o) * np.tanh(c)
                    out[step] = h
                outputs.append(out)
            x = np.concatenate(outputs, axis=-1)
        return linear("mlp_head.2", np.maximum(linear("mlp_head.0", x), 0.0))
    hidden = np.maximum(linear("mlp_head.2", np.maximum(linear("mlp_head.0", x), 0.0)), 0.0)
    return linear("mlp_head.4", hidden)


def _activation(name: str, x: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if name == "gelu":  # the exact (erf) form, as torch's default
        from math import erf

        return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))
    return x


def reference_forward(
    spec: ToySpec,
    weights: Mapping[str, np.ndarray],
    inputs: np.ndarray,
    deltas: Optional[Sequence[Mapping[str, np.ndarray]]] = None,
    effects: Optional[Sequence[AdapterEffects]] = None,
) -> np.ndarray:
    """What the toy model outputs (float64) with the given adapters active.

    ``deltas`` are bare LoRA weight changes; ``effects`` are whole adapters (see
    :func:`adapter_effects`), applied together as a backend runs several active ones.
    """
    all_effects = [AdapterEffects(deltas=d) for d in deltas or ()] + list(effects or ())
    x = inputs if spec.input_kind == "tokens" else inputs.astype(np.float64)
    for step in spec.steps:
        if step.kind in ("linear", "embedding", "conv"):
            weight = weights[f"{step.name}.weight"].astype(np.float64)
            for effect in all_effects:
                if step.name in effect.deltas:  # canonical weight layout, as the weight
                    weight = weight + effect.deltas[step.name]
            if step.kind == "embedding":
                x = weight[x]
                prompts = [e.prompts[step.name] for e in all_effects if step.name in e.prompts]
                if prompts:
                    prefix = np.concatenate(prompts, axis=0)
                    x = np.concatenate([np.broadcast_to(prefix, (x.shape[0],) + prefix.shape), x], axis=1)
            elif step.kind == "conv":
                x = conv2d_reference(x, weight, step.stride, step.padding)
            else:
                x = x @ weight.T
            bias = _bias(step, weights, all_effects)
            x = x + (np.reshape(bias, (-1, 1, 1)) if step.kind == "conv" and np.ndim(bias) else bias)
        elif step.kind == "relu":
            x = np.maximum(x, 0.0)
        elif step.kind == "tanh":
            x = np.tanh(x)
        elif step.kind == "mean":
            x = x.mean(axis=1)
        elif step.kind == "flatten":
            x = x.reshape(x.shape[0], -1)
        else:
            raise ValueError(f"unknown toy step kind {step.kind!r}")
    return np.asarray(x)


def conv2d_reference(x: np.ndarray, weight: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """A 2-D convolution (cross-correlation, as torch's) of ``x`` ``(N, C, H, W)`` with
    ``weight`` ``(out, C, k, k)``, zero padding on every side."""
    kernel = weight.shape[-1]
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_h = (padded.shape[2] - kernel) // stride + 1
    out_w = (padded.shape[3] - kernel) // stride + 1
    out = np.zeros((x.shape[0], weight.shape[0], out_h, out_w))
    for i in range(kernel):
        for j in range(kernel):
            window = padded[:, :, i : i + stride * out_h : stride, j : j + stride * out_w : stride]
            out += np.einsum("nchw,oc->nohw", window, weight[:, :, i, j])
    return out


def _bias(step: ToyStep, weights: Mapping[str, np.ndarray], effects: Sequence[AdapterEffects]) -> Any:
    """The layer's bias: the base one plus each BitFit adapter's change to it."""
    has_bias = step.kind in ("linear", "conv") and step.bias
    base = weights[f"{step.name}.bias"].astype(np.float64) if has_bias else 0.0
    total = base
    for effect in effects:
        if step.name in effect.biases:
            total = total + (effect.biases[step.name] - base)
    return total
