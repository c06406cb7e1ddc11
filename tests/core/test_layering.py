"""The import graph: no cycles, and the layering of docs/architecture.md ("The layers").

How the graph is read (statically, with :mod:`ast`; nothing is imported):

- An import-time edge is an import that runs when its module is imported: a statement
  at module level, also inside a module-level ``if``/``try``/``with`` or a class body.
  Imports inside a function run later, when the function is called, and imports under
  ``if TYPE_CHECKING:`` never run, so neither is an import-time edge. A cycle of
  import-time edges is a real import cycle: which module breaks depends on which is
  imported first.
- A deferred edge is an import inside a function or under ``TYPE_CHECKING``. It cannot
  break an import, but a cycle through one is a layering cycle all the same (a lower
  module reaching up), the kind a lazy import hides, so the graph of all edges must be
  acyclic too.
- ``import a.b.c`` and ``from a.b.c import x`` are an edge to ``a.b.c``; ``from a.b
  import c`` is an edge to ``a.b.c`` when ``c`` is a module, else to ``a.b``. The package
  ``__init__`` that Python runs first on the way to a submodule is not an edge (every
  module would otherwise lead back to ``peftcore/__init__.py``, which imports them all).
- Cycles are looked for among ``peftcore``'s modules, and separately among each
  backend package's own modules.

A backend never imports ``peftcore.api`` (nor its names through ``peftcore``), at any
level: functions and ``TYPE_CHECKING`` blocks included. Every core module, found by
walking the package, belongs to exactly one layer of the list in docs/architecture.md,
and imports no module of a higher layer, at any level.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "peftcore": ROOT / "peftcore",
    "peftcore_torch": ROOT / "backends" / "torch" / "peftcore_torch",
    "peftcore_singa": ROOT / "backends" / "singa" / "peftcore_singa",
}
BACKENDS = ("peftcore_torch", "peftcore_singa")

ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _layers() -> list[list[str]]:
    """docs/architecture.md's layers, lowest first, as dotted names: the numbered lines of
    its ```layers block (``methods.*`` covers a package's modules, ``__init__`` is the
    package itself)."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    block = re.search(r"^```layers\n(.*?)^```", text, re.M | re.S)
    assert block, f"{ARCHITECTURE} has no ```layers block"
    layers = []
    for number, line in enumerate(block.group(1).strip().splitlines()):
        match = re.fullmatch(r"(\d+)\. (.+)", line.strip())
        assert match and int(match.group(1)) == number, f"bad layer line {line!r} in {ARCHITECTURE}"
        names = [name.strip() for name in match.group(2).split(",")]
        layers.append(["peftcore" if n == "__init__" else f"peftcore.{n}" for n in names])
    return layers


def _modules(package: str) -> dict[str, Path]:
    """Every module of ``package``, by dotted name."""
    root = PACKAGES[package]
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, everywhere: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements of a module: those that run on import, or (``everywhere``) all."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not everywhere:
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test) and not everywhere:
            yield from (i for child in node.orelse for i in _imports(ast.Module([child], []), everywhere))
        else:
            yield from _imports(node, everywhere)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The modules an import statement names (resolved; relative imports included)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def _graph(package: str, everywhere: bool = False) -> dict[str, set[str]]:
    modules = _modules(package)
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {
            target
            for node in _imports(tree, everywhere)
            for target in _targets(node, name, is_package, known)
            if target in known and target != name
        }
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _describe(graph: dict[str, set[str]], cycle: list[str]) -> str:
    members = set(cycle)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in cycle)


@pytest.mark.parametrize("everywhere", [False, True], ids=["import-time", "with-deferred"])
@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle(package: str, everywhere: bool) -> None:
    graph = _graph(package, everywhere)
    assert len(graph) > 3, f"found no modules of {package} under {PACKAGES[package]}"
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(graph, c) for c in cycles)


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    code = "import x\nif TYPE_CHECKING:\n    import y\ndef f():\n    import z\nclass C:\n    import w\n"
    names = [a.name for node in _imports(ast.parse(code), everywhere=False) for a in node.names]
    assert names == ["x", "w"]
    assert len(list(_imports(ast.parse(code), everywhere=True))) == 4


