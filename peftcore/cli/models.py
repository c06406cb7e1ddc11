"""What several commands share: building the model and the config from arguments."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Optional

from peftcore import strict_json
from peftcore.config import PeftConfig
from peftcore.errors import AdapterError, ConfigError, PeftCoreError
from peftcore.graph import ModelGraph
from peftcore.io import MAX_CONFIG_BYTES
from peftcore.plan import RewritePlan
from peftcore.plugins import Backend
from peftcore.safe_files import read_bounded
from peftcore.task_type import TRANSFORMERS_AUTO_CLASSES

_LIST_FIELDS = ("target_modules", "exclude_modules", "modules_to_save")
_REGEX_CHARS = "*.[]()|^$+?\\"


def add_model_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """``--model`` and ``--backend``."""
    parser.add_argument(
        "--model", required=required, metavar="MODULE:FACTORY|DIR",
        help="a callable that builds the model (mypkg.models:build) or a local transformers model directory",
    )
    parser.add_argument(
        "--model-class", metavar="NAME",
        help="for a model directory: the transformers class to load it as (e.g. AutoModelForSequenceClassification; "
        "default: from the adapter config's task_type, else the class its config.json names)",
    )
    parser.add_argument("--backend", help="backend name (default: the one that recognises the model)")


def add_config_arguments(parser: argparse.ArgumentParser, default_method: Optional[str]) -> None:
    """``--config FILE`` or ``--method NAME`` with ``--set KEY=VALUE`` fields."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="FILE", help="an adapter_config.json-style file")
    default = f" (default {default_method})" if default_method else " (default lora when --set is given)"
    source.add_argument("--method", default=default_method, help=f"method name{default}, with --set fields")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="config field: a JSON value, or a,b for a list (repeatable)"
    )


def load_model(spec: str, model_class: Optional[str] = None, task_type: Optional[str] = None) -> Any:
    """Build a model from ``module:factory`` (a callable returning the model, imported
    with the current directory on ``sys.path``) or a local transformers model directory,
    loaded as ``model_class`` (a transformers class name), else as the auto class of
    ``task_type`` (a SEQ_CLS adapter on a plain encoder folder gets its classifier head),
    else as the class its ``config.json`` names, so layer paths match its adapters."""
    if os.path.isdir(spec):
        return _load_model_dir(spec, model_class, task_type)
    if model_class is not None:
        raise ConfigError("--model-class applies to a model directory, not to --model MODULE:FACTORY")
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--model must be MODULE:FACTORY or a model directory, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for --model: {exc}") from None
    finally:
        sys.path.pop(0)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{module_name}:{attr} is not a callable that builds a model")
    return factory()


def _load_model_dir(directory: str, model_class: Optional[str], task_type: Optional[str]) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(f"loading the model directory {directory!r} needs transformers: {exc}") from None
    model_cls = None
    if model_class is not None:
        model_cls = getattr(transformers, model_class, None)
        if not (isinstance(model_cls, type) and hasattr(model_cls, "from_pretrained")):
            raise ConfigError(f"--model-class {model_class!r} is not a transformers model class")
    elif task_type is not None and str(task_type) in TRANSFORMERS_AUTO_CLASSES:
        model_cls = getattr(transformers, TRANSFORMERS_AUTO_CLASSES[str(task_type)])
    try:
        if model_cls is None:
            config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
            names = list(getattr(config, "architectures", None) or [])
            model_cls = getattr(transformers, names[0], None) if names else None
        return (model_cls or transformers.AutoModel).from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a transformers model from {directory!r}: {exc}") from None


def describe(
    args: argparse.Namespace, config: Optional[PeftConfig] = None, task_type: Optional[str] = None
) -> tuple[Any, Backend, ModelGraph]:
    """Build ``--model`` (a directory as ``--model-class``, else as the task type of
    ``config`` or ``task_type``), pick its backend and describe it."""
    from peftcore.plugins import get_plugin_manager

    task = (config.task_type if config is not None else None) or task_type
    model = load_model(args.model, getattr(args, "model_class", None), None if task is None else str(task))
    backend = get_plugin_manager().select_backend(model, backend=args.backend, config=config)
    graph = backend.describe(model)
    if graph is None:
        raise PeftCoreError(f"the {backend.name} model's layers do not know their shapes until its first forward pass")
    return model, backend, graph


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw.split(",") if "," in raw else raw


def build_config(args: argparse.Namespace) -> Optional[PeftConfig]:
    """The config named by ``--config`` or ``--method``/``--set``; None when none is given."""
    from peftcore.registry import PeftRegistry

    if args.config:
        if args.set:
            raise ConfigError("--set applies to --method; edit the --config file instead")
        try:
            data = strict_json.loads(read_bounded(args.config, MAX_CONFIG_BYTES, "config").decode("utf-8"))
        except (AdapterError, UnicodeDecodeError, ValueError) as exc:  # a FIFO, too big, bad JSON
            raise ConfigError(f"cannot read config {args.config!r}: {exc}") from None
        return PeftRegistry.config_from_dict(data)
    method = args.method or ("lora" if args.set else None)
    if method is None:
        return None
    fields = {}
    for item in args.set or ():
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        value = _parse_value(raw)
        if key in _LIST_FIELDS and isinstance(value, str) and value != "all-linear":
            # one name is a list of one, except a target_modules regex
            is_regex = key == "target_modules" and any(c in value for c in _REGEX_CHARS)
            value = value if is_regex else [value]
        fields[key] = value
    return PeftRegistry.get(method)(**fields)


def read_plan_file(path: str) -> RewritePlan:
    """A plan saved by ``peftcore plan --json`` (its ops may be a plugin's: plugins are loaded first)."""
    from peftcore.registry import PeftRegistry

    PeftRegistry.load_plugins()
    try:
        text = read_bounded(path, MAX_CONFIG_BYTES, "plan").decode("utf-8")
    except (AdapterError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read plan {path!r}: {exc}") from None
    try:
        return RewritePlan.from_json(text)
    except PeftCoreError as exc:  # name the file
        raise ConfigError(f"plan {path!r}: {exc}") from None


def adapter_task_type(source: str) -> Optional[str]:
    """The ``task_type`` in ``source``'s ``adapter_config.json`` (an adapter directory),
    or None when it has none or cannot be read (the convert itself then says why)."""
    path = os.path.join(source, "adapter_config.json")
    if not os.path.isfile(path):
        return None
    try:
        data = strict_json.loads(read_bounded(path, MAX_CONFIG_BYTES, "config").decode("utf-8"))
    except (AdapterError, UnicodeDecodeError, ValueError):
        return None
    task = data.get("task_type") if isinstance(data, dict) else None
    return task if isinstance(task, str) else None
