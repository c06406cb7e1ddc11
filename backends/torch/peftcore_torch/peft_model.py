"""The torch PeftModel: a ``torch.nn.Module`` laid out as Hugging Face PEFT's.

``TorchPeftModel`` holds the adapted model as ``base_model.model``, so its submodules,
and so its ``state_dict`` keys, are HF PEFT's (``base_model.model.<path>...``), and
everyday torch code treats it as a module: ``.to()``/``.eval()``/``.half()`` return it,
``deepcopy``, ``pickle`` and ``torch.save`` work, DDP and FSDP wrap it. The adapter
state machine (configs, plans, active/merged adapters, saving, loading) is the core's
:class:`peftcore.peft_model.PeftModel`. Attributes neither has come from the adapted
model, as in HF PEFT.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from peftcore.errors import AdapterError
from peftcore.graph import ModelGraph
from peftcore.model_lock import changes_model, reading
from peftcore.peft_model import PeftModel, deprecated_graph_alias
from peftcore_torch import output_head, training_prep
from peftcore_torch.call_cache import caching_call
from peftcore_torch.layers import AdapterLayer
from peftcore_torch.row_routing import refuse_when_compiling
from peftcore_torch.tracing import compiling
from peftcore_torch.trainer_integration import enable_if_transformers_loaded

#: HF PEFT's tuner-model (``LoraModel``) API that ``base_model`` passes to its PeftModel.
TUNER_API = frozenset({
    "peft_config", "active_adapters", "set_adapter", "merge_adapter", "unmerge_adapter",
    "merge_and_unload", "unload", "delete_adapter", "add_weighted_adapter", "enable_adapter_layers",
    "disable_adapter_layers",
})


class TunerModel(nn.Module):
    """``base_model`` of a :class:`TorchPeftModel` (HF PEFT's ``LoraModel`` place): it
    holds the adapted model as ``model``, answers HF's tuner-model API (``set_adapter``,
    ``peft_config``, ``prefix``...) from its PeftModel, and passes other attributes to
    the adapted model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def attach(self, peft_model: TorchPeftModel) -> None:
        # a plain attribute, not a child module: the PeftModel owns this module
        object.__setattr__(self, "_peft_model", peft_model)

    @property
    def prefix(self) -> str:
        """The name part every adapter tensor of the active method has (``"lora_"``), as
        HF PEFT's tuner models give it; methods without one raise ``AttributeError``."""
        peft_model = self.__dict__.get("_peft_model")
        config = peft_model.active_peft_config if peft_model is not None and peft_model.peft_config else None
        prefix = getattr(config, "tensor_prefix", "")
        if not prefix:
            raise AttributeError(f"{type(config).__name__} adapters have no tensor name prefix")
        return str(prefix)

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        """The active adapter's name, or the list of names when several are active (HF
        PEFT's tuner-model attribute; the PeftModel's ``active_adapter`` is always one name)."""
        peft_model = self.__dict__.get("_peft_model")
        if peft_model is None:
            raise AttributeError("active_adapter: this module belongs to no PeftModel")
        names = list(peft_model.active_adapters)
        return names[0] if len(names) == 1 else names

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def prompt_encoder(self) -> nn.ModuleDict:
        """HF PEFT's ``prompt_encoder``: for each prompt-learning adapter, its trained
        tensors (the prompt table, a prefix table, an encoder's weights). A view: the
        tensors live in the adapted layers, so this holds the same parameter objects."""
        views = nn.ModuleDict()
        for adapter, config in self.peft_config.items():
            if not config.is_prompt_learning:
                continue
            mine = {
                name: parameter for name, parameter in self.named_parameters()
                if "modules_to_save" not in name and (name.endswith(f".{adapter}") or f".{adapter}." in name)
            }
            views[adapter] = nn.ParameterDict({name.replace(".", "__"): p for name, p in mine.items()})
        if not len(views):
            raise AttributeError("prompt_encoder: this model has no prompt-learning adapter")
        return views

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not set yet (during unpickling)
                raise
            peft_model = self.__dict__.get("_peft_model")
            if name in TUNER_API and peft_model is not None:
                return getattr(peft_model, name)
            return getattr(self.model, name)


