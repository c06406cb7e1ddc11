"""Framework-neutral toy models for the conformance suite, and their numpy reference.

A :class:`ToySpec` is a sequence of named steps. Each backend builds it natively from
canonical-layout weights (``peftcore_build_toy_model``); :func:`reference_forward`
computes in numpy what that model, with given adapters, must output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from peftcore.plan import AddLora, RewritePlan


@dataclass(frozen=True)
class ToyStep:
    """One step. ``kind`` is ``linear`` (in_dim -> out_dim), ``embedding`` (vocab in_dim,
    width out_dim), ``relu``, ``tanh`` or ``mean`` (average over axis 1). ``name`` is the
    layer path (dotted for nested layers); activation steps have no parameters."""

    kind: str
    name: str = ""
    in_dim: int = 0
    out_dim: int = 0
    bias: bool = True


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
        return [s for s in self.steps if s.kind in ("linear", "embedding")]

    def weight_shapes(self) -> dict[str, tuple]:
        """Canonical shapes of every parameter, keyed ``<layer>.weight`` / ``<layer>.bias``."""
        shapes: dict[str, tuple] = {}
        for step in self.layers:
            if step.kind == "embedding":
                shapes[f"{step.name}.weight"] = (step.in_dim, step.out_dim)
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


def lora_deltas(plan: RewritePlan, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``scaling * B @ A`` per adapted layer (canonical ``(out, in)``), from exported tensors."""
    deltas: dict[str, np.ndarray] = {}
    for op in plan.ops:
        if isinstance(op, AddLora):
            a = tensors[f"{op.path}.lora_A"].astype(np.float64)
            b = tensors[f"{op.path}.lora_B"].astype(np.float64)
            deltas[op.path] = op.scaling * (b @ a)
    return deltas


def reference_forward(
    spec: ToySpec,
    weights: Mapping[str, np.ndarray],
    inputs: np.ndarray,
    deltas: Optional[Sequence[Mapping[str, np.ndarray]]] = None,
) -> np.ndarray:
    """What the toy model outputs (float64) with each LoRA delta in ``deltas`` added."""
    x = inputs if spec.input_kind == "tokens" else inputs.astype(np.float64)
    for step in spec.steps:
        if step.kind in ("linear", "embedding"):
            weight = weights[f"{step.name}.weight"].astype(np.float64)
            for layer_deltas in deltas or ():
                if step.name in layer_deltas:  # deltas are canonical (out, in); a table is (in, out)
                    delta = layer_deltas[step.name]
                    weight = weight + (delta.T if step.kind == "embedding" else delta)
            if step.kind == "embedding":
                x = weight[x]
            else:
                x = x @ weight.T
                if step.bias:
                    x = x + weights[f"{step.name}.bias"].astype(np.float64)
        elif step.kind == "relu":
            x = np.maximum(x, 0.0)
        elif step.kind == "tanh":
            x = np.tanh(x)
        elif step.kind == "mean":
            x = x.mean(axis=1)
        else:
            raise ValueError(f"unknown toy step kind {step.kind!r}")
    return np.asarray(x)
