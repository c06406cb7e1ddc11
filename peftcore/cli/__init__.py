"""The ``peftcore`` command line (also ``python -m peftcore``).

- ``peftcore backends [--json]``: installed backends, whether each can run here (and why
  not), its framework version and the methods it builds.
- ``peftcore inspect --model MODEL [--method lora --set r=8 ... | --config FILE]``: the
  layer tree, with the layers the config targets marked and their trainable counts.
- ``peftcore plan --model MODEL ...``: a dry run printing the matched layers, the
  trainable parameter counts and the plan JSON, without changing the model.
- ``peftcore convert SOURCE DEST [--to peftcore|hf]``: an HF PEFT adapter to peftcore's
  layout (the plan embedded) and back, or a SINGA ``save_states`` checkpoint's adapter
  to either (see :mod:`peftcore.convert`).
- ``peftcore demo [--plot loss.png]``: LoRA on scikit-learn's digits with torch.

MODEL is ``module:factory`` (a callable that builds the model) or a local transformers
model directory. Errors print one line, ``peftcore: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

from peftcore import __version__
from peftcore.cli.models import (
    adapter_task_type,
    add_config_arguments,
    add_model_arguments,
    build_config,
    describe,
    load_model,
    read_plan_file,
)
from peftcore.errors import ConfigError, PeftCoreError

__all__ = ["load_model", "main", "make_parser"]


def cmd_plan(args: argparse.Namespace) -> int:
    config = build_config(args)
    if config is None:
        raise ConfigError("plan needs a config: --config FILE, or --method NAME with --set fields")
    _, backend, graph = describe(args, config)
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


def cmd_inspect(args: argparse.Namespace) -> int:
    from peftcore.cli.tree import build_tree, render_summary, render_tree, tree_json

    config = build_config(args)
    model, backend, graph = describe(args, config)
    plan = config.plan(graph, args.adapter_name) if config is not None else None
    root = build_tree(graph, plan, type(model).__name__)
    if args.json:
        print(json.dumps(tree_json(root, graph, backend.name, plan), indent=2))
        return 0
    lines = render_tree(root, args.max_depth, ascii_only=not _can_print("├└│"))
    print("\n".join(lines + [""] + render_summary(root, graph, backend.name, plan)))
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    from peftcore.cli.backends import backend_records, other_plugins, render_backends
    from peftcore.plugins import get_plugin_manager

    manager = get_plugin_manager()
    records, others = backend_records(manager), other_plugins(manager)
    if args.json:
        print(json.dumps({"backends": records, "other_plugins": others}, indent=2))
    else:
        print("\n".join(render_backends(records, others)))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from peftcore.convert import convert
    from peftcore.plugins import get_plugin_manager

    config = build_config(args)
    plan = read_plan_file(args.plan) if args.plan else None
    graph = describe(args, config, adapter_task_type(args.source))[2] if args.model else None
    rename = {}
    for item in args.rename:
        old, sep, new = item.rpartition("=")
        if not sep or not old or not new:
            raise ConfigError(f"--rename takes OLD=NEW, got {item!r}")
        rename[old] = new
    adapter = convert(
        args.source, args.destination, args.to, graph=graph, config=config, plan=plan,
        adapter_name=args.adapter_name, overwrite=args.force, rename=rename or None,
    )
    names = {"hf": "HF PEFT adapter", "peftcore": "peftcore adapter", "singa": "SINGA checkpoint"}
    names.update({fmt.name: fmt.description for fmt in get_plugin_manager().checkpoint_formats() if fmt.name not in names})
    ops = [op for op in adapter.plan.ops if op.path]
    print(f"{args.source} ({names[adapter.layout]}) -> {args.destination} ({names[args.to]})")
    print(
        f"  {adapter.plan.method} adapter {adapter.plan.adapter_name!r}: {len(ops)} layer op(s), "
        f"{len(adapter.tensors)} tensors, {adapter.num_parameters:,} parameters"
    )
    for op in ops:
        print(f"    {op.path:<44} {op.op}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from peftcore.demo import run_demo

    run_demo(epochs=args.epochs, seed=args.seed, plot=args.plot)
    return 0


_ADAPTER_NAME_HELP = "the adapter's name in the plan (default: default)"

_EXAMPLES = {
    "backends": ["peftcore backends", "peftcore backends --json"],
    "inspect": [
        "peftcore inspect --model examples.tiny_models:tiny_llama --set target_modules=q_proj,v_proj --max-depth 2",
        "peftcore inspect --model ./my-bert-dir --config adapter_config.json --json",
    ],
    "plan": [
        "peftcore plan --model examples.tiny_models:tiny_llama --set r=8 --set target_modules=all-linear",
        "peftcore plan --model examples.tiny_models:tiny_llama --method prompt_tuning --set num_virtual_tokens=8 --json",
    ],
    "convert": [
        "peftcore convert hf_adapter/ pc_adapter/",
        "peftcore convert pc_adapter/ hf_adapter/ --to hf",
        "peftcore convert ckpt.zip pc_adapter/ --config adapter_config.json --plan plan.json",
    ],
    "demo": ["peftcore demo", "peftcore demo --epochs 20 --seed 1 --plot loss.png"],
}


def _add_command(
    commands: Any, name: str, summary: str, description: Optional[str] = None
) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` ends with its examples."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in _EXAMPLES[name])
    return commands.add_parser(
        name, help=summary, description=description or summary[:1].upper() + summary[1:] + ".",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def make_parser() -> argparse.ArgumentParser:
    """The ``peftcore`` argument parser, with every command."""
    parser = argparse.ArgumentParser(
        prog="peftcore", description="Backend-agnostic parameter-efficient fine-tuning.",
        epilog="examples:\n" + "\n".join(f"  {examples[0]}" for examples in _EXAMPLES.values())
        + "\n\n`peftcore COMMAND --help` shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    backends = _add_command(commands, "backends", "installed backends, their state and the methods they build")
    backends.add_argument("--json", action="store_true", help="machine-readable output")
    backends.set_defaults(func=cmd_backends)

    inspect = _add_command(commands, "inspect", "the model's layer tree, with what a config would adapt")
    add_model_arguments(inspect, required=True)
    add_config_arguments(inspect, default_method=None)
    inspect.add_argument("--adapter-name", default="default", metavar="NAME", help=_ADAPTER_NAME_HELP)
    inspect.add_argument("--max-depth", type=int, metavar="N", help="fold layers nested deeper than N")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=cmd_inspect)

    plan = _add_command(commands, "plan", "dry run: show what a config would do to a model")
    add_model_arguments(plan, required=True)
    add_config_arguments(plan, default_method="lora")
    plan.add_argument("--adapter-name", default="default", metavar="NAME", help=_ADAPTER_NAME_HELP)
    plan.add_argument("--json", action="store_true", help="print only the plan JSON")
    plan.set_defaults(func=cmd_plan)

    convert = _add_command(
        commands, "convert", "convert an adapter: HF PEFT <-> peftcore, or a SINGA checkpoint's adapter",
        description="Convert SOURCE (an adapter directory or a SINGA save_states zip) into the adapter\n"
        "directory DEST. A SINGA checkpoint needs the adapter's config and its plan (--plan, or --model).",
    )
    convert.add_argument("source", metavar="SOURCE", help="adapter directory (HF PEFT or peftcore) or SINGA save_states zip")
    convert.add_argument("destination", metavar="DEST", help="directory to write the adapter to")
    convert.add_argument("--to", choices=("peftcore", "hf"), default="peftcore", help="layout to write (default peftcore)")
    add_model_arguments(convert, required=False)
    add_config_arguments(convert, default_method=None)
    convert.add_argument("--plan", metavar="FILE", help="the adapter's plan (from `peftcore plan --json`), for SINGA")
    convert.add_argument("--adapter-name", metavar="NAME", help="which adapter of a SINGA checkpoint (default: its only one)")
    convert.add_argument("--force", action="store_true", help="overwrite an adapter already in DEST")
    convert.add_argument(
        "--rename", metavar="OLD=NEW", action="append", default=[],
        help="rename a layer path (repeatable), e.g. an ONNX node name to the torch module path: --rename /0/Gemm=0",
    )
    convert.set_defaults(func=cmd_convert)

    demo = _add_command(commands, "demo", "LoRA on scikit-learn digits with torch")
    demo.add_argument("--epochs", type=int, default=10, metavar="N", help="LoRA training epochs (default 10)")
    demo.add_argument("--seed", type=int, default=0, metavar="N", help="random seed for the data split and the weights (default 0)")
    demo.add_argument("--plot", metavar="PATH", help="save the loss curve (base and LoRA training) as a PNG; needs matplotlib")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (2 for a peftcore error)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no command: say what there is
        parser.print_help()
        return 0
    try:
        if getattr(args, "max_depth", None) is not None and args.max_depth < 0:
            raise ConfigError("--max-depth must be 0 or more")
        return int(args.func(args))
    except PeftCoreError as exc:
        print(f"peftcore: error: {exc}", file=sys.stderr)
        return 2


def _can_print(text: str) -> bool:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True
