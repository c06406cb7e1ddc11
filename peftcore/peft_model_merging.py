"""Merging, unloading and baking on the core's state machine (a mixin of
:class:`peftcore.PeftModel`): fold adapters into the base weights and take them out
again exactly, return the plain model, or replace reparameterisations by what they
compute. Every method here changes the model, under the model's lock."""

from __future__ import annotations

import warnings
from typing import Any, Optional, Protocol, Sequence, Union

from peftcore import model_ops
from peftcore.all_or_nothing import restoring_adapter
from peftcore.config import PeftConfig
from peftcore.errors import AdapterError
from peftcore.finite import count_non_finite
from peftcore.graph import ModelGraph
from peftcore.merge_checks import check_safe_to_merge
from peftcore.model_lock import changes_model
from peftcore.plan import RewritePlan
from peftcore.runtime import BackendRuntime


class _MergingState(Protocol):
    """What the merging half uses of the PeftModel it is mixed into."""

    model_graph: Optional[ModelGraph]
    peft_config: dict[str, PeftConfig]
    plans: dict[str, RewritePlan]
    active_adapters: list[str]
    _merged: list[str]

    @property
    def runtime(self) -> BackendRuntime: ...

    def get_base_model(self) -> Any: ...

    @property
    def active_adapter(self) -> str: ...

    def _require(self, adapter_name: str) -> None: ...

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None: ...

    def export_adapter(self, adapter_name: str) -> dict[str, Any]: ...

    def _refuse_prompt_learning_unload(self, prompt_learning: bool) -> None: ...

    def unmerge_adapter(self) -> None: ...

    def _check_safe_to_merge(self, adapter_names: Sequence[str]) -> None: ...

    def _require_mergeable(self, adapter_name: str) -> None: ...

    def _unload(self, merge: bool) -> Any: ...


class MergingMixin:
    """``merge_adapter``, ``unmerge_adapter``, ``merge_and_unload``, ``unload`` and ``bake``."""

    active_adapters: list[str]
    _merged: list[str]

    def _unmerge_unless_active(self: _MergingState, names: Sequence[str], operation: str) -> None:
        """Keep every merged adapter among the active ones: a merged adapter that would
        stop being active is unmerged first, with a warning (as HF PEFT does), so the
        output is always the base model plus exactly the active adapters."""
        if self._merged and not set(self._merged) <= set(names):
            warnings.warn(
                f"{operation}: adapters {self._merged} are merged and would no longer match the active "
                "adapters; unmerging them first",
                UserWarning,
                stacklevel=4,
            )
            self.unmerge_adapter()

    @changes_model
    def merge_adapter(self: _MergingState, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights.

        With ``safe_merge``, the adapters' tensors and the change each layer would get
        are checked for NaN/Inf (and overflow of the layer's dtype) before any weight
        changes; a problem raises :class:`AdapterError` naming the adapter and tensor.
        If the backend fails part-way, every weight is put back as it was.
        """
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        for name in names:
            self._require(name)
            self._require_mergeable(name)
        todo = [n for n in names if n not in self._merged]
        if names and not todo:
            warnings.warn(f"All adapters are already merged, nothing to do ({names})", UserWarning, stacklevel=3)
        if todo:
            if safe_merge:
                self._check_safe_to_merge(self._merged + todo)
            try:
                model_ops.merge(self.runtime, self.get_base_model(), todo)
            except BaseException:
                # some layers may already hold the new deltas: restore them all exactly
                model_ops.unmerge(self.runtime, self.get_base_model())
                if self._merged:
                    model_ops.merge(self.runtime, self.get_base_model(), self._merged)
                raise
            self._merged.extend(todo)

    @changes_model
    def unmerge_adapter(self: _MergingState) -> None:
        """Undo every merge, restoring the base weights."""
        if self._merged:
            model_ops.unmerge(self.runtime, self.get_base_model())
            self._merged = []

    @property
    def merged_adapters(self: _MergingState) -> list[str]:
        return list(self._merged)

    @changes_model
    def merge_and_unload(self: _MergingState, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> Any:
        """Fold the active adapters (or ``adapter_names``, HF PEFT's argument) into the
        base weights and return the plain model.

        ``safe_merge`` checks the adapters first, as :meth:`merge_adapter` does.
        """
        if adapter_names is not None:
            self.set_adapter(list(adapter_names))  # the adapters to fold in; every adapter goes anyway
        if safe_merge:
            self._check_safe_to_merge(self.active_adapters)
        self.unmerge_adapter()
        return self._unload(merge=True)

    def _check_safe_to_merge(self: _MergingState, adapter_names: Sequence[str]) -> None:
        exported = {
            name: (self.plans[name], self.export_adapter(name))
            for name in adapter_names
        }
        assert self.model_graph is not None  # adapters exist only once the model is described
        check_safe_to_merge(exported, self.model_graph, model_ops.layer_dtypes(self.runtime, self.get_base_model()))

    @changes_model
    def unload(self: _MergingState, prompt_learning: bool = False) -> Any:
        """Remove every adapter without merging and return the plain model. As in HF
        PEFT, a model with prompt-learning adapters has no ``unload`` (an
        ``AttributeError``) unless ``prompt_learning=True`` (peftcore's)."""
        self._refuse_prompt_learning_unload(prompt_learning)
        self.unmerge_adapter()
        return self._unload(merge=False)

    def _unload(self: _MergingState, merge: bool) -> Any:
        if merge:
            for name in self.active_adapters:
                self._require_mergeable(name)
        model = model_ops.unload(self.runtime, self.get_base_model(), merge)
        self.peft_config.clear()
        self.plans.clear()
        self.active_adapters = []
        return model

    @changes_model
    def bake(self: _MergingState, adapter_name: Optional[str] = None) -> None:
        """Replace training-time reparameterisations by what they compute (default: the
        active adapter). For residual prompt tuning the MLP's output becomes a plain
        prompt: the outputs stay the same in eval mode, the adapter gets smaller and is
        saved as an ordinary prompt-tuning adapter."""
        name = adapter_name or self.active_adapter
        self._require(name)
        plan = self.plans[name]
        baked = RewritePlan(plan.method, plan.adapter_name, tuple(op.baked() for op in plan.ops), plan.version)
        if baked == plan:
            return
        finite_before = not any(count_non_finite(v) for v in self.export_adapter(name).values())
        with restoring_adapter(self, name):  # all or nothing: a failed bake leaves the adapter unbaked
            model_ops.bake(self.runtime, self.get_base_model(), name)
            config = self.peft_config[name].baked()
            self.plans[name] = RewritePlan(config.method, name, baked.ops, plan.version)
            self.peft_config[name] = config
            bad = sorted(k for k, v in self.export_adapter(name).items() if count_non_finite(v))
            if finite_before and bad:
                raise AdapterError(
                    f"baking adapter {name!r} gives NaN/Inf in {bad[:3]} (its reparameterisation overflows); "
                    "the adapter was left unbaked"
                )

    def _require_mergeable(self: _MergingState, adapter_name: str) -> None:
        fixed = sorted({op.op for op in self.plans[adapter_name].ops if not op.mergeable})
        if fixed:
            raise AdapterError(
                f"adapter {adapter_name!r} cannot be merged into the base weights: its {', '.join(fixed)} op(s) "
                "change the model's inputs or computation, not its weights (use unload(prompt_learning=True) to remove it)"
            )
