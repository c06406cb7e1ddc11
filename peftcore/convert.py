"""Convert adapters between layouts, without any framework.

Three layouts meet here:

- **HF PEFT**: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
  ``base_model.model.<layer path>.lora_A.weight``...; no plan.
- **peftcore**: the same two files and keys, plus the rewrite plan under the
  ``peftcore`` key of the safetensors metadata (see :mod:`peftcore.io`).
- **framework checkpoints**, whose layout a backend knows and offers as a
  :class:`~peftcore.runtime.CheckpointFormat` (the ``peftcore_checkpoint_formats`` hook):
  the SINGA backend reads the zip SINGA's ``Model.save_states`` writes
  (:mod:`peftcore_singa.checkpoint` has its naming and layout table), without SINGA
  installed and without unpickling anything.

A converted adapter is read into an :class:`Adapter` (config, plan and canonical
tensors), checked, and written by :func:`save_peftcore_adapter` or
:func:`save_hf_adapter`. :func:`convert` does the three steps.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Union

import numpy as np

from peftcore.config import CONFIG_NAME, PeftConfig
from peftcore.errors import AdapterError, ConfigError
from peftcore.graph import LayerNode, ModelGraph
from peftcore.io import (
    DEFAULT_ADAPTER,
    HF_PREFIX,
    WEIGHTS_NAME,
    check_adapter_name,
    match_tensors,
    read_adapter,
    save_adapter,
)
from peftcore.methods.common import effective_modules_to_save
from peftcore.plan import RewritePlan, check_plan_fits
from peftcore.plugins import get_plugin_manager
from peftcore.runtime import CheckpointFormat
from peftcore.safetensors_writer import safetensors_buffers
from peftcore.save_dir import SaveDirectory
from peftcore.targeting import TargetMatcher

#: ``peft_type`` values Hugging Face PEFT knows. A method whose type is listed writes
#: HF PEFT's config and tensor keys (peftcore's LoRA and prompt tuning do).
HF_PEFT_TYPES = frozenset({
    "LORA", "ADALORA", "LOHA", "LOKR", "OFT", "BOFT", "VERA", "IA3", "LN_TUNING",
    "PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT",
})

#: Config values only peftcore reads, and what HF PEFT spells them as.
_HF_VALUE_SPELLINGS = {"LORA": {"init_lora_weights": {"kaiming": True}}}

_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<name>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


@dataclass(frozen=True)
class Adapter:
    """An adapter in memory: its config, plan and canonical-layout tensors (keyed as
    :meth:`RewritePlan.tensor_specs`), and the layout it was read from."""

    config: PeftConfig
    plan: RewritePlan
    tensors: Mapping[str, np.ndarray]
    layout: str  # "hf", "peftcore" or a checkpoint format's name ("singa")

    @property
    def num_parameters(self) -> int:
        return int(sum(np.asarray(t).size for t in self.tensors.values()))


def checkpoint_format(path: Union[str, os.PathLike]) -> Optional[CheckpointFormat]:
    """The framework checkpoint format (from a backend plugin) that recognises ``path``, if any."""
    for fmt in get_plugin_manager().checkpoint_formats():
        if fmt.recognises(path):
            return fmt
    return None


# -- reading ------------------------------------------------------------------------------
def load_adapter_dir(
    directory: Union[str, os.PathLike], graph: Optional[ModelGraph] = None, strict: bool = True
) -> Adapter:
    """Read an HF PEFT or peftcore adapter directory and check every tensor.

    The plan is the stored one (peftcore), else planned against ``graph``, else, for a
    LoRA adapter, rebuilt from the config and the tensors' names and shapes
    (:func:`plan_from_tensors`). With a ``graph`` the plan is also checked against it.
    """
    directory = os.fspath(directory)
    files = read_adapter(directory)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if files.plan is not None:
        plan = files.plan
    elif graph is not None:
        plan = files.config.loading_plan(graph, DEFAULT_ADAPTER)
    else:
        plan = plan_from_tensors(files.config, files.tensors, weights)
    if graph is not None:
        check_plan_fits(plan, graph, directory)
    tensors = match_tensors(plan, files.tensors, weights, strict)
    return Adapter(files.config, plan, tensors, "peftcore" if files.plan is not None else "hf")


def plan_from_tensors(
    config: PeftConfig, tensors: Mapping[str, np.ndarray], source: str, adapter_name: str = DEFAULT_ADAPTER
) -> RewritePlan:
    """The plan of a LoRA adapter file, from its config and tensors alone (no model).

    Each ``<path>.lora_A.weight`` / ``lora_embedding_A`` pair gives a layer's kind and
    sizes; tensors under a ``modules_to_save`` module give that module's parameters. The
    config then plans against that partial graph, so its targets, rank and alpha patterns
    are applied exactly as they would be on the model.
    """
    if config.method != "lora":
        raise AdapterError(
            f"{source}: a {config.method} adapter without a stored plan can only be planned "
            "against its model (pass --model on the command line, graph= in Python)"
        )
    lora: dict[str, dict[str, np.ndarray]] = {}
    others: dict[str, np.ndarray] = {}
    for key, array in tensors.items():
        bare = key[len(HF_PREFIX):] if key.startswith(HF_PREFIX) else key
        found = _LORA_KEY.match(bare)
        if found:
            lora.setdefault(found["path"], {})[found["name"]] = np.asarray(array)
        else:
            others[bare] = np.asarray(array)
    nodes = [_lora_node(path, parts, source) for path, parts in lora.items()]
    nodes.extend(_saved_module_nodes(config, others, source))
    graph = ModelGraph(layers=tuple(sorted(nodes, key=lambda n: _natural_key(n.path))))
    if getattr(config, "target_modules", None) is None:  # the model-type default needs the model
        config = config.replace(target_modules=sorted(lora))
    return config.loading_plan(graph, adapter_name)


#: HF PEFT's names of a LoRA layer's (A, B) tensors, by layer kind.
_LORA_TENSOR_NAMES = {"linear": ("lora_A.weight", "lora_B.weight"), "embedding": ("lora_embedding_A", "lora_embedding_B")}


def _lora_node(path: str, parts: Mapping[str, np.ndarray], source: str) -> LayerNode:
    names = set(parts)
    kind = next((k for k, a_and_b in _LORA_TENSOR_NAMES.items() if names == set(a_and_b)), None)
    if kind is None:
        raise AdapterError(f"{source}: layer {path!r} has LoRA tensors {sorted(names)}, expected one A and one B")
    a, b = (parts[name] for name in _LORA_TENSOR_NAMES[kind])
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(
            f"{source}: layer {path!r} has LoRA A of shape {a.shape} and B of shape {b.shape}; "
            "expected A (r, in) and B (out, r); a convolution's LoRA (A and B of 3 to 5 dims) is planned only "
            "against its model, which gives the layer's stride and padding (pass --model, or graph= in Python)"
        )
    in_f, out_f = int(a.shape[1]), int(b.shape[0])
    if kind == "embedding":
        return LayerNode(path, "embedding", num_embeddings=in_f, embedding_dim=out_f, params={"weight": (in_f, out_f)})
    return LayerNode(path, "linear", in_features=in_f, out_features=out_f, params={"weight": (out_f, in_f)})


def _saved_module_nodes(config: PeftConfig, others: Mapping[str, np.ndarray], source: str) -> list[LayerNode]:
    """One node per ``modules_to_save`` module, owning every parameter under it."""
    names = effective_modules_to_save(config.task_type, getattr(config, "modules_to_save", None)) or []
    modules: dict[str, dict[str, tuple]] = {}
    saved = TargetMatcher(names)
    for key, array in others.items():
        parts = key.split(".")
        module = next((".".join(parts[:i]) for i in range(1, len(parts)) if saved(".".join(parts[:i]))), None)
        if module is None:
            raise AdapterError(
                f"{source}: tensor {key!r} is neither a LoRA tensor nor under a modules_to_save module "
                f"({names or 'none configured'})"
            )
        modules.setdefault(module, {})[key[len(module) + 1:]] = tuple(int(d) for d in array.shape)
    return [LayerNode(path, "other", params=params) for path, params in modules.items()]


def _natural_key(path: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


def load_checkpoint(
    path: Union[str, os.PathLike],
    fmt: CheckpointFormat,
    config: PeftConfig,
    plan: Optional[RewritePlan] = None,
    graph: Optional[ModelGraph] = None,
    adapter_name: Optional[str] = None,
) -> Adapter:
    """Read one adapter's tensors from a framework checkpoint of format ``fmt`` (a SINGA
    ``save_states`` zip, say), in canonical layout.

    The plan is ``plan`` (e.g. from ``peftcore plan --json``) or ``config`` planned
    against ``graph`` (the model's, from any backend with the same layer paths).
    ``adapter_name`` picks the adapter in the checkpoint (default: its only one).
    """
    if plan is None:
        if graph is None:
            raise AdapterError(
                f"{os.fspath(path)}: converting a {fmt.description} needs the adapter's plan: pass the model "
                "(--model, or graph= in Python) or a plan file (--plan, from `peftcore plan --json`)"
            )
        plan = config.loading_plan(graph, DEFAULT_ADAPTER)
    elif plan.method != config.method:
        raise ConfigError(f"the plan is for method {plan.method!r} but the config is {config.method!r}")
    if graph is not None:
        check_plan_fits(plan, graph, os.fspath(path))
    name, tensors = fmt.adapter_tensors(os.fspath(path), plan, adapter_name, graph)
    plan = plan.with_adapter_name(name)
    return Adapter(config, plan, tensors, fmt.name)


# -- writing ------------------------------------------------------------------------------
def save_peftcore_adapter(directory: Union[str, os.PathLike], adapter: Adapter) -> None:
    """Write ``adapter`` in peftcore's layout (HF PEFT's files plus the stored plan)."""
    save_adapter(os.fspath(directory), adapter.config, adapter.plan, adapter.tensors)


def check_hf_compatible(config: PeftConfig) -> None:
    """Raise :class:`AdapterError` unless HF PEFT can load an adapter of this config."""
    if config.peft_type in HF_PEFT_TYPES:
        return
    baked = config.baked()
    hint = (
        f"; bake it first (PeftModel.bake()) to get a plain {baked.method} adapter"
        if baked.peft_type in HF_PEFT_TYPES and baked is not config else ""
    )
    raise AdapterError(
        f"HF PEFT has no '{config.peft_type}' method, so a {config.method} adapter cannot be written "
        f"in its layout{hint}"
    )


def hf_config_dict(config: PeftConfig) -> dict:
    """``config`` as HF PEFT's ``adapter_config.json`` (peftcore-only spellings replaced)."""
    check_hf_compatible(config)
    data = config.to_dict()
    for key, spellings in _HF_VALUE_SPELLINGS.get(config.peft_type, {}).items():
        value = data.get(key)
        if isinstance(value, str) and value in spellings:
            data[key] = spellings[value]
    return data


