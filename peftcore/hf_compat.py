"""Hugging Face PEFT's public names, with HF's meaning, on top of peftcore's PeftModel.

:class:`HFCompatMixin` is a base of :class:`peftcore.peft_model.PeftModel`; it adds the
methods HF PEFT users call that are spelled differently in peftcore or that peftcore
builds from its own primitives: ``disable_adapter_layers``/``enable_adapter_layers``,
``add_weighted_adapter`` (LoRA: ``linear``, ``cat``, ``svd``, and TIES, DARE and magnitude
pruning with their ``_svd`` forms, see :mod:`peftcore.task_merging`), and the checks of
``save_pretrained``'s HF arguments (its model card is :mod:`peftcore.model_card`).
:func:`get_peft_model_state_dict` and :func:`set_peft_model_state_dict` are HF's
module-level functions.

Everything here is framework-free: tensors cross as numpy arrays through the core's
export/import, and a shell that wants native tensors back provides ``_from_numpy``.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from peftcore.all_or_nothing import restoring_base_tensors, restoring_tensors
from peftcore.errors import AdapterError, ConfigError
from peftcore.finite import check_adapter_gains, check_values, count_non_finite
from peftcore.io import DEFAULT_ADAPTER, HF_PREFIX, hf_key_of, match_tensors
from peftcore.methods.lora import AddLora, LoraConfig
from peftcore.model_lock import changes_model, reads_model
from peftcore.task_merging import PRUNING_COMBINATIONS, SIGN_METHODS, combine, numpy_keep_mask

__all__ = [
    "HFCompatMixin",
    "IncompatibleKeys",
    "get_peft_config",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "split_embedding_layers",
]

COMBINATIONS = ("linear", "cat", "svd") + PRUNING_COMBINATIONS + tuple(f"{kind}_svd" for kind in PRUNING_COMBINATIONS)


class IncompatibleKeys(NamedTuple):
    """What :func:`set_peft_model_state_dict` returns (torch's ``load_state_dict`` result shape)."""

    missing_keys: list
    unexpected_keys: list


class HFCompatMixin:
    """HF PEFT's PeftModel methods built on the core's state machine (see the module docstring)."""

    @changes_model
    def disable_adapter_layers(self) -> None:
        """Run the base model alone until :meth:`enable_adapter_layers` (HF PEFT's name);
        meanwhile no adapter parameter requires gradients.

        Merged adapters are unmerged first, with a warning, as HF PEFT does."""
        pm: Any = self
        if pm.merged_adapters:
            warnings.warn(
                f"adapters {pm.merged_adapters} are merged; unmerging them before disabling the adapter layers",
                UserWarning,
                stacklevel=3,
            )
            pm.unmerge_adapter()
        pm._warn_base_stays_trained("disable_adapter_layers()")
        pm._enable_layers(False)

    @changes_model
    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers`."""
        pm: Any = self
        pm._enable_layers(True)

    @changes_model
    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: Optional[int] = None,
        svd_clamp: Optional[float] = None,
        svd_full_matrices: bool = True,
        svd_driver: Optional[str] = None,
        density: Optional[float] = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name``, a weighted combination of LoRA ``adapters`` (HF PEFT's method;
        for (IA)^3 adapters each vector is the weighted sum of theirs, as in HF PEFT).

        ``combination_type``: ``"linear"`` (same rank; A and B are each the sum of
        ``sqrt(|weight * scaling|)`` times the adapters' A and B, A taking the weight's sign), ``"cat"`` (ranks add up:
        the adapters' ``weight * scaling * A`` stacked, their B side by side, so the delta is
        exactly the weighted sum) or ``"svd"`` (the weighted sum of the deltas, truncated
        to ``svd_rank``, default the largest rank, by an SVD; ``svd_clamp`` clips values
        at that quantile). The new adapter has ``lora_alpha = r`` (scaling 1), as in HF.
        ``"ties"``, ``"dare_linear"``, ``"dare_ties"`` and ``"magnitude_prune"`` (same rank)
        prune and combine the A and the B factors as ``"linear"`` weights them, keeping a
        ``density`` fraction (see :mod:`peftcore.task_merging`; ``majority_sign_method``
        ``"total"`` or ``"frequency"`` elects TIES's signs); their ``_svd`` forms do so on
        the deltas and factor the result as ``"svd"`` does. With one adapter they are
        ``"linear"``, as in HF. DARE's random masks come from :meth:`_keep_mask`.
        """
        pm: Any = self
        adapters, weights = list(adapters), [float(w) for w in weights]
        for name in adapters:
            pm._require(name)
        if adapters and all(pm.peft_config[name].method == "ia3" for name in adapters):
            if adapter_name in pm.peft_config:
                raise AdapterError(f"Adapter with name '{adapter_name}' already exists; delete it first or pick another name.")
            if len(adapters) != len(weights):
                raise ValueError("adapters and weights must be lists of the same length")
            pm._add_weighted_scales(adapters, weights, adapter_name)  # (IA)^3: vectors combine linearly
            return
        if combination_type not in COMBINATIONS:
            raise ValueError(
                f"combination_type {combination_type!r} is not supported by peftcore; use one of {COMBINATIONS}"
            )
        pruning = combination_type.removesuffix("_svd") in PRUNING_COMBINATIONS
        if pruning and (density is None or not 0.0 <= float(density) <= 1.0):
            raise ValueError(f"combination_type {combination_type!r} needs a density in [0, 1], got {density!r}")
        if majority_sign_method not in SIGN_METHODS:
            raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}")
        if pruning and len(adapters) == 1:
            combination_type = "linear"  # HF PEFT: one adapter is only ever combined linearly
        if not adapters or len(adapters) != len(weights):
            raise ValueError("adapters and weights must be non-empty lists of the same length")
        if not all(np.isfinite(weights)):
            raise ValueError(f"weights must be finite numbers, got {weights}")
        for name in adapters:
            pm._require(name)
            if not isinstance(pm.peft_config[name], LoraConfig):
                raise ValueError(f"add_weighted_adapter combines LoRA adapters; {name!r} is not one")
            if pm.peft_config[name].use_dora:
                raise ValueError(
                    f"add_weighted_adapter does not combine DoRA adapters ({name!r} has use_dora=True): a magnitude "
                    "vector belongs to one direction and has no weighted combination here"
                )
            others = sorted({op.op for op in pm.plans[name].ops} - {"lora", "freeze_base", "modules_to_save"})
            if others:
                raise ValueError(
                    f"adapter {name!r} has {', '.join(others)} op(s); only LoRA adapters (with modules_to_save) "
                    "can be combined"
                )
        # as HF PEFT: a module several of them train in full has no weighted combination
        saved = [op.path for name in adapters for op in pm.plans[name].ops if op.op == "modules_to_save"]
        shared = sorted({path for path in saved if saved.count(path) > 1})
        if shared:
            raise ValueError(
                f"Cannot add weighted adapters if they target the same module with modules_to_save, but found "
                f"{len(shared)} such instance(s). Shared: {', '.join(shared)}"
            )
        if adapter_name in pm.peft_config:
            raise AdapterError(f"Adapter with name '{adapter_name}' already exists; delete it first or pick another name.")
        ops = {name: {op.path: op for op in pm.plans[name].ops if isinstance(op, AddLora)} for name in adapters}
        tensors = {name: pm.export_adapter(name) for name in adapters}
        paths = list(dict.fromkeys(path for per in ops.values() for path in per))  # model order, as HF draws DARE's masks
        ranks = {op.r for per in ops.values() for op in per.values()}
        factored = combination_type == "linear" or combination_type in PRUNING_COMBINATIONS
        if factored and len(ranks) > 1:
            raise ValueError(
                f"combination_type={combination_type!r} needs all adapters to have the same rank; use 'cat' or an '_svd' form"
            )
        if factored:
            new_rank = ranks.pop()
        elif combination_type == "cat":
            new_rank = sum(max((o.r for o in per.values()), default=0) for per in ops.values())
        else:
            new_rank = int(svd_rank) if svd_rank is not None else max(ranks)
        combined: dict[str, np.ndarray] = {}
        layer_ranks: dict[str, int] = {}
        for path in paths:
            parts = [(ops[n][path], tensors[n], w) for n, w in zip(adapters, weights) if path in ops[n]]
            a_list = [np.asarray(t[f"{path}.lora_A"], dtype=np.float64) for _, t, _ in parts]
            b_list = [np.asarray(t[f"{path}.lora_B"], dtype=np.float64) for _, t, _ in parts]
            if factored:
                # a negative weight flips A only, so each adapter's own delta is scaled by its weight
                scales = [w * op.scaling for op, _, w in parts]
                a_weights = [(1.0 if c >= 0 else -1.0) * np.sqrt(abs(c)) for c in scales]
                b_weights = [np.sqrt(abs(c)) for c in scales]
                kind = combination_type
                a = combine(kind, a_list, a_weights, float(density or 1.0), majority_sign_method, pm._keep_mask)
                b = combine(kind, b_list, b_weights, float(density or 1.0), majority_sign_method, pm._keep_mask)
            elif combination_type == "cat":
                a = np.concatenate([w * op.scaling * x for (op, _, w), x in zip(parts, a_list)], axis=0)
                b = np.concatenate(b_list, axis=1)
            else:
                deltas = [op.scaling * (bx @ ax) for (op, _, _), ax, bx in zip(parts, a_list, b_list)]
                kind = combination_type.removesuffix("_svd") if pruning else "linear"
                delta = combine(kind, deltas, [w for _, _, w in parts], float(density or 1.0), majority_sign_method, pm._keep_mask)
                b, a = _svd_factors(np.asarray(delta), new_rank, svd_clamp, svd_full_matrices)
            layer_ranks[path] = int(a.shape[0])
            combined[f"{path}.lora_A"], combined[f"{path}.lora_B"] = a, b
        # validate everything before the model is touched: what is written must be finite where it is stored
        source_dtypes = {name: np.asarray(value).dtype for t in tensors.values() for name, value in t.items()}
        for key, value in combined.items():
            with np.errstate(over="ignore", invalid="ignore"):
                stored = np.asarray(value).astype(source_dtypes.get(key, np.float32))
            if count_non_finite(stored):
                raise AdapterError(
                    f"add_weighted_adapter: the combined tensor {key!r} holds NaN/Inf (in {stored.dtype}); the weights "
                    f"{weights} or the adapters' tensors overflow; nothing was added"
                )
        first = pm.peft_config[adapters[0]]
        assert isinstance(first, LoraConfig)
        rank_pattern = {_exact(p): r for p, r in layer_ranks.items() if r != new_rank}
        config = dataclasses.replace(
            first,
            r=new_rank,
            lora_alpha=new_rank,
            use_rslora=False,
            target_modules=list(paths),
            exclude_modules=None,
            layers_to_transform=None,
            layers_pattern=None,
            rank_pattern=rank_pattern,
            alpha_pattern={key: r for key, r in rank_pattern.items()},
            inference_mode=True,
        )
        # the first adapter's modules_to_save come along, starting from the base module as in HF PEFT
        pm.add_adapter(adapter_name, config)
        try:
            initial = pm.export_adapter(adapter_name)
            pm.import_adapter(adapter_name, {**initial, **{k: v.astype(initial[k].dtype) for k, v in combined.items()}})
        except BaseException:
            pm.delete_adapter(adapter_name)
            raise


    def _keep_mask(self, shape: tuple[int, ...], density: float) -> np.ndarray:
        """DARE's Bernoulli(``density``) keep-mask of ``shape`` (numpy's RNG here; a
        backend shell may draw it on its framework's RNG)."""
        return numpy_keep_mask(shape, density)


def _exact(path: str) -> str:
    """A pattern key matching the layer ``path`` (patterns match a path's end)."""
    return re.escape(path)


def _svd_factors(delta: np.ndarray, rank: int, clamp: Optional[float], full_matrices: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(B, A)`` of rank ``rank`` whose product best approximates ``delta``."""
    u, s, vh = np.linalg.svd(delta, full_matrices=full_matrices)
    rank = min(rank, s.shape[0])
    u, s, vh = u[:, :rank], s[:rank], vh[:rank, :]
    u = u * s[None, :]
    if clamp is not None:
        bound = np.quantile(np.concatenate([u.ravel(), vh.ravel()]), clamp)
        u, vh = np.clip(u, -bound, bound), np.clip(vh, -bound, bound)
    return u, vh


# -- module-level functions ---------------------------------------------------------------------
def get_peft_config(config_dict: Mapping[str, Any]) -> Any:
    """The config its ``peft_type`` names, built from a dict (HF PEFT's function); the
    dict is read as an ``adapter_config.json`` is, so HF's metadata keys are accepted."""
    from peftcore.registry import PeftRegistry

    return PeftRegistry.config_from_dict(dict(config_dict))


@reads_model
def get_peft_model_state_dict(
    model: Any,
    state_dict: Optional[Mapping[str, Any]] = None,
    adapter_name: str = DEFAULT_ADAPTER,
    unwrap_compiled: bool = False,
    save_embedding_layers: Union[str, bool] = "auto",
) -> dict[str, Any]:
    """The adapter's tensors under the keys HF PEFT saves them with
    (``base_model.model.<path>.lora_A.weight``...), as the model's framework's tensors
    when its shell can make them (torch), else numpy arrays.

    ``state_dict`` (HF's argument) is accepted and ignored: the tensors are read from the
    model. ``unwrap_compiled`` is HF's and changes nothing; ``save_embedding_layers``
    adds the base model's embedding matrices as ``save_pretrained`` stores them."""
    from peftcore.io import _hf_key

    model._require(adapter_name)
    specs = model.plans[adapter_name].tensor_specs()
    exported = model.export_adapter(adapter_name)
    found = {_hf_key(spec): exported[name] for name, spec in specs.items()}
    found.update(embedding_matrices_to_save(model, adapter_name, save_embedding_layers))
    convert = getattr(model, "_from_numpy", None)
    return {key: (convert(value) if convert else value) for key, value in found.items()}


@changes_model
def set_peft_model_state_dict(
    model: Any,
    peft_model_state_dict: Mapping[str, Any],
    adapter_name: str = DEFAULT_ADAPTER,
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
    *,
    allow_non_finite: bool = False,
) -> IncompatibleKeys:
    """Load tensors keyed as :func:`get_peft_model_state_dict` returns them (or as HF PEFT
    saves them, with or without ``base_model.model.``) into adapter ``adapter_name``.

    Every tensor of the adapter must be there with its shape (else :class:`AdapterError`);
    keys the adapter does not have come back in ``unexpected_keys``. All or nothing:
    every entry (adapter tensors and base parameters, such as a bias trained with
    ``bias="all"``) is checked first (shape; unless ``allow_non_finite``, NaN/Inf, values
    beyond the layer's dtype and overflowing products, as loading a file does), and only
    then is anything written."""
    if ignore_mismatched_sizes:
        raise ValueError("ignore_mismatched_sizes=True is not supported: a tensor of another shape is an error")
    model._require(adapter_name)
    runtime = model.runtime
    arrays = {_strip_adapter_name(key, adapter_name): runtime.to_numpy(value) for key, value in peft_model_state_dict.items()}
    plan = model.plans[adapter_name]
    source = "peft_model_state_dict"
    dtypes = model._layer_dtypes()
    found = match_tensors(plan, arrays, source, strict=False, allow_non_finite=allow_non_finite, dtypes=dtypes)
    if not allow_non_finite:
        check_adapter_gains(plan, found, dtypes, source, hf_key_of(plan))
    known = {key for key in arrays if key in _hf_keys(plan) or HF_PREFIX + key in _hf_keys(plan)}
    base = _base_parameters(model, {key: arrays[key] for key in set(arrays) - known}, allow_non_finite, dtypes)
    with restoring_tensors(model, adapter_name), restoring_base_tensors(runtime, [t for _, t, _ in base]):
        model.import_adapter(adapter_name, found)
        for _, tensor, value in base:
            runtime.write(tensor, value)
    known |= {key for key, _, _ in base}
    return IncompatibleKeys(missing_keys=[], unexpected_keys=sorted(set(arrays) - known))


def _base_parameters(
    model: Any, arrays: Mapping[str, np.ndarray], allow_non_finite: bool, dtypes: Mapping[str, str]
) -> list[tuple[str, Any, np.ndarray]]:
    """The entries of ``arrays`` that name a parameter of the base model
    (``[base_model.model.]<layer path>[.base_layer].<parameter>``, e.g. a bias trained
    with LoRA's ``bias="all"``), which HF PEFT's state-dict loading writes into it, each
    checked: ``(key, base tensor, value)``. Needs the backend's ``base_tensor`` primitive."""
    runtime, graph = model.runtime, model.model_graph
    entries: list[tuple[str, Any, np.ndarray]] = []
    for key, value in arrays.items():
        name = key[len(HF_PREFIX):] if key.startswith(HF_PREFIX) else key
        path, _, parameter = name.rpartition(".")
        if path.endswith(".base_layer"):
            path = path[: -len(".base_layer")]
        if graph is None or path not in graph or parameter not in graph.get(path).params:
            continue
        try:
            tensor = runtime.base_tensor(model.get_base_model(), path, parameter)
        except NotImplementedError:
            return []
        if tensor is None or runtime.numel(tensor) != value.size:
            raise AdapterError(
                f"state dict entry {key!r} has {value.size} values; the model's {path}.{parameter} has "
                f"{'none' if tensor is None else runtime.numel(tensor)}; nothing was written"
            )
        if not allow_non_finite:
            check_values(value, f"entry {key!r}", dtypes.get(path), "peft_model_state_dict")
        entries.append((key, tensor, value))
    return entries


def _hf_keys(plan: Any) -> set[str]:
    from peftcore.io import _hf_key

    return {_hf_key(spec) for spec in plan.tensor_specs().values()}


def _strip_adapter_name(key: str, adapter_name: str) -> str:
    """A module state-dict key (``...lora_A.<adapter>.weight``) as the file key (``...lora_A.weight``)."""
    return key.replace(f".{adapter_name}.", ".") if f".{adapter_name}." in key else key


def check_hf_save_arguments(safe_serialization: bool, save_embedding_layers: Union[str, bool]) -> None:
    """Validate ``save_pretrained``'s HF arguments (see :meth:`PeftModel.save_pretrained`)."""
    if not isinstance(safe_serialization, bool):
        raise ConfigError(f"safe_serialization must be True or False, got {safe_serialization!r}")
    if save_embedding_layers not in ("auto", True, False):
        raise ConfigError(f"save_embedding_layers must be 'auto', True or False, got {save_embedding_layers!r}")


#: The layer names HF PEFT treats as a model's embedding matrices.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def targets_embedding_layers(config: Any, layer_paths: Sequence[str]) -> bool:
    """Whether ``config``'s ``target_modules`` name an embedding layer as HF PEFT decides
    it: a list naming ``embed_tokens``/``lm_head``, or a regex matching such a layer."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str) and targets != "all-linear":
        names = "|".join(EMBEDDING_LAYER_NAMES)
        return any(
            re.fullmatch(targets, path) for path in layer_paths if re.fullmatch(rf"(?:.*\.)?(?:{names})", path)
        )
    return isinstance(targets, (list, tuple, set, frozenset)) and any(name in targets for name in EMBEDDING_LAYER_NAMES)


def embedding_matrices_to_save(model: Any, adapter_name: str, save_embedding_layers: Union[str, bool]) -> dict[str, Any]:
    """The base model's embedding matrices to store beside adapter ``adapter_name`` (HF
    PEFT's ``save_embedding_layers``), under HF's keys (``base_model.model.<embedding
    path>.base_layer.weight`` for an adapted embedding, ``...<path>.weight`` else).

    ``"auto"`` saves them, with a warning, when the config targets an embedding layer;
    ``True`` always (the shell must be able to find the model's input/output embeddings,
    which transformers models have; else a warning and nothing); ``False`` never."""
    graph = model.model_graph
    targeted = targets_embedding_layers(model.peft_config[adapter_name], [node.path for node in graph] if graph else [])
    if save_embedding_layers == "auto":
        if not targeted:
            return {}
        warnings.warn(
            "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
            UserWarning,
            stacklevel=4,
        )
    elif not save_embedding_layers:
        return {}
    find = getattr(model, "_embedding_layers", None)
    layers = find() if callable(find) else None
    if layers is None:
        warnings.warn(
            "Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
            UserWarning,
            stacklevel=4,
        )
        return {}
    chosen = {path: adapted for path, adapted in layers.items() if adapted or not targeted}
    weights = model._base_weights(list(chosen))
    return {
        f"{HF_PREFIX}{path}{'.base_layer' if chosen[path] else ''}.weight": value for path, value in weights.items()
    }


def _is_embedding_matrix(node: Any) -> bool:
    """An embedding layer, or an output head HF PEFT saves as one (``lm_head``, a linear)."""
    return node.kind == "embedding" or (node.kind == "linear" and node.path.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES)


def split_embedding_layers(
    tensors: Mapping[str, np.ndarray], graph: Any, plan: Any, source: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Separate the full embedding matrices HF PEFT saves beside an adapter
    (``save_embedding_layers``: ``<embedding>.base_layer.weight`` for a LoRA-targeted
    embedding, ``<embedding>.weight`` for another) from the adapter's own tensors.

    Returns ``(adapter tensors, {embedding layer path: matrix})``; a matrix whose shape
    is not the layer's is an :class:`AdapterError` (a resized vocabulary must be
    resized in the base model first)."""
    rest: list[str] = []  # keys only: a lazily read file's tensors stay unread (see match_tensors)
    found: dict[str, np.ndarray] = {}
    own = _hf_keys(plan)
    header_spec = getattr(tensors, "spec", None)
    for key in tensors:
        path = key[len(HF_PREFIX):] if key.startswith(HF_PREFIX) else key
        if key in own or HF_PREFIX + key in own:
            rest.append(key)
            continue
        for suffix in (".base_layer.weight", ".weight"):
            layer = path[: -len(suffix)] if path.endswith(suffix) else None
            if layer and layer in graph and _is_embedding_matrix(graph.get(layer)):
                node = graph.get(layer)
                expected = (
                    (node.num_embeddings, node.embedding_dim) if node.kind == "embedding"
                    else (node.out_features, node.in_features)
                )
                shape = header_spec(key)[1] if callable(header_spec) else tensors[key].shape
                if tuple(shape) != tuple(expected):
                    raise AdapterError(
                        f"{source}: embedding matrix {key!r} has shape {tuple(shape)}, layer {layer!r} is "
                        f"{expected}; resize the base model's embeddings first"
                    )
                found[layer] = tensors[key]
                break
        else:
            rest.append(key)
    subset = getattr(tensors, "subset", None)
    return (subset(rest) if callable(subset) else {key: tensors[key] for key in rest}), found
