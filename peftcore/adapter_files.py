"""Saving and loading adapter directories: the files half of every PeftModel.

:class:`AdapterFilesMixin` gives :class:`~peftcore.peft_model.PeftModel` its
``save_pretrained`` and ``load_adapter`` (``from_pretrained``, which builds the native
shell, stays with the PeftModel). Every name is checked before anything is written,
every tensor before the model is touched; HF PEFT's keyword arguments are accepted with
HF's meaning or refused as a ``TypeError``.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol, Sequence, Union

from peftcore import model_ops
from peftcore.all_or_nothing import restoring_base_weights, restoring_tensors
from peftcore.config import PeftConfig
from peftcore.errors import AdapterError, PeftCoreError
from peftcore.finite import check_adapter_gains, check_embedding_matrices, check_plan_scalars
from peftcore.graph import ModelGraph
from peftcore.hf_compat import (
    check_hf_save_arguments,
    embedding_matrices_to_save,
    split_embedding_layers,
)
from peftcore.io import (
    WEIGHTS_NAME,
    AdapterFiles,
    LoadResult,
    adapter_file_contents,
    adapter_subfolders,
    hf_key_of,
    match_tensors,
    read_adapter,
    stale_weights_name,
    unexpected_tensor_keys,
)
from peftcore.lora_conversion import convert_to_plain_lora
from peftcore.model_card import CARD_NAME, MAX_CARD_BYTES, model_card_text
from peftcore.model_lock import changes_model, reads_model
from peftcore.plan import RewritePlan, check_plan_fits
from peftcore.runtime import BackendRuntime
from peftcore.save_dir import FileToWrite, SaveDirectory

if TYPE_CHECKING:
    from peftcore.plugins import Backend


class _PeftModelState(Protocol):
    """What the files half uses of the PeftModel it is mixed into."""

    backend_name: str
    model_graph: Optional[ModelGraph]
    peft_config: dict[str, PeftConfig]
    plans: dict[str, RewritePlan]
    active_adapters: list[str]
    _merged: list[str]

    @property
    def runtime(self) -> BackendRuntime: ...

    @property
    def backend(self) -> Backend: ...

    def get_base_model(self) -> Any: ...

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: Optional[PeftConfig] = None,
        plan: Optional[RewritePlan] = None,
        *,
        config: Optional[PeftConfig] = None,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> RewritePlan: ...

    def delete_adapter(self, adapter_name: str) -> None: ...

    def export_adapter(self, adapter_name: str) -> dict[str, Any]: ...

    def import_adapter(self, adapter_name: str, tensors: Mapping[str, Any]) -> None: ...

    def _require(self, adapter_name: str) -> None: ...

    def _unmerge_unless_active(self, names: Sequence[str], operation: str) -> None: ...

    def _reload_from_files(
        self, files: AdapterFiles, adapter_name: str, is_trainable: bool, strict: bool, allow_non_finite: bool = False
    ) -> list[str]: ...

    def _add_from_files(
        self,
        files: AdapterFiles,
        adapter_name: str,
        is_trainable: bool,
        strict: bool,
        allow_non_finite: bool = False,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> list[str]: ...

    def _layer_dtypes(self) -> dict[str, str]: ...

    def _tensors_of_files(
        self, files: AdapterFiles, plan: RewritePlan, strict: bool, allow_non_finite: bool
    ) -> tuple[dict[str, Any], dict[str, Any], list[str]]: ...

    def _set_trainable(self, adapter_name: str, trainable: bool) -> None: ...

    def _load_embedding_layers(self, weights: Mapping[str, Any]) -> None: ...


def auto_mapping_of(model: _PeftModelState, config: PeftConfig) -> Optional[dict[str, str]]:
    """HF PEFT's ``auto_mapping`` for a saved config: the base model's class and module
    when the adapter has no task type (so ``AutoPeftModel`` can rebuild it), else None."""
    if config.task_type is not None:
        return None
    base_class = type(model.get_base_model())
    return {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}


class AdapterFilesMixin:
    """``save_pretrained`` and ``load_adapter`` (see the module docstring)."""

    @reads_model
    def save_pretrained(
        self: _PeftModelState,
        save_directory: Union[str, os.PathLike],
        safe_serialization: bool = True,
        selected_adapters: Optional[Sequence[str]] = None,
        save_embedding_layers: Union[str, bool] = "auto",
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Save adapters: ``default`` at the top of the directory, others in a subfolder
        each, and a model card (``README.md``), as HF PEFT does.

        HF PEFT's arguments: ``safe_serialization`` (False writes torch's
        ``adapter_model.bin`` as HF PEFT does, a plain state dict without peftcore's plan,
        so it reloads from its config as an HF adapter does; needs torch), ``save_embedding_layers`` (the base model's embedding matrices are
        stored beside the adapter, as HF PEFT stores them: ``"auto"`` when the config
        targets ``embed_tokens``/``lm_head``, see
        :func:`~peftcore.hf_compat.embedding_matrices_to_save`; loading copies them back
        into the base model), ``is_main_process`` (False writes nothing), and ``state_dict`` among ``kwargs`` (accepted and ignored, as the
        tensors are read from the model; ``transformers.Trainer`` passes it), and
        ``path_initial_model_for_weight_conversion`` (the directory a PiSSA/OLoRA adapter
        was saved to before training: the adapter is saved as the plain LoRA of twice the
        rank that gives the trained model on the *original* base weights, see
        :mod:`peftcore.lora_conversion`; ``convert_pissa_to_lora`` is HF's older name).

        Every file goes through :class:`~peftcore.save_dir.SaveDirectory`, all or
        nothing: an existing card that cannot be merged (a link, a FIFO, more than
        :data:`~peftcore.model_card.MAX_CARD_BYTES`) or a target that is a link or not a
        regular file is an :class:`AdapterError` before any file is written."""
        if isinstance(safe_serialization, (list, tuple)):  # the old positional selected_adapters
            selected_adapters, safe_serialization = safe_serialization, True
        unknown = sorted(set(kwargs) - {"state_dict", "convert_pissa_to_lora", "path_initial_model_for_weight_conversion"})
        if unknown:
            raise TypeError(f"save_pretrained() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
        check_hf_save_arguments(safe_serialization, save_embedding_layers)
        initial_dir = kwargs.get("path_initial_model_for_weight_conversion", kwargs.get("convert_pissa_to_lora"))
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        for name in names:
            self._require(name)
        if self._merged:
            raise AdapterError(f"adapters {self._merged} are merged; unmerge_adapter() before saving")
        if not is_main_process:
            return
        subfolders = adapter_subfolders(names)  # every name checked before any write
        if not names:
            return
        with SaveDirectory.open(save_directory) as folder:
            # everything that can refuse the save is read and checked before any file is written
            card = model_card_text(folder.read_bounded_text(CARD_NAME, MAX_CARD_BYTES, "model card"), self)
            files: list[FileToWrite] = []
            for name in names:
                tensors = self.export_adapter(name)
                config, plan = self.peft_config[name], self.plans[name]
                if initial_dir is not None:  # PiSSA/OLoRA saved as the plain LoRA of its change
                    config, plan, tensors = convert_to_plain_lora(self.model_graph, name, config, plan, tensors, initial_dir)
                embeddings = embedding_matrices_to_save(self, name, save_embedding_layers)
                saved = config.as_saved(self.model_graph, plan)  # as HF PEFT writes it
                contents = adapter_file_contents(
                    saved, plan, tensors, embeddings, auto_mapping=auto_mapping_of(self, saved),
                    safe_serialization=safe_serialization,
                )
                files.extend((subfolders[name], file_name, content) for file_name, content in contents)
            files.append((None, CARD_NAME, card.encode("utf-8")))
            folder.write_files(files)  # all or nothing
            for name in names:  # the other weights format's old file would disagree with the new one
                folder.remove_regular(stale_weights_name(safe_serialization), subfolders[name])

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str = "Upload adapter",
        private: Optional[bool] = None,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
        **save_kwargs: Any,
    ) -> Any:
        """Save the adapters as :meth:`save_pretrained` does and upload them to the Hugging
        Face Hub repository ``repo_id`` (created if missing), as HF PEFT does. Needs the
        ``huggingface_hub`` package and network access; returns the upload's commit info."""
        try:
            hub: Any = importlib.import_module("huggingface_hub")
        except ImportError:
            raise AdapterError("push_to_hub needs the huggingface_hub package: pip install huggingface_hub") from None
        api = hub.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        peft_model: Any = self
        with tempfile.TemporaryDirectory() as folder:
            peft_model.save_pretrained(folder, **save_kwargs)
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision,
                create_pr=create_pr, repo_type="model",
            )

    @changes_model
    def load_adapter(
        self: _PeftModelState,
        model_id: Union[str, os.PathLike],
        adapter_name: str,
        is_trainable: bool = False,
        strict: bool = True,
        **kwargs: Any,
    ) -> LoadResult:
        """Load a saved adapter from a directory and add it under ``adapter_name``.

        The adapter's stored plan is re-applied as saved (an HF PEFT adapter, which has
        none, is planned from its config). Every tensor is checked before the model is
        touched; unexpected tensors are an error unless ``strict=False``. When
        ``adapter_name`` exists already with the same plan (``transformers.Trainer``
        resuming a checkpoint), its tensors are replaced in place, as HF PEFT does.
        HF PEFT's ``torch_device``, ``autocast_adapter_dtype``, ``low_cpu_mem_usage``,
        ``ephemeral_gpu_offload`` and hub arguments are accepted (see ``from_pretrained``).
        Returns HF PEFT's result: ``missing_keys`` and ``unexpected_keys`` lists.
        """
        allow_non_finite = bool(kwargs.pop("allow_non_finite", False))
        files = read_adapter(adapter_dir(model_id, kwargs))
        if adapter_name in self.peft_config:
            if adapter_name in self._merged:  # new tensors must not sit under a stale merge
                self._unmerge_unless_active([], "load_adapter")
            unexpected = self._reload_from_files(files, adapter_name, is_trainable, strict, allow_non_finite)
        else:
            unexpected = self._add_from_files(
                files, adapter_name, is_trainable, strict, allow_non_finite, **placement_of(kwargs)
            )
        to_device(self, kwargs.get("torch_device"))
        return LoadResult(missing_keys=[], unexpected_keys=unexpected)

    def _reload_from_files(
        self: _PeftModelState,
        files: AdapterFiles,
        adapter_name: str,
        is_trainable: bool,
        strict: bool,
        allow_non_finite: bool = False,
    ) -> list[str]:
        assert self.model_graph is not None
        current = self.plans[adapter_name]
        plan = plan_of_files(files, files.config, self.model_graph, adapter_name)
        if plan.ops != current.ops:
            raise AdapterError(
                f"{files.directory}: adapter {adapter_name!r} exists with another plan; delete_adapter() it first "
                "or load under another name"
            )
        tensors, embeddings, unexpected = self._tensors_of_files(files, plan, strict, allow_non_finite)
        # all or nothing: a write failing part-way puts back what was written
        with restoring_tensors(self, adapter_name), restoring_base_weights(self, list(embeddings)):
            self.import_adapter(adapter_name, tensors)
            if embeddings:
                self._load_embedding_layers(embeddings)
        self.peft_config[adapter_name] = self.peft_config[adapter_name].replace(inference_mode=not is_trainable)
        self._set_trainable(adapter_name, is_trainable and adapter_name in self.active_adapters)
        return unexpected

    def _tensors_of_files(
        self: _PeftModelState, files: AdapterFiles, plan: RewritePlan, strict: bool, allow_non_finite: bool
    ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """``files``' tensors for ``plan``, checked (canonical names), the embedding
        matrices saved beside them, and the file keys a non-strict load skips."""
        assert self.model_graph is not None
        weights_path = files.weights_path or os.path.join(files.directory, WEIGHTS_NAME)
        adapter_tensors, embeddings = split_embedding_layers(files.tensors, self.model_graph, plan, weights_path)
        dtypes = self._layer_dtypes()
        tensors = match_tensors(plan, adapter_tensors, weights_path, strict, allow_non_finite=allow_non_finite, dtypes=dtypes)
        if not allow_non_finite:  # nothing from the files may make finite inputs give non-finite outputs
            check_embedding_matrices(embeddings, dtypes, weights_path)
            check_plan_scalars(plan, files.config, weights_path)
            check_adapter_gains(plan, tensors, dtypes, weights_path, hf_key_of(plan))
        return tensors, embeddings, unexpected_tensor_keys(plan, adapter_tensors)

    def _layer_dtypes(self: _PeftModelState) -> dict[str, str]:
        """Each layer's dtype as it is now: the graph's, updated from the adapter layers."""
        assert self.model_graph is not None
        recorded = {node.path: node.dtype for node in self.model_graph.layers if node.dtype}
        return {**recorded, **model_ops.layer_dtypes(self.runtime, self.get_base_model())}

    def _add_from_files(
        self: _PeftModelState,
        files: AdapterFiles,
        adapter_name: str,
        is_trainable: bool,
        strict: bool,
        allow_non_finite: bool = False,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> list[str]:
        """Add the adapter in ``files``; returns the file keys a non-strict load skipped."""
        self.backend.refuse_unbuildable(files.config)  # before the file's plan meets the model
        if self.model_graph is None:
            raise AdapterError(
                f"cannot load {files.directory!r} yet: the model's layers do not know their shapes; run one forward "
                "pass (or compile) first, or pass example_inputs"
            )
        config = files.config
        if config.inference_mode is is_trainable:
            config = config.replace(inference_mode=not is_trainable)
        plan = plan_of_files(files, config, self.model_graph, adapter_name)
        check_plan_fits(plan, self.model_graph, files.directory)
        tensors, embeddings, unexpected = self._tensors_of_files(files, plan, strict, allow_non_finite)
        self.add_adapter(
            adapter_name, config, plan=plan, autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        try:
            with restoring_base_weights(self, list(embeddings)):
                self.import_adapter(adapter_name, tensors)
                if embeddings:
                    self._load_embedding_layers(embeddings)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        return unexpected

    def _load_embedding_layers(self: _PeftModelState, weights: Mapping[str, Any]) -> None:
        """Copy the embedding matrices an HF PEFT adapter saved (``save_embedding_layers``)
        into the base model's embedding layers, as HF PEFT does. A shell that can
        provides ``_set_base_weights(path -> numpy array)``; otherwise they are ignored
        with a warning."""
        setter = getattr(self, "_set_base_weights", None)
        if setter is None:
            warnings.warn(
                f"the adapter holds embedding matrices for {sorted(weights)} (HF PEFT's save_embedding_layers); "
                f"backend {self.backend_name!r} cannot load base weights, so they are ignored",
                UserWarning,
                stacklevel=3,
            )
            return
        setter(weights)


#: HF PEFT's loading keywords that change nothing for a local directory in peftcore.
_NEUTRAL_LOAD_KWARGS = frozenset(
    {"autocast_adapter_dtype", "low_cpu_mem_usage", "ephemeral_gpu_offload", "revision", "cache_dir", "token",
     "use_auth_token", "local_files_only", "force_download", "key_mapping", "torch_device", "subfolder",
     "device_map", "max_memory", "offload_folder", "offload_index"}
)


def placement_of(kwargs: Mapping[str, Any]) -> dict[str, bool]:
    """HF PEFT's ``autocast_adapter_dtype``/``low_cpu_mem_usage`` from loading keywords."""
    return {
        "autocast_adapter_dtype": bool(kwargs.get("autocast_adapter_dtype", True)),
        "low_cpu_mem_usage": bool(kwargs.get("low_cpu_mem_usage", False)),
    }


def device_of_map(device_map: Any) -> Any:
    """The one device an HF ``device_map`` names (``"cpu"``, ``{"": "cuda:0"}``), or
    ``None`` for a map that spreads the model (``"auto"``, several entries): adapters are
    built on their base layer's device, so a spread model needs no move."""
    if isinstance(device_map, Mapping):
        return device_map.get("") if set(device_map) == {""} else None
    if device_map in (None, "auto", "balanced", "balanced_low_0", "sequential"):
        return None
    return device_map


def plan_of_files(files: AdapterFiles, config: PeftConfig, graph: ModelGraph, adapter_name: str) -> RewritePlan:
    """The plan saved with an adapter, renamed to ``adapter_name``; an adapter without one
    (HF PEFT's, or a ``.bin``) is planned from ``config`` for loading, unless its tensors
    are exactly those of the training plan (a P-tuning encoder or prefix projection
    saved beside the table, as peftcore saves them)."""
    if files.plan:
        return files.plan.with_adapter_name(adapter_name)
    loading = config.loading_plan(graph, adapter_name)
    if unexpected_tensor_keys(loading, files.tensors.keys()):
        try:
            training = config.plan(graph, adapter_name)
        except PeftCoreError:  # e.g. a TEXT init without its tokenizer: the file's tensors decide
            return loading
        if not unexpected_tensor_keys(training, files.tensors.keys()):
            return training
    return loading


def adapter_dir(model_id: Union[str, os.PathLike], kwargs: Mapping[str, Any]) -> str:
    """The local adapter directory for HF PEFT's ``model_id`` (+ ``subfolder``); refuses
    keywords HF PEFT does not take (as a ``TypeError``) and a ``key_mapping``."""
    unknown = sorted(set(kwargs) - _NEUTRAL_LOAD_KWARGS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    if kwargs.get("key_mapping"):
        raise AdapterError("key_mapping is not supported: peftcore reads HF PEFT's key names as saved")
    directory = os.fspath(model_id)
    if kwargs.get("subfolder"):
        directory = os.path.join(directory, kwargs["subfolder"])
    return directory


def to_device(peft_model: Any, device: Any) -> None:
    """Move the model to ``device`` (HF PEFT's ``torch_device``); ``None`` leaves it."""
    if device is None:
        return
    move = getattr(peft_model, "to", None)
    if not callable(move):
        raise AdapterError(f"torch_device={device!r}: this backend's model has no .to(); place it yourself")
    move(device)