def save_hf_adapter(directory: Union[str, os.PathLike], adapter: Adapter) -> None:
    """Write ``adapter`` as HF PEFT writes it: no peftcore metadata, HF config values;
    all or nothing, through :class:`~peftcore.save_dir.SaveDirectory`."""
    config_text = json.dumps(hf_config_dict(adapter.config), indent=2, sort_keys=True)
    tensors = {
        (spec.hf_name if spec.hf_root else HF_PREFIX + spec.hf_name): np.ascontiguousarray(adapter.tensors[name])
        for name, spec in adapter.plan.tensor_specs().items()
    }
    with SaveDirectory.open(directory) as folder:
        folder.write_files([
            (None, CONFIG_NAME, config_text.encode("utf-8")),
            (None, WEIGHTS_NAME, lambda: safetensors_buffers(tensors, {"format": "pt"})),
        ])


# -- the whole conversion -----------------------------------------------------------------
def convert(
    source: Union[str, os.PathLike],
    destination: Union[str, os.PathLike],
    to: str = "peftcore",
    *,
    graph: Optional[ModelGraph] = None,
    config: Optional[PeftConfig] = None,
    plan: Optional[RewritePlan] = None,
    adapter_name: Optional[str] = None,
    overwrite: bool = False,
    strict: bool = True,
    rename: Optional[Mapping[str, str]] = None,
) -> Adapter:
    """Read the adapter at ``source`` (either adapter layout or a SINGA checkpoint) and
    write it to the directory ``destination`` in layout ``to`` (``"peftcore"`` or ``"hf"``).

    Adapter directories need nothing else (``graph`` adds a check against the model and
    is needed to plan a non-LoRA HF adapter). A SINGA checkpoint needs ``config`` and
    either ``plan`` or ``graph``. ``rename`` maps layer paths of the source to those of
    the model the adapter is for (:func:`rename_layers`); ``graph`` is then that model's.
    Returns the adapter as written.
    """
    if to not in ("peftcore", "hf"):
        raise ConfigError(f"cannot convert to {to!r}; choose 'peftcore' or 'hf'")
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    _check_destination(os.fspath(destination), overwrite)
    fmt = None if os.path.isdir(source) else checkpoint_format(source)
    if fmt is not None:
        if config is None:
            raise ConfigError(f"converting a {fmt.description} needs the adapter's config (--config, or --method/--set)")
        adapter = load_checkpoint(source, fmt, config, plan, graph, adapter_name)
    elif os.path.isdir(source):
        if config is not None or plan is not None or adapter_name is not None:
            raise ConfigError("an adapter directory carries its own config; --config, --method/--set, --plan and "
                              "--adapter-name apply to framework checkpoints (SINGA's save_states) only")
        adapter = load_adapter_dir(source, None if rename else graph, strict)
    elif os.path.exists(source):
        known = "; ".join(f.description for f in get_plugin_manager().checkpoint_formats()) or "none installed"
        raise AdapterError(
            f"{os.fspath(source)} is neither an adapter directory nor a checkpoint format a backend reads ({known})"
        )
    else:
        raise AdapterError(f"{os.fspath(source)} does not exist")
    if rename:
        adapter = rename_layers(adapter, rename)
        if graph is not None:
            check_plan_fits(adapter.plan, graph, os.fspath(source))
    if to == "hf":
        save_hf_adapter(destination, adapter)
    else:
        save_peftcore_adapter(destination, adapter)
    return adapter


