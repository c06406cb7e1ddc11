"""The conformance kit: the suite's toy specs built as NNX modules.

Layers sit at the spec's paths (``block.fc2`` is an ``nnx.Linear`` in a container
module ``block``) and are loaded from canonical numpy weights (a linear's ``(out, in)``
weight becomes the ``(in, out)`` kernel). The steps run in order in ``__call__``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftcore.testing.toys import ToySpec

_ACTIVATIONS = {"relu": nnx.relu, "tanh": jnp.tanh, "mean": lambda x: x.mean(axis=1)}


class Container(nnx.Module):
    """A module that only holds sublayers."""


class ToyModel(nnx.Module):
    """Runs the spec's steps in order, reading each layer at its path on every call."""

    def __init__(self, spec: ToySpec, weights: Mapping[str, np.ndarray]) -> None:
        rngs = nnx.Rngs(0)
        self.order = [(step.kind, step.name) for step in spec.steps]
        for step in spec.layers:
            if step.kind == "linear":
                layer: Any = nnx.Linear(step.in_dim, step.out_dim, use_bias=step.bias, rngs=rngs)
                layer.kernel.set_value(jnp.asarray(weights[f"{step.name}.weight"].T))
                if step.bias:
                    layer.bias.set_value(jnp.asarray(weights[f"{step.name}.bias"]))
            else:
                layer = nnx.Embed(step.in_dim, step.out_dim, rngs=rngs)
                layer.embedding.set_value(jnp.asarray(weights[f"{step.name}.weight"]))
            holder: Any = self
            *parents, last = step.name.split(".")
            for part in parents:
                if not hasattr(holder, part):
                    setattr(holder, part, Container())
                holder = getattr(holder, part)
            setattr(holder, last, layer)

    def layer(self, path: str) -> Any:
        node: Any = self
        for part in path.split("."):
            node = getattr(node, part)
        return node

    def __call__(self, x: Any) -> Any:
        for kind, name in self.order:
            x = self.layer(name)(x) if kind in ("linear", "embedding") else _ACTIVATIONS[kind](x)
        return x


class JaxToyKit:
    """Builds toy specs as :class:`ToyModel` and runs them in eval mode (no dropout)."""

    def build(self, spec: ToySpec, weights: Mapping[str, np.ndarray]) -> Any:
        return ToyModel(spec, weights)

    def forward(self, model: Any, inputs: np.ndarray) -> np.ndarray:
        model.eval()
        x = jnp.asarray(inputs, dtype=jnp.int32 if inputs.dtype.kind in "iu" else jnp.float32)
        return np.asarray(model(x), dtype=np.float64)
