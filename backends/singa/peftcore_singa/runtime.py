"""The SINGA backend's runtime: the primitives the core's model-wide operations use.

Every change to what a training step computes reaches :meth:`SingaRuntime.model_changed`,
which drops a graph that a SINGA ``Model`` recorded in graph mode, so the next
``train_one_batch`` records the new computation instead of replaying the old one.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

from peftcore_singa.compat import apply_shims

apply_shims()

from singa import autograd, layer, model  # noqa: E402

from peftcore.graph import ModelGraph  # noqa: E402
from peftcore.runtime import BackendInfo, BackendRuntime, OpBuilders  # noqa: E402
from peftcore_singa.layers import AdapterLayer  # noqa: E402
from peftcore_singa.limitations import LIMITATIONS  # noqa: E402
from peftcore_singa.tensors import SingaTensors, to_numpy  # noqa: E402
from peftcore_singa.walk import replace_layer, walk  # noqa: E402

NAME = "singa"
FRAMEWORK = "Apache SINGA"


class SingaRuntime(SingaTensors, BackendRuntime):
    """Apache SINGA: models are ``singa.model.Model`` (or ``layer.Layer``); a tensor trains
    when it ``stores_grad`` (what SINGA optimizers update)."""

    name = NAME
    framework = FRAMEWORK

    def __init__(self, version: str) -> None:
        self.version = version

    def info(self) -> BackendInfo:
        return BackendInfo(NAME, FRAMEWORK, available=True, version=self.version, limitations=dict(LIMITATIONS))

    def detect(self, model_: Any) -> bool:
        return isinstance(model_, (model.Model, layer.Layer))

    def describe(self, model_: Any, example_inputs: Any, extra_kinds: Mapping[Any, str]) -> Optional[ModelGraph]:
        from peftcore_singa.describe import describe_model

        return describe_model(model_, example_inputs, dict(extra_kinds))

    def peft_model_class(self) -> type:
        from peftcore_singa.peft_model import singa_peft_model_class

        return singa_peft_model_class()

    def layers(self, model_: Any) -> Iterable[tuple[str, Any]]:
        return walk(model_)

    def replace_layer(self, model_: Any, layers: dict, path: str, new: Any) -> None:
        replace_layer(model_, layers, path, new)

    def parameters(self, model_: Any) -> list[Any]:
        return all_params(model_)

    def adapter_parameters(self, node: Any) -> list[Any]:
        return list(node.adapter_tensors())

    def base_tensor(self, model_: Any, path: str, name: str) -> Any:
        from peftcore_singa.describe import native_params

        node = dict(walk(model_)).get(path) if path else model_
        if isinstance(node, AdapterLayer):
            node = node.base_layer
        view = native_params(node).get(name) if node is not None else None
        return view.tensor if view is not None else None

    def builders(self) -> OpBuilders:
        from peftcore_singa.builders import BUILDERS

        return BUILDERS

    def gradients(self, loss: Any, tensors: Sequence[Any]) -> list[Optional[Any]]:
        """Runs SINGA's backward without any optimizer step."""
        wanted = {id(t): i for i, t in enumerate(tensors)}
        grads: list[Optional[Any]] = [None] * len(tensors)
        for param, grad in autograd.backward(loss):
            index = wanted.get(id(param))
            if index is not None:
                grads[index] = to_numpy(grad)
        return grads

    def model_changed(self, model_: Any) -> None:
        invalidate_graph(model_)


def all_params(model: Any) -> list[Any]:
    """Every parameter tensor of the model, once each: ``get_params()`` of the model and
    of every initialised layer (a container that never ran its own forward is skipped by
    SINGA's ``get_params``, its sublayers are not skipped here)."""
    found: dict[int, Any] = {}
    sources = [model] + [node for _, node in walk(model)]
    for node in sources:
        if node is model or node._initialized:
            for t in node.get_params().values():
                found.setdefault(id(t), t)
    return list(found.values())


def invalidate_graph(model: Any) -> None:
    """Drop the graph a SINGA ``Model`` recorded in graph mode (``use_graph=True``), so
    the next ``train_one_batch`` re-records it with the model as it is now."""
    if not model.__dict__.get("_buffered", False):
        return
    model._buffered = False
    model._results = None
    seen: set[int] = set()
    for t in all_params(model):
        dev = t.device
        if dev.id() not in seen:
            seen.add(dev.id())
            dev.ResetGraph()