def rename_layers(adapter: Adapter, names: Mapping[str, str]) -> Adapter:
    """``adapter`` with its layer paths renamed (``{old path: new path}``): its plan's ops,
    its tensors' keys and its config's ``target_modules`` (the renamed layers' new paths).

    For an adapter trained on one form of a model and used on another: a model imported
    from ONNX (SINGA's ``sonnx`` names layers by ONNX node, ``/0/Gemm``) and the torch
    model it was exported from (``0``). Every old path must be a path the plan adapts.
    """
    known = {op.path for op in adapter.plan.ops if op.path}
    unknown = sorted(set(names) - known)
    if unknown:
        raise AdapterError(f"cannot rename {unknown}: the adapter adapts no such layer (it adapts {sorted(known)})")
    for old, new in names.items():
        if not isinstance(new, str) or not new:
            raise AdapterError(f"the new path for {old!r} must be a non-empty string, got {new!r}")
    ops = [replace(op, path=names.get(op.path, op.path)) if op.path else op for op in adapter.plan.ops]
    new_paths = [op.path for op in ops if op.path]
    if len(set(new_paths)) != len(new_paths):
        raise AdapterError(f"renaming gives two ops the same layer path: {sorted(new_paths)}")
    plan = replace(adapter.plan, ops=tuple(ops))
    keys = dict(zip(adapter.plan.tensor_specs(), plan.tensor_specs()))
    tensors = {keys.get(key, key): value for key, value in adapter.tensors.items()}
    config = adapter.config
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, list):  # entries naming a renamed layer follow it
        config = config.replace(target_modules=[names.get(t, t) for t in targets])
    elif isinstance(targets, str):  # a regex written for the old names: the new paths, listed
        config = config.replace(target_modules=sorted({op.path for op in ops if op.path and op.op != "modules_to_save"}))
    return Adapter(config, plan, tensors, adapter.layout)


def _check_destination(destination: str, overwrite: bool) -> None:
    if os.path.exists(destination) and not os.path.isdir(destination):
        raise AdapterError(f"{destination} exists and is not a directory")
    taken = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if os.path.exists(os.path.join(destination, n))]
    if taken and not overwrite:
        raise AdapterError(f"{destination} already holds an adapter ({', '.join(taken)}); pass --force to overwrite")
