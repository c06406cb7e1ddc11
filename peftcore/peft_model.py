"""The framework-free half of every PeftModel: adapters, their state, merging, files.

:class:`PeftModel` holds what is the same in every framework: the configs and plans of
the adapters, which are active and merged, and the rules for adding, switching,
merging, baking, saving and loading them. It is a mixin: each backend supplies the
native shell (a ``torch.nn.Module`` on torch) that subclasses it, so the user holds a
model of their own framework and ``isinstance(pm, peftcore.PeftModel)`` holds too.

The shell calls :meth:`PeftModel.init_peft_state` in its constructor and provides
:meth:`get_base_model`. The mixin keeps no plugin object, lock or module: it finds its
backend by name when it needs one, so a PeftModel pickles and deep-copies as its
framework allows.

Forward passes read and adapter changes write under one lock per model, kept beside it
(:mod:`peftcore.model_lock`): a forward in one thread never sees half of a change made
in another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from peftcore import model_ops
from peftcore.adapter_files import AdapterFilesMixin, adapter_dir, device_of_map, placement_of, to_device
from peftcore.all_or_nothing import check_tensor_shapes, restoring_adapter
from peftcore.config import PeftConfig
from peftcore.errors import AdapterError, BackendError, did_you_mean
from peftcore.graph import ModelGraph
from peftcore.hf_compat import HFCompatMixin
from peftcore.hf_model_api import HFModelApiMixin
from peftcore.io import DEFAULT_ADAPTER, check_adapter_name, read_adapter
from peftcore.methods.common import effective_modules_to_save, warn_untrained_head
from peftcore.model_lock import changes_model, model_lock, reads_model, writing
from peftcore.model_ops import BASE_ROW
from peftcore.peft_model_merging import MergingMixin
from peftcore.plan import RewritePlan
from peftcore.plugins import Backend, get_plugin_manager
from peftcore.runtime import BackendRuntime, TaskPeftModelClasses

__all__ = ["BASE_ROW", "HandlePeftModel", "PeftModel", "deprecated_graph_alias", "wrap_model"]


class PeftModel(AdapterFilesMixin, HFCompatMixin, HFModelApiMixin, MergingMixin):
    """A model with adapters, native to its framework (mixin; see the module docstring).

    Calling it runs the model with its active adapters. The adapted native model is
    :meth:`get_base_model`; its layers are changed in place.
    """

    backend_name: str
    #: the backend's description of the model (None until its layers know their shapes);
    #: not ``graph``, which frameworks use (SINGA's ``Model.graph(mode, sequential)``)
    model_graph: Optional[ModelGraph]
    peft_config: dict[str, PeftConfig]
    plans: dict[str, RewritePlan]
    active_adapters: list[str]

    def init_peft_state(self, backend_name: str, graph: Optional[ModelGraph]) -> None:
        """Start with no adapter; called once by the backend's shell constructor.

        ``graph`` is None when the backend cannot see the layers' shapes yet (SINGA
        layers learn them at their first call): adapters added then are kept pending and
        built by :meth:`build_pending_adapters`, which the shell calls before the first
        forward.
        """
        self.backend_name = backend_name
        self.model_graph = graph
        self.peft_config = {}
        self.plans = {}
        self.active_adapters = []
        self._merged: list[str] = []
        self._pending: list[tuple[str, PeftConfig, Optional[RewritePlan]]] = []

    # -- what the native shell provides ---------------------------------------------------
    def get_base_model(self) -> Any:
        """The native model, with its adapter layers in place."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_base_model()")

    def run_base_model(self, *args: Any, **kwargs: Any) -> Any:
        """Call the native model (the shell may override, e.g. to skip its own hooks)."""
        return self.get_base_model()(*args, **kwargs)

    # -- the backend ------------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        """The backend plugin that built this model (looked up by name, never stored)."""
        return get_plugin_manager().get_backend(self.backend_name)

    @property
    def runtime(self) -> BackendRuntime:
        """The backend's runtime, through which every model-wide operation goes."""
        return self.backend.runtime

    # -- calling ------------------------------------------------------------------------------
    def peft_forward(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """Run the model; the shell's ``forward`` calls this.

        ``adapter_names`` (Hugging Face PEFT's argument) gives one adapter name per row
        of the batch, ``"__base__"`` for the base model alone: each row runs through its
        own adapter, whichever adapters are active. Merged adapters cannot be mixed, and
        (as in HF PEFT) a model in training mode refuses ``adapter_names``.

        The call holds the model's lock for reading (:mod:`peftcore.model_lock`), so it
        sees the adapters wholly before or wholly after any change another thread makes.
        """
        if adapter_names is None:
            lock = model_lock(self)
            lock.acquire_read()
            try:
                return self.run_base_model(*args, **kwargs)
            finally:
                lock.release_read()
        first_input = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        return self.run_mixed_batch(self.run_base_model, adapter_names, first_input, args, kwargs)

    @reads_model
    def run_mixed_batch(
        self,
        call: Any,
        adapter_names: Sequence[str],
        first_input: Any,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        repeat: int = 1,
    ) -> Any:
        """``call(*args, **kwargs)`` with each row routed to the adapter ``adapter_names``
        gives it (checked against ``first_input``'s rows); with ``repeat`` > 1 the model
        sees each row repeated that many times in a row (``generate``'s beams)."""
        names = self._check_batch_adapters(adapter_names, first_input)
        if repeat > 1:
            names = [name for name in names for _ in range(repeat)]
        runtime, model = self.runtime, self.get_base_model()
        try:
            model_ops.set_batch_adapters(runtime, model, names)
        except NotImplementedError as exc:
            raise BackendError(str(exc)) from exc
        try:
            return call(*args, **kwargs)
        finally:
            model_ops.set_batch_adapters(runtime, model, None)

    def _check_batch_adapters(self, adapter_names: Sequence[str], first_input: Any) -> list[str]:
        """``adapter_names`` as a list, every name an unmerged adapter or ``"__base__"``,
        one per row of ``first_input`` when that has a shape."""
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise AdapterError("adapter_names must be a list of adapter names, one per row of the batch")
        if getattr(self.get_base_model(), "training", False) is True:
            raise AdapterError("Cannot pass `adapter_names` when the model is in training mode. Call eval() first.")
        names = list(adapter_names)
        for name in dict.fromkeys(names):
            if name != BASE_ROW and name not in self.peft_config:
                raise AdapterError(
                    f"adapter_names names no adapter {name!r}{did_you_mean(name, self.peft_config)} "
                    f"(adapters: {list(self.peft_config)}; {BASE_ROW!r} means none)"
                )
        dora = [name for name in dict.fromkeys(names) if getattr(self.peft_config.get(name), "use_dora", False)]
        if dora:  # refused as HF PEFT refuses it: the row-routed paths add plain LoRA updates only
            raise AdapterError(f"Cannot pass `adapter_names` when DoRA is enabled (DoRA adapters in the batch: {dora}).")
        if self._merged:
            raise AdapterError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first "
                f"(merged: {self._merged})."
            )
        shape = getattr(first_input, "shape", None)
        if shape is not None and len(shape) > 0 and int(shape[0]) != len(names):
            raise AdapterError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(names)} and {int(shape[0])} respectively."
            )
        return names

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """The modules some adapter trains in full, by the names its config gives (with
        the heads a task type adds), or None when none does (HF PEFT's attribute)."""
        names = {
            module
            for config in self.peft_config.values()
            for module in effective_modules_to_save(config.task_type, getattr(config, "modules_to_save", None)) or ()
        }
        return names or None

    @property
    def active_peft_config(self) -> PeftConfig:
        """The config of the (first) active adapter (HF PEFT's attribute)."""
        if not self.active_adapter:
            raise AdapterError("the model has no active adapter")
        return self.peft_config[self.active_adapter]

    @property
    def active_adapter(self) -> str:
        """The first active adapter's name (HF PEFT's attribute)."""
        return self.active_adapters[0] if self.active_adapters else ""

    # -- adapters -------------------------------------------------------------------------
    @changes_model
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: Optional[PeftConfig] = None,
        plan: Optional[RewritePlan] = None,
        *,
        config: Optional[PeftConfig] = None,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> RewritePlan:
        """Plan ``peft_config`` on this model and build it as a new adapter (not made active
        unless it is the first one). Returns the plan.

        HF PEFT's signature: ``add_adapter(adapter_name, peft_config, low_cpu_mem_usage=False,
        autocast_adapter_dtype=True)``; ``config=`` is accepted for ``peft_config``. With
        ``autocast_adapter_dtype`` (the default), adapter tensors of a float16/bfloat16
        model are kept in float32, as HF PEFT does; ``low_cpu_mem_usage`` holds them on no
        device until loaded (torch's ``meta``), so the adapter is for loading into, not
        for running, until then. Backends without the distinction ignore both."""
        if (peft_config is None) == (config is None):
            raise TypeError("add_adapter() takes the adapter's config once, as peft_config")
        config = peft_config if peft_config is not None else config
        assert config is not None
        if not isinstance(config, PeftConfig):
            raise TypeError(f"peft_config must be a peftcore PeftConfig, got {type(config).__name__}")
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config or adapter_name in self.pending_adapters:
            raise AdapterError(f"Adapter with name '{adapter_name}' already exists; delete it first or pick another name.")
        config.check_beside({**self.peft_config, **{name: c for name, c, _ in self._pending}})
        self.backend.refuse_unbuildable(config)
        if self.model_graph is None:
            self._pending.append((adapter_name, config, plan))
            self._adapter_pending()
            return plan  # type: ignore[return-value]  # None until built: the layers' shapes are unknown
        if plan is None:
            plan = config.plan(self.model_graph, adapter_name)
            warn_untrained_head(config, self.model_graph, plan)
        elif plan.adapter_name != adapter_name:
            plan = plan.with_adapter_name(adapter_name)
        model_ops.apply_plan(self.runtime, self.get_base_model(), plan, self.backend.builders())
        try:
            model_ops.place_adapter_tensors(
                self.runtime, self.get_base_model(), adapter_name, autocast_adapter_dtype, low_cpu_mem_usage
            )
        except BaseException:
            model_ops.delete_adapter(self.runtime, self.get_base_model(), adapter_name)
            raise
        self.peft_config[adapter_name] = config
        self.plans[adapter_name] = plan
        if not self.active_adapters:
            self.set_adapter(adapter_name)
        else:
            self._set_trainable(adapter_name, False)
            model_ops.set_active(self.runtime, self.get_base_model(), self.active_adapters)
        return plan

    def _adapter_pending(self) -> None:
        """Told when an adapter is queued until the model's layers know their shapes (a
        native shell may hook the model's first forward to build it then)."""

    @property
    def pending_adapters(self) -> list[str]:
        """Adapters added before the model's layers knew their shapes, not built yet."""
        return [name for name, _, _ in self._pending]

    @changes_model
    def build_pending_adapters(self, example_inputs: Any = None) -> None:
        """Describe the model, now that its layers know their shapes (or by one forward on
        ``example_inputs``), and build the adapters added before. Does nothing when none
        is pending."""
        if self.model_graph is None:
            graph = self.backend.describe(self.get_base_model(), example_inputs)
            if graph is None:
                raise AdapterError(
                    "the model's layers do not know their shapes yet: run one forward pass (or compile) first, "
                    "or pass example_inputs"
                )
            self.model_graph = graph
        pending, self._pending = self._pending, []
        for index, (name, config, plan) in enumerate(pending):
            try:
                self.add_adapter(name, config, plan)
            except BaseException:
                self._pending = pending[index + 1 :]
                raise

    @changes_model
    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Make these adapters the active ones: used in forward, and trainable unless
        ``inference_mode`` (HF PEFT's argument) or their config's ``inference_mode``."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._require(name)
        self._refuse_shared_modules_to_save(names)
        self._unmerge_unless_active(names, "set_adapter")
        for name in self.peft_config:
            trainable = name in names and not inference_mode and not self.peft_config[name].inference_mode
            self._set_trainable(name, trainable)
        model_ops.set_active(self.runtime, self.get_base_model(), names)
        self.active_adapters = names

    @changes_model
    def replace_adapter(
        self, adapter_name: str, config: PeftConfig, plan: RewritePlan, tensors: Mapping[str, Any]
    ) -> None:
        """Rebuild adapter ``adapter_name`` from a new config, plan and canonical tensors,
        keeping which adapters are active (XPrompt uses it to install a pruned prompt)."""
        self._require(adapter_name)
        check_tensor_shapes(plan, tensors, adapter_name)
        active = list(self.active_adapters)
        with restoring_adapter(self, adapter_name):  # all or nothing: the old adapter comes back on failure
            self.delete_adapter(adapter_name)
            self.add_adapter(adapter_name, config, plan=plan)
            self.import_adapter(adapter_name, tensors)
            self.set_adapter(active)

    @changes_model
    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. Deleting the active one activates the first remaining."""
        if adapter_name not in self.peft_config and adapter_name not in self.pending_adapters:
            raise AdapterError(
                f"Adapter {adapter_name} does not exist{did_you_mean(adapter_name, self.peft_config)}"
            )
        self._require(adapter_name)
        if adapter_name in self._merged:
            raise AdapterError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first."
            )
        model_ops.set_base_trainable(self.runtime, self.get_base_model(), self.plans[adapter_name], False)
        model_ops.delete_adapter(self.runtime, self.get_base_model(), adapter_name)
        del self.peft_config[adapter_name]
        del self.plans[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.active_adapters = []
        if remaining:
            self.set_adapter(remaining)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: run the base model alone inside the block.

        Merged adapters are unmerged for the block and merged again after it; no adapter
        parameter requires gradients inside it. Layers disabled before the block
        (``disable_adapter_layers``) stay disabled after it; when only some were, all are
        enabled after it, with a warning (HF PEFT's rule).

        The switch is model-wide, as in HF PEFT: forwards in other threads see the base
        model during the block too. Entering and leaving are each one change under the
        model's lock (:mod:`peftcore.model_lock`); the block itself holds no lock.
        """
        with writing(self):
            merged = list(self._merged)
            states = model_ops.enabled_states(self.runtime, self.get_base_model())
            if len(states) > 1:
                warnings.warn(
                    "The model contains some adapter layers that are enabled and others that are disabled; all of "
                    "them will be enabled when the disable_adapter() block ends",
                    UserWarning,
                    stacklevel=3,
                )
            enable_after = states != {False}
            self._warn_base_stays_trained("disable_adapter()")
            self.unmerge_adapter()
            self._enable_layers(False)
        try:
            yield
        finally:
            with writing(self):
                self._enable_layers(enable_after)
                if merged:
                    self.merge_adapter(merged)

    def _enable_layers(self, enabled: bool) -> None:
        """Switch every adapter layer on or off. While off, no adapter trains (HF PEFT
        freezes them too); when on again, the active adapters train unless their config
        is in inference mode."""
        model_ops.set_enabled(self.runtime, self.get_base_model(), enabled)
        for name, config in self.peft_config.items():
            self._set_trainable(name, enabled and name in self.active_adapters and not config.inference_mode)

    def _warn_base_stays_trained(self, operation: str) -> None:
        """Warn that adapters which train base parameters in place keep them trained."""
        names = [name for name, plan in self.plans.items() if model_ops.base_tensor_names(plan)]
        if names:
            biases = sorted({str(getattr(self.peft_config[n], "bias", "")) for n in names} - {""})
            warnings.warn(
                f"Careful, disabling adapter layers with bias configured to be {' or '.join(map(repr, biases))} "
                f"(adapters {names}) does not give the base model's output: {operation} leaves the base biases "
                "those adapters trained in place as trained",
                UserWarning,
                stacklevel=4,
            )

    def _set_trainable(self, adapter_name: str, trainable: bool) -> None:
        """Whether the adapter's tensors (and the base parameters it trains in place) train."""
        model_ops.set_trainable(self.runtime, self.get_base_model(), adapter_name, trainable)
        model_ops.set_base_trainable(self.runtime, self.get_base_model(), self.plans[adapter_name], trainable)

    # -- parameters -------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts of the model as it is now."""
        trainable, total = model_ops.count_parameters(self.runtime, self.get_base_model())
        return int(trainable), int(total)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100.0 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}")

    # -- canonical tensors -----------------------------------------------------------------------
    @reads_model
    def export_adapter(self, adapter_name: str) -> dict[str, Any]:
        """The adapter's tensors as canonical-layout numpy arrays, keyed by canonical name
        (``<layer path>.<tensor name>``, as in ``RewritePlan.tensor_specs``)."""
        self._require(adapter_name)
        tensors = model_ops.export_adapter(self.runtime, self.get_base_model(), adapter_name)
        tensors.update(model_ops.export_base_tensors(self.runtime, self.get_base_model(), self.plans[adapter_name]))
        return tensors

    @changes_model
    def import_adapter(self, adapter_name: str, tensors: Mapping[str, Any]) -> None:
        """Copy canonical-layout numpy tensors into the adapter's parameters."""
        self._require(adapter_name)
        plan = self.plans[adapter_name]
        check_tensor_shapes(plan, tensors, adapter_name)  # every shape before any write
        in_place = model_ops.base_tensor_names(plan)
        model_ops.import_adapter(
            self.runtime, self.get_base_model(), adapter_name, {k: v for k, v in tensors.items() if k not in in_place}
        )
        model_ops.import_base_tensors(self.runtime, self.get_base_model(), plan, tensors)

    @reads_model
    def adapter_gradients(self, adapter_name: str, loss: Any) -> dict[str, Any]:
        """d ``loss`` / d each of the adapter's tensors (canonical layout, numpy); ``loss`` is a
        scalar of the model's framework computed by running it. Stored gradients stay."""
        self._require(adapter_name)
        try:
            return model_ops.adapter_gradients(self.runtime, self.get_base_model(), adapter_name, loss)
        except NotImplementedError as exc:
            raise BackendError(str(exc)) from exc

    @reads_model
    def gate_values(self, adapter_name: Optional[str] = None) -> dict[str, Any]:
        """The adapter's gate values from the last forward (UniPELT), keyed
        ``<layer path>.<gate stem>`` (default: the active adapter)."""
        name = adapter_name or self.active_adapter
        self._require(name)
        return model_ops.gate_values(self.runtime, self.get_base_model(), name)

    @classmethod
    def from_pretrained(
        cls,
        model: Any,
        model_id: Union[str, os.PathLike],
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
        backend: Optional[str] = None,
        example_inputs: Any = None,
        strict: bool = True,
        config: Optional[PeftConfig] = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved in ``model_id``.

        The adapter is frozen and the model is put in eval mode (dropout off), as Hugging
        Face PEFT does, unless ``is_trainable``. HF PEFT's arguments: ``config`` (used
        instead of the directory's ``adapter_config.json``), ``torch_device`` (where the
        model goes after loading; needs a shell with ``.to()``), ``device_map`` (a map to one
        device moves the model there; adapters sit on their base layer's device anyway),
        ``subfolder``;
        ``autocast_adapter_dtype``, ``low_cpu_mem_usage``, ``ephemeral_gpu_offload`` and
        the hub-only ``revision``/``cache_dir``/``token`` change nothing for a local
        directory. peftcore's ``allow_non_finite=True`` (also for ``load_adapter``) loads
        tensors holding NaN/Inf or values too large for their layer's dtype, which are
        refused by default. Any other keyword is a ``TypeError``.
        """
        allow_non_finite = bool(kwargs.pop("allow_non_finite", False))
        files = read_adapter(adapter_dir(model_id, kwargs))
        if config is not None:
            if not isinstance(config, PeftConfig):
                raise TypeError(f"config must be a peftcore PeftConfig, got {type(config).__name__}")
            if config.method != files.config.method:
                raise AdapterError(
                    f"{files.directory}: config is a {type(config).__name__}, the saved adapter is "
                    f"{type(files.config).__name__}"
                )
            config.inference_mode = not is_trainable  # HF PEFT keeps the given object, updated
            files = dataclasses.replace(files, config=config)
        chosen = get_plugin_manager().select_backend(model, backend=backend, config=files.config)
        peft_model = wrap_model(model, chosen, example_inputs, task_type=files.config.task_type)
        peft_model._add_from_files(files, adapter_name, is_trainable, strict, allow_non_finite, **placement_of(kwargs))
        to_device(peft_model, kwargs.get("torch_device") or device_of_map(kwargs.get("device_map")))
        if not is_trainable:
            to_eval_mode = getattr(peft_model, "eval", None)
            if callable(to_eval_mode):
                to_eval_mode()
        return peft_model

    # -- helpers --------------------------------------------------------------------------------
    def _require(self, adapter_name: str) -> None:
        if adapter_name in self.pending_adapters:
            raise AdapterError(
                f"adapter {adapter_name!r} is not built yet: the model's layers learn their shapes at the first "
                "forward pass (or compile); run one first"
            )
        if adapter_name not in self.peft_config:
            raise AdapterError(f"no adapter named {adapter_name!r}{did_you_mean(adapter_name, self.peft_config)}")


class HandlePeftModel(PeftModel):
    """The shell for a backend without a native one: a plain object that runs the model
    when called and passes unknown attributes to it."""

    def __init__(self, model: Any, backend_name: str, graph: Optional[ModelGraph]) -> None:
        object.__setattr__(self, "model", model)
        self.init_peft_state(backend_name, graph)

    def get_base_model(self) -> Any:
        return self.model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.peft_forward(*args, **kwargs)

    forward = __call__

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        try:
            return getattr(self.model, name)
        except AttributeError:
            if name == "graph":
                return deprecated_graph_alias(self)
            raise

    def __repr__(self) -> str:
        return f"PeftModel(backend={self.backend_name!r}, adapters={list(self.peft_config)}, model={self.model!r})"


def deprecated_graph_alias(peft_model: PeftModel) -> Optional[ModelGraph]:
    """``peft_model.graph``, the old name of :attr:`PeftModel.model_graph`, with a
    DeprecationWarning. A shell answers it only where nothing else has that name: SINGA's
    ``Model.graph(mode, sequential)`` and a wrapped model's own ``graph`` come first."""
    warnings.warn(
        "PeftModel.graph is deprecated: use PeftModel.model_graph (on SINGA, graph() is Model.graph)",
        DeprecationWarning,
        stacklevel=3,
    )
    return peft_model.model_graph


def wrap_model(model: Any, backend: Backend, example_inputs: Any = None, task_type: Optional[str] = None) -> PeftModel:
    """Describe ``model`` with ``backend`` and put it in the backend's native PeftModel shell
    (the task type's own class where the backend has one, as HF PEFT's ``PeftModelFor...``).

    A backend describes a model whose layers do not know their shapes yet as None; the
    shell then builds adapters when the shapes are known (see ``init_peft_state``)."""
    graph = backend.describe(model, example_inputs)
    runtime = backend.runtime
    with model_ops.guarded(runtime, "peft_model_class"):
        if task_type is not None and isinstance(runtime, TaskPeftModelClasses):
            shell: type[PeftModel] = runtime.task_peft_model_class(str(task_type))
        else:
            shell = runtime.peft_model_class() or HandlePeftModel
    return shell(model, backend.name, graph)  # type: ignore[call-arg]