class _BoundForward:
    """``TorchPeftModel.forward`` as seen on an instance: calls it, and shows the adapted
    model's ``forward`` signature to ``inspect.signature`` (``transformers.Trainer`` keeps
    the batch columns that signature names)."""

    __slots__ = ("peft_model",)

    def __init__(self, peft_model: TorchPeftModel) -> None:
        self.peft_model = peft_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if compiling():
            # torch.compile traces this call into a graph: a lock cannot be taken inside one (a
            # compiled model serves without the model lock) and rows cannot be routed per call
            if kwargs.pop("adapter_names", None) is not None:
                refuse_when_compiling()
            return self.peft_model.run_base_model(*args, **kwargs)
        return self.peft_model.peft_forward(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        base = inspect.signature(self.peft_model.get_base_model().forward)
        parameters = list(base.parameters.values())
        if "adapter_names" not in base.parameters:
            extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
            keyword_at = next(
                (i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters)
            )
            parameters.insert(keyword_at, extra)
        return base.replace(parameters=parameters)

    @property
    def __name__(self) -> str:
        return "forward"


class _ForwardDescriptor:
    def __get__(self, instance: Optional[TorchPeftModel], owner: type[TorchPeftModel]) -> Any:
        if instance is None:
            return owner.peft_forward
        # kept on the instance, so later lookups skip this method: under torch.compile each
        # call through it was a frame of its own, with its own guard check per model call
        bound = instance.__dict__["forward"] = _BoundForward(instance)
        return bound


class TorchPeftModel(PeftModel, nn.Module):
    """A torch model with adapters (see the module docstring)."""

    forward = _ForwardDescriptor()

    def __init__(self, model: nn.Module, backend_name: str, graph: ModelGraph) -> None:
        nn.Module.__init__(self)
        self.base_model = TunerModel(model)
        self.base_model.attach(self)
        self.init_peft_state(backend_name, graph)
        # the adapted model's weights are frozen: keep its output layer's product one matmul
        self._output_head_hook = output_head.fold_sliced_inputs(model)
        # let transformers.Trainer save and resume it as an adapter (see trainer_integration)
        enable_if_transformers_loaded()
        if training_prep.checkpointing_on(model):
            self.prepare_model_for_gradient_checkpointing(model)

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """HF PEFT's: make ``model``'s input embeddings' output require gradients unless it
        is quantised (see :mod:`peftcore_torch.training_prep`); returns the model."""
        return training_prep.prepare_model_for_gradient_checkpointing(model)

    def get_base_model(self) -> nn.Module:
        """The adapted model (HF PEFT's ``get_base_model()``)."""
        return self.base_model.model

    def generate(self, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any) -> Any:
        """The adapted model's ``generate``; with ``adapter_names`` (one per input row,
        ``"__base__"`` for none, as in HF PEFT) each row is decoded through its own
        adapter. Beams and ``num_return_sequences`` repeat each row's adapter for its
        copies; an encoder-decoder model takes ``adapter_names`` only without them."""
        model: Any = self.get_base_model()
        if adapter_names is None:
            # as a forward does: see the adapters before or after a change, never during; the
            # layers prepare their operands at the first step and reuse them at the next ones
            with reading(self), caching_call(self):
                return model.generate(*args, **kwargs)
        first_input = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        generation_config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        num_beams = int(kwargs.get("num_beams") or getattr(generation_config, "num_beams", 1) or 1)
        copies = int(kwargs.get("num_return_sequences") or getattr(generation_config, "num_return_sequences", 1) or 1)
        repeat = num_beams if num_beams > 1 else copies
        if repeat > 1 and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise AdapterError(
                "generate(adapter_names=...) on an encoder-decoder model does not support num_beams or "
                "num_return_sequences > 1 yet"
            )
        with caching_call(self):
            return self.run_mixed_batch(model.generate, adapter_names, first_input, args, kwargs, repeat=repeat)

    def _unload(self, merge: bool) -> Any:
        """The core's unload, and the output layer's hook removed: the model goes back plain."""
        model = super()._unload(merge)
        handle = self.__dict__.pop("_output_head_hook", None)
        if handle is not None:
            handle.remove()
        return model

    @changes_model
    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """torch's one path for ``.to()``/``.half()``/``.cuda()``...: it rewrites every
        weight, so it waits for running forwards and holds later ones back."""
        return nn.Module._apply(self, fn, *args, **kwargs)

    @changes_model
    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """torch's ``load_state_dict``, as one change of the weights under the model's lock."""
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)

    def _set_base_weights(self, weights: Any) -> None:
        """Copy full weight matrices (path -> numpy) into the base layers at those paths
        (an adapter layer's ``base_layer``), keeping dtype and device."""
        model = self.get_base_model()
        with torch.no_grad():
            for path, array in weights.items():
                layer = model.get_submodule(path)
                target: Any = getattr(layer, "base_layer", layer).weight
                target.copy_(torch.as_tensor(np.asarray(array)).to(dtype=target.dtype, device=target.device))

    def _embedding_layers(self) -> Optional[dict[str, bool]]:
        """The paths of the model's input and output embedding layers (transformers'
        ``get_input_embeddings``/``get_output_embeddings``), each with whether an adapter
        layer wraps it; None for a model without ``get_input_embeddings``."""
        model = self.get_base_model()
        get_input = getattr(model, "get_input_embeddings", None)
        if not callable(get_input):
            return None
        getters = [get_input, getattr(model, "get_output_embeddings", lambda: None)]
        wanted = [layer for layer in (get() for get in getters) if isinstance(layer, nn.Module)]
        found: dict[str, bool] = {}
        for path, module in model.named_modules():
            if any(module is layer for layer in wanted) and path not in found:
                found[path] = isinstance(module, AdapterLayer)
        return found

    def _base_weights(self, paths: list[str]) -> dict[str, np.ndarray]:
        """The base weight matrix of the layers at ``paths`` (an adapter layer's
        ``base_layer``), as numpy."""
        model = self.get_base_model()
        weights = {}
        for path in paths:
            layer = model.get_submodule(path)
            weight: Any = getattr(layer, "base_layer", layer).weight
            weights[path] = self.runtime.to_numpy(weight)
        return weights

    def _keep_mask(self, shape: tuple[int, ...], density: float) -> Any:
        """DARE's keep-mask on torch's RNG, drawn as HF PEFT draws it (one ``bernoulli``
        per tensor, in model order), so ``torch.manual_seed`` gives HF's masks."""
        return torch.bernoulli(torch.full(shape, float(density))).numpy()

    def _from_numpy(self, array: Any) -> torch.Tensor:
        """A canonical numpy tensor as a torch tensor (``get_peft_model_state_dict``)."""
        return torch.from_numpy(np.array(array, copy=True))

    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name == "base_model":  # not set yet (during unpickling)
                raise
            try:
                return getattr(self.base_model, name)
            except AttributeError:
                if name == "graph":  # the old name, where the model has no graph of its own
                    return deprecated_graph_alias(self)
                raise

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend_name!r}, adapters={list(self.peft_config)})\n" + repr(
            self.base_model.model
        )
