"""``modules_to_save``: a full trainable copy of a module per adapter.

In a mixed-adapter batch (``adapter_names=[...]``) each adapter's rows run through that
adapter's copy and the other rows (``"__base__"``, or an adapter without a copy here)
through the original module, as in Hugging Face PEFT: one call per adapter, never per
row, the results copied into their rows.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from peftcore.adapter_layer import AdapterTensor
from peftcore.errors import AdapterError, BackendError
from peftcore.plan import SaveModule
from peftcore_torch.layers import AdapterLayer
from peftcore_torch.row_routing import RoutesRows, RowRouting
from peftcore_torch.walk import is_conv1d


class ModulesToSaveWrapper(RoutesRows, AdapterLayer):
    """Runs the first active adapter's copy of the module, or the original when none.

    Laid out as Hugging Face PEFT's wrapper: the original is ``original_module`` and the
    copies are ``modules_to_save[<adapter>]``, so state-dict keys are HF's."""

    base_layer_attribute: ClassVar[str] = "original_module"
    single_active: ClassVar[bool] = True
    original_module: nn.Module

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    @property
    def base_layer(self) -> nn.Module:  # type: ignore[override]
        """The wrapped module (HF PEFT's ``original_module``)."""
        return self.original_module

    @property
    def _adapters(self) -> set[str]:
        """HF PEFT's set of the adapter names this wrapper holds a copy for."""
        return set(self.modules_to_save.keys())

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add(self, adapter_name: str, op: SaveModule) -> None:
        if adapter_name in self.modules_to_save:
            raise AdapterError(f"module {op.path!r} already has a copy for adapter {adapter_name!r}")
        clone = copy.deepcopy(self.base_layer)
        clone.requires_grad_(True)
        self.modules_to_save[adapter_name] = clone

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        routing = self.batch_routing
        if routing is not None and not self.disabled:
            return self._routed_forward(routing, *args, **kwargs)
        running = self.adapters_to_run()
        module = self.modules_to_save[running[0]] if running else self.base_layer
        return module(*args, **kwargs)

    # -- mixed-adapter batches --------------------------------------------------------
    def routes_rows(self) -> bool:
        """This layer's forward routes rows (a subclass with its own forward does not)."""
        return type(self).forward is ModulesToSaveWrapper.forward

    def _routed_forward(self, routing: RowRouting, *args: Any, **kwargs: Any) -> Any:
        """One call per adapter on its rows of the first argument (a batch-first tensor)."""
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise BackendError(
                f"a mixed-adapter batch needs the batch as the first argument of the saved module "
                f"({type(self.base_layer).__name__}), a tensor with one row per adapter name"
            )
        groups = routing.groups_for(self.modules_to_save, int(x.shape[0]))
        rest = routing.rows_outside(groups)
        parts: list[tuple[tuple[int, ...], nn.Module]] = [(rows, self.modules_to_save[name]) for name, rows in groups.items()]
        if rest:
            parts.append((rest, self.base_layer))
        if len(parts) == 1:  # every row runs the same module
            return parts[0][1](*args, **kwargs)
        out: Optional[torch.Tensor] = None
        for rows, module in parts:
            index = routing.index(rows, x.device)
            part = module(x.index_select(0, index), *args[1:], **kwargs)
            if not isinstance(part, torch.Tensor):
                raise BackendError(
                    f"a mixed-adapter batch needs the saved module ({type(self.base_layer).__name__}) to return a tensor"
                )
            if out is None:
                out = part.new_empty((int(x.shape[0]), *part.shape[1:]))
            out = out.index_copy(0, index, part) if torch.is_grad_enabled() else out.index_copy_(0, index, part)
        return out

    def _named(self, adapter_name: str) -> dict[str, tuple[nn.Module, str]]:
        found = {}
        for mod_name, module in self.modules_to_save[adapter_name].named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                key = f"{mod_name}.{param_name}" if mod_name else param_name
                found[key] = (module, param_name)
        return found

    def adapter_tensors_of(self, adapter_name: str) -> list[AdapterTensor]:
        """Every parameter of the adapter's copy, by its path in the module (a ``Conv1D``
        weight transposed to canonical ``(out, in)``)."""
        entries = []
        for key, (module, param_name) in self._named(adapter_name).items():
            flip = _transposed if param_name == "weight" and is_conv1d(module) else _same
            entries.append(
                AdapterTensor(
                    key, functools.partial(getattr, module, param_name), functools.partial(setattr, module, param_name),
                    flip, flip,
                )
            )
        return entries

    def delete(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_trainable(self, adapter_name: str, trainable: bool) -> None:
        if adapter_name in self.modules_to_save:
            self.modules_to_save[adapter_name].requires_grad_(trainable)

    def merge(self, adapter_names: list[str]) -> None:
        """Nothing to fold: forward already runs the trained copy."""

    def unmerge(self) -> None:
        """Nothing was folded."""

    def unwrap(self, merge: bool) -> nn.Module:
        """With ``merge``, the active adapter's trained copy; without, the original module."""
        running = [a for a in self.active_adapters if a in self.modules_to_save]
        return self.modules_to_save[running[0]] if merge and running else self.base_layer


def _transposed(array: Any) -> Any:
    return array.T


def _same(array: Any) -> Any:
    return array
