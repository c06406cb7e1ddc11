"""Build the conformance suite's toy specs as torch modules."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from peftcore.testing.toys import ToySpec

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class _Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class ToyModel(nn.Module):
    """Runs its steps in order; layers live at the (possibly dotted) paths of the spec."""

    def __init__(self, spec: ToySpec) -> None:
        super().__init__()
        self.order: list[str] = []
        for index, step in enumerate(spec.steps):
            if step.kind == "linear":
                module: nn.Module = nn.Linear(step.in_dim, step.out_dim, bias=step.bias)
            elif step.kind == "embedding":
                module = nn.Embedding(step.in_dim, step.out_dim)
            elif step.kind == "conv":
                module = nn.Conv2d(step.in_dim, step.out_dim, step.kernel, step.stride, step.padding, bias=step.bias)
            elif step.kind == "flatten":
                module = nn.Flatten()
            elif step.kind == "mean":
                module = _Mean()
            else:
                module = _ACTIVATIONS[step.kind]()
            path = step.name or f"act{index}"
            parent: nn.Module = self
            *outer, leaf = path.split(".")
            for name in outer:
                if not hasattr(parent, name):
                    parent.add_module(name, nn.Module())
                parent = getattr(parent, name)
            parent.add_module(leaf, module)
            self.order.append(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for path in self.order:
            x = self.get_submodule(path)(x)
        return x


def build_toy(spec: ToySpec, weights: Mapping[str, np.ndarray]) -> nn.Module:
    model = ToyModel(spec)
    state = {key: torch.from_numpy(np.asarray(value)) for key, value in weights.items()}
    model.load_state_dict(state, strict=True)
    return model


def toy_forward(model: Any, inputs: np.ndarray) -> np.ndarray:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.from_numpy(inputs)).detach().cpu().to(torch.float64).numpy()
    finally:
        model.train(was_training)


class TorchToyKit:
    """The conformance kit of the torch backend (``peftcore_conformance_kit``)."""

    def build(self, spec: Any, weights: Mapping[str, np.ndarray]) -> nn.Module:
        if getattr(spec, "toy_family", "") == "attention_block":
            from peftcore_torch.attention_toy import build_attention_toy

            return build_attention_toy(spec, weights)
        return build_toy(spec, weights)

    def forward(self, model: Any, inputs: np.ndarray) -> np.ndarray:
        return toy_forward(model, inputs)
