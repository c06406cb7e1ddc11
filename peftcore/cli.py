"""The ``peftcore`` command line.

- ``peftcore plan --model MODULE:FACTORY --method lora --set r=8 --set target_modules=q,v``
  (or ``--config adapter_config.json``): a dry run printing the matched layers, the
  trainable parameter counts and the plan JSON, without changing the model.
- ``peftcore backends``: installed backends and whether each is available.
- ``peftcore demo``: LoRA on scikit-learn's digits with torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Optional, Sequence

from peftcore.errors import ConfigError, PeftCoreError


def load_model(spec: str) -> Any:
    """Build a model from ``module:factory`` (a callable returning the model) or a local
    transformers model directory."""
    if os.path.isdir(spec):
        try:
            from transformers import AutoModel
        except ImportError as exc:
            raise ConfigError(f"loading the model directory {spec!r} needs transformers: {exc}") from None
        return AutoModel.from_pretrained(spec, local_files_only=True)
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


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw.split(",") if "," in raw else raw


def build_config(args: argparse.Namespace) -> Any:
    from peftcore.registry import PeftRegistry

    if args.config:
        try:
            with open(args.config, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config {args.config!r}: {exc}") from None
        return PeftRegistry.config_from_dict(data)
    fields = {}
    for item in args.set or ():
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        value = _parse_value(raw)
        if key in ("target_modules", "exclude_modules", "modules_to_save") and isinstance(value, str) and value != "all-linear":
            value = [value] if key != "target_modules" or not any(c in value for c in "*.[]()|^$+?\\") else value
        fields[key] = value
    return PeftRegistry.get(args.method)(**fields)


def cmd_plan(args: argparse.Namespace) -> int:
    from peftcore.plugins import get_plugin_manager

    model = load_model(args.model)
    config = build_config(args)
    backend = get_plugin_manager().select_backend(model, backend=args.backend, config=config)
    graph = backend.call("peftcore_describe", model=model, example_inputs=None)
    plan = config.plan(graph, args.adapter_name)
    if args.json:
        print(plan.to_json())
        return 0
    total = graph.num_params
    new = plan.num_trainable()
    print(f"backend: {backend.name}   method: {plan.method}   adapter: {plan.adapter_name}")
    print(f"layers adapted: {len(plan.paths)}")
    for op in plan.ops:
        if op.path:
            node = graph.get(op.path)
            print(f"  {op.path:<48} {node.type_name:<14} {op.op:<16} +{op.num_trainable():,}")
    print(f"trainable parameters: {new:,} of {total + new:,} ({100.0 * new / max(total + new, 1):.4f}%)")
    print("plan:")
    print(plan.to_json())
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    from peftcore.plugins import get_plugin_manager

    print(get_plugin_manager().describe_backends())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from peftcore.demo import run_demo

    run_demo(epochs=args.epochs, seed=args.seed, plot=args.plot)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftcore", description="Backend-agnostic parameter-efficient fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="dry run: show what a config would do to a model")
    plan.add_argument("--model", required=True, help="MODULE:FACTORY or a local transformers model directory")
    source = plan.add_mutually_exclusive_group()
    source.add_argument("--config", help="an adapter_config.json-style file")
    source.add_argument("--method", default="lora", help="method name (default lora), with --set fields")
    plan.add_argument("--set", action="append", metavar="KEY=VALUE", help="config field (JSON value, or a,b list)")
    plan.add_argument("--backend", help="backend name (default: detected)")
    plan.add_argument("--adapter-name", default="default")
    plan.add_argument("--json", action="store_true", help="print only the plan JSON")
    plan.set_defaults(func=cmd_plan)

    backends = commands.add_parser("backends", help="list installed backends and their availability")
    backends.set_defaults(func=cmd_backends)

    demo = commands.add_parser("demo", help="LoRA on scikit-learn digits with torch")
    demo.add_argument("--epochs", type=int, default=10, help="LoRA training epochs (default 10)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plot", metavar="PATH", help="save the LoRA loss curve as a PNG (needs matplotlib)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except PeftCoreError as exc:
        print(f"peftcore: error: {exc}", file=sys.stderr)
        return 2
