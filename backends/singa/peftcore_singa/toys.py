"""Build the conformance suite's toy specs as ``singa.model.Model`` instances.

Layers are created at the spec's paths (``block.fc2`` is a ``Linear`` registered in a
container layer ``block``), initialised by one eval-mode forward, then loaded from the
canonical numpy weights (a Linear's ``(out, in)`` weight is transposed into SINGA's
``(in, out)`` W). Activations and the mean over axis 1 are autograd ops in
:meth:`ToyModel.forward`; a linear step on N-D activations flattens them to 2-D first,
because ``layer.Linear`` takes 2-D input only.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import autograd, layer, model  # noqa: E402

from peftcore.errors import PeftCoreError  # noqa: E402
from peftcore.testing.toys import ToySpec  # noqa: E402
from peftcore_singa.describe import eval_mode, model_device, to_tensor  # noqa: E402
from peftcore_singa.tensors import copy_into, to_numpy  # noqa: E402

_ACTIVATIONS = {
    "relu": autograd.relu,
    "tanh": autograd.tanh,
    "mean": lambda x: autograd.reduce_mean(x, axes=[1], keepdims=0),
}


class Container(layer.Layer):
    """A layer that only holds sublayers and is never called itself. It counts as
    initialised, so SINGA's ``get_params()`` (which skips uninitialised layers) and
    ``save_states()`` reach the layers inside it."""

    def __init__(self) -> None:
        super().__init__()
        self._initialized = True


class ToyModel(model.Model):
    """Runs the spec's steps in order; layers live at the (possibly dotted) step paths.

    ``train_one_batch(x, y)`` takes one MSE step with the optimizer given to
    :meth:`set_optimizer` (works eagerly and in graph mode).
    """

    def __init__(self, spec: ToySpec) -> None:
        super().__init__()
        self.graph_mode = False
        self.order: list[tuple[str, str]] = []
        for step in spec.steps:
            if step.kind in ("linear", "embedding", "conv"):
                if step.kind == "conv":
                    node = layer.Conv2d(step.out_dim, step.kernel, stride=step.stride, padding=step.padding, bias=step.bias)
                elif step.kind == "linear":
                    node = layer.Linear(step.out_dim, bias=step.bias)
                else:
                    node = layer.Embedding(step.in_dim, step.out_dim)
                parent: Any = self
                *outer, leaf = step.name.split(".")
                for name in outer:
                    if name not in parent._layers:
                        setattr(parent, name, Container())
                    parent = parent._layers[name]
                setattr(parent, leaf, node)
            elif step.kind not in _ACTIVATIONS and step.kind != "flatten":
                raise PeftCoreError(f"unknown toy step kind {step.kind!r}")
            self.order.append((step.kind, step.name))

    def layer_at(self, path: str) -> Any:
        node: Any = self
        for part in path.split("."):
            node = getattr(node, part)
        return node

    def forward(self, x: Any) -> Any:
        for kind, path in self.order:
            if kind in _ACTIVATIONS:
                x = _ACTIVATIONS[kind](x)
            elif kind == "flatten":
                x = autograd.flatten(x, 1)
            elif kind == "linear" and len(x.shape) != 2:
                lead = [int(d) for d in x.shape[:-1]]
                y = self.layer_at(path)(autograd.reshape(x, [-1, int(x.shape[-1])]))
                x = autograd.reshape(y, lead + [int(y.shape[-1])])
            else:
                x = self.layer_at(path)(x)
        return x

    def set_optimizer(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def train_one_batch(self, x: Any, y: Any) -> Any:
        out = self.forward(x)
        loss = autograd.mse_loss(out, y)
        self.optimizer(loss)
        return out, loss


def build_toy(spec: ToySpec, weights: Mapping[str, np.ndarray]) -> ToyModel:
    """The toy model with the given canonical-layout weights, initialised, in train mode."""
    toy = ToyModel(spec)
    dummy = np.zeros(spec.input_shape, dtype=np.int64 if spec.input_kind == "tokens" else np.float32)
    with eval_mode(toy):  # SINGA creates the parameters on the first forward
        toy.forward(to_tensor(dummy, model_device(toy)))
    expected = set(spec.weight_shapes())
    if set(weights) != expected:
        raise PeftCoreError(f"toy {spec.name!r} needs weights {sorted(expected)}, got {sorted(weights)}")
    for step in spec.layers:
        node = toy.layer_at(step.name)
        weight = np.asarray(weights[f"{step.name}.weight"])
        copy_into(node.W, weight.T if step.kind == "linear" else weight)
        if step.kind in ("linear", "conv") and step.bias:
            copy_into(node.b, np.asarray(weights[f"{step.name}.bias"]))
    return toy


def toy_forward(toy: Any, inputs: np.ndarray) -> np.ndarray:
    """The model's output on numpy ``inputs`` in eval mode, as float64 numpy."""
    with eval_mode(toy):
        out = toy.forward(to_tensor(inputs, model_device(toy)))
    return to_numpy(out).astype(np.float64)


class SingaToyKit:
    """The conformance kit of the SINGA backend (``peftcore_conformance_kit``)."""

    def build(self, spec: ToySpec, weights: Mapping[str, np.ndarray]) -> ToyModel:
        return build_toy(spec, weights)

    def forward(self, model: Any, inputs: np.ndarray) -> np.ndarray:
        return toy_forward(model, inputs)