def _covers(name: str, module: str) -> bool:
    return module == name or (name.endswith(".*") and module.startswith(name[:-1]))


def _layer_of() -> dict[str, int]:
    """Each core module's layer (every module of the package, found by walking it)."""
    layers = _layers()
    found = {}
    for module in _modules("peftcore"):
        ranks = [rank for rank, names in enumerate(layers) if any(_covers(n, module) for n in names)]
        assert len(ranks) == 1, f"{module} is in {len(ranks)} layers of {ARCHITECTURE} (it must be in one)"
        found[module] = ranks[0]
    return found


def test_every_core_module_is_in_exactly_one_layer_and_every_layer_name_is_a_module() -> None:
    modules = set(_modules("peftcore"))
    assert len(modules) > 30
    assert set(_layer_of()) == modules
    stale = [n for names in _layers() for n in names if not any(_covers(n, m) for m in modules)]
    assert not stale, f"{ARCHITECTURE} lists modules that do not exist: {stale}"


def _upward(graph: dict[str, set[str]], rank: dict[str, int]) -> list[str]:
    return [
        f"{module} (layer {rank[module]}) -> {target} (layer {rank[target]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if rank[target] > rank[module]
    ]


def test_core_modules_do_not_import_upward() -> None:
    upward = _upward(_graph("peftcore", everywhere=True), _layer_of())
    assert not upward, f"imports against the layering of docs/architecture.md: {upward}"


def test_the_layer_check_finds_an_upward_import() -> None:
    assert _covers("peftcore.methods.*", "peftcore.methods.lora") and not _covers("peftcore.methods.*", "peftcore.methods")
    rank = _layer_of()
    assert _upward({"peftcore.errors": {"peftcore.api"}, "peftcore.api": {"peftcore.errors"}}, rank) == [
        f"peftcore.errors (layer {rank['peftcore.errors']}) -> peftcore.api (layer {rank['peftcore.api']})"
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_do_not_import_the_api(backend: str) -> None:
    init = ast.parse((PACKAGES["peftcore"] / "__init__.py").read_text(encoding="utf-8"))
    api_names = {
        alias.asname or alias.name
        for node in ast.walk(init)
        if isinstance(node, ast.ImportFrom) and node.module == "peftcore.api"
        for alias in node.names
    }
    offenders = []
    for name, path in _modules(backend).items():
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")), everywhere=True):
            if isinstance(node, ast.Import):
                bad = [a.name for a in node.names if a.name == "peftcore.api" or a.name.startswith("peftcore.api.")]
            elif node.module == "peftcore.api" or (node.module or "").startswith("peftcore.api."):
                bad = [node.module or ""]
            elif node.module == "peftcore":
                bad = [a.name for a in node.names if a.name == "api" or a.name in api_names]
            else:
                bad = []
            offenders.extend(f"{name} (line {node.lineno}): {b}" for b in bad)
    assert not offenders, f"{backend} imports peftcore.api: {offenders}"


def test_deserialising_a_plan_loads_no_plugin() -> None:
    code = (
        "import sys\n"
        "from peftcore import LayerNode, LoraConfig, ModelGraph, PlanError, RewritePlan\n"
        "graph = ModelGraph(layers=(LayerNode('fc', 'linear', in_features=3, out_features=5),))\n"
        "plan = LoraConfig(r=2, target_modules=['fc']).plan(graph)\n"
        "assert RewritePlan.from_json(plan.to_json()) == plan\n"
        "try:\n"
        "    RewritePlan.from_dict({'method': 'x', 'adapter_name': 'a', 'ops': [{'op': 'not_an_op'}]})\n"
        "except PlanError:\n"
        "    pass\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('peftcore_torch', 'peftcore_singa', 'peftcore_ia3')]\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"deserialising a plan loaded plugins: {out.stdout.strip()}"
