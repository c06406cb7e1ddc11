"""The torch backend's runtime: the primitives the core's model-wide operations use."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from peftcore.graph import ModelGraph
from peftcore.runtime import BackendInfo, BackendRuntime, OpBuilders
from peftcore_torch.layers import AdapterLayer, place_tensors
from peftcore_torch.tensors import TorchTensors
from peftcore_torch.walk import replace_module, walk

NAME = "torch"
FRAMEWORK = "PyTorch"


class TorchRuntime(TorchTensors, BackendRuntime):
    """PyTorch: models are ``nn.Module``; parameters train when ``requires_grad``; tensor
    primitives from :class:`~peftcore_torch.tensors.TorchTensors`."""

    name = NAME
    framework = FRAMEWORK

    def info(self) -> BackendInfo:
        return BackendInfo(NAME, FRAMEWORK, available=True, version=torch.__version__)

    def detect(self, model: Any) -> bool:
        return isinstance(model, nn.Module)

    def describe(self, model: Any, example_inputs: Any, extra_kinds: Mapping[Any, str]) -> Optional[ModelGraph]:
        from peftcore_torch.describe import describe_model

        return describe_model(model, dict(extra_kinds))

    def peft_model_class(self) -> type:
        from peftcore_torch.peft_model import TorchPeftModel

        return TorchPeftModel

    def task_peft_model_class(self, task_type: str) -> type:
        from peftcore_torch.task_models import task_peft_model_class

        return task_peft_model_class(task_type)

    def layers(self, model: Any) -> Iterable[tuple[str, Any]]:
        return walk(model, nested=True)

    def replace_layer(self, model: Any, layers: dict, path: str, new: Any) -> None:
        replace_module(model, layers, path, new)

    def parameters(self, model: Any) -> list[Any]:
        return list(model.parameters())

    def adapter_parameters(self, layer: Any) -> list[Any]:
        base = {id(p) for p in layer.base_layer.parameters()}
        return [p for p in layer.parameters() if id(p) not in base]

    def builders(self) -> OpBuilders:
        from peftcore_torch.builders import BUILDERS

        return BUILDERS

    def gradients(self, loss: Any, tensors: Sequence[Any]) -> list[Optional[Any]]:
        wanted = [i for i, t in enumerate(tensors) if t.requires_grad]
        found = torch.autograd.grad(loss, [tensors[i] for i in wanted], allow_unused=True) if wanted else ()
        grads: list[Optional[Any]] = [None] * len(tensors)
        for index, grad in zip(wanted, found):
            grads[index] = grad
        return grads

    def base_tensor(self, model: Any, path: str, name: str) -> Any:
        module = model.get_submodule(path) if path else model
        if isinstance(module, AdapterLayer):
            module = module.base_layer
        tensor = getattr(module, name, None)
        return tensor if isinstance(tensor, nn.Parameter) else None

    def place_adapter_tensors(self, layer: Any, adapter_name: str, upcast: bool, on_meta: bool) -> None:
        for attribute in layer.tensor_names(adapter_name):
            store = layer.adapter_store(attribute)
            place_tensors(store, adapter_name, upcast, on_meta)

    def row_routing(self, adapter_names: Sequence[str]) -> Any:
        from peftcore_torch.row_routing import RowRouting

        return RowRouting(adapter_names)
