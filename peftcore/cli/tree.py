"""``peftcore inspect``: a model's layer tree, with what an adapter plan does to each layer.

Built from the :class:`~peftcore.graph.ModelGraph` and, when a config is given, its
:class:`~peftcore.plan.RewritePlan`: each op's ``num_trainable()`` and
``tensor_specs()`` give the per-layer counts, so the numbers are the planner's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Optional

from peftcore.graph import LayerNode, ModelGraph
from peftcore.plan import PlanOp, RewritePlan

UNICODE_GLYPHS = ("├── ", "└── ", "│   ", "    ")
ASCII_GLYPHS = ("|-- ", "`-- ", "|   ", "    ")
MARK = "*"


@dataclass
class TreeNode:
    """One layer in the tree: its IR node (None for the model itself) and its children."""

    name: str
    layer: Optional[LayerNode]
    children: list[TreeNode] = field(default_factory=list)
    ops: list[PlanOp] = field(default_factory=list)

    def walk(self) -> list[TreeNode]:
        """This node and every node under it, depth first."""
        found = [self]
        for child in self.children:
            found.extend(child.walk())
        return found

    # Totals are cached (a model can have thousands of layers); they are read only after
    # build_tree has attached the plan's ops.
    @cached_property
    def own_params(self) -> int:
        return self.layer.num_params if self.layer is not None else 0

    @cached_property
    def total_params(self) -> int:
        return self.own_params + sum(child.total_params for child in self.children)

    @cached_property
    def total_trainable(self) -> int:
        return sum(op.num_trainable() for op in self.ops) + sum(child.total_trainable for child in self.children)

    @cached_property
    def size_below(self) -> int:
        """How many layers are nested under this one."""
        return sum(1 + child.size_below for child in self.children)

    @cached_property
    def adapted_below(self) -> int:
        """How many layers under this one the plan adapts."""
        return sum(bool(child.ops) + child.adapted_below for child in self.children)


def build_tree(graph: ModelGraph, plan: Optional[RewritePlan], root_name: str) -> TreeNode:
    """Nest the graph's layers by path: a layer's parent is its longest path prefix in the
    graph (the model itself when none is), so a missing container level does not hide it."""
    root = TreeNode(root_name, None)
    nodes: dict[str, TreeNode] = {}
    for layer in graph:
        parent_path = _parent_in(layer.path, nodes)
        parent = nodes[parent_path] if parent_path else root
        name = layer.path[len(parent_path) + 1:] if parent_path else layer.path
        nodes[layer.path] = TreeNode(name, layer)
        parent.children.append(nodes[layer.path])
    for op in plan.ops if plan else ():
        (nodes[op.path] if op.path in nodes else root).ops.append(op)
    return root


def _parent_in(path: str, nodes: dict[str, TreeNode]) -> str:
    parts = path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in nodes:
            return candidate
    return ""


def shape_summary(layer: Optional[LayerNode]) -> str:
    """``64 -> 256`` for a linear, ``128 x 64`` for an embedding, parameter shapes otherwise."""
    if layer is None:
        return ""
    if layer.kind == "linear" and layer.in_features and layer.out_features:
        return f"{layer.in_features} -> {layer.out_features}"
    if layer.kind == "embedding" and layer.num_embeddings and layer.embedding_dim:
        return f"{layer.num_embeddings} x {layer.embedding_dim}"
    return ", ".join(f"{name} {'x'.join(str(d) for d in shape) or 'scalar'}" for name, shape in layer.params.items())


def op_summary(op: PlanOp) -> str:
    """``lora r=8`` (the rank when the op has one), else the op name."""
    rank = getattr(op, "r", None)
    return f"{op.op} r={rank}" if isinstance(rank, int) else op.op


def render_tree(root: TreeNode, max_depth: Optional[int] = None, ascii_only: bool = False) -> list[str]:
    """The tree as aligned text lines: name, layer type, shape, parameters, adapter."""
    tee, last, pipe, blank = ASCII_GLYPHS if ascii_only else UNICODE_GLYPHS
    rows: list[tuple[str, ...]] = [("layer", "type", "shape", "params", "adapter", "trainable")]

    def visit(node: TreeNode, prefix: str, branch: str, depth: int) -> None:
        collapsed = max_depth is not None and depth >= max_depth and bool(node.children)
        marks = [op_summary(op) for op in node.ops if node.layer is not None]
        if collapsed and node.adapted_below:
            marks.append(f"{node.adapted_below} adapted inside")
        own = sum(op.num_trainable() for op in node.ops)
        shown = node.total_trainable if (collapsed or node.layer is None) else own
        type_name = (node.layer.type_name or node.layer.kind) if node.layer is not None else "model"
        rows.append((
            prefix + branch + node.name + (f" (+{node.size_below} inside)" if collapsed else ""),
            type_name,
            shape_summary(node.layer),
            f"{node.total_params:,}",
            f"{MARK} {', '.join(marks)}" if marks else "",
            f"+{shown:,}" if shown else "",
        ))
        if collapsed:
            return
        child_prefix = prefix + (blank if branch in (last, "") else pipe) if depth else ""
        for index, child in enumerate(node.children):
            visit(child, child_prefix, last if index == len(node.children) - 1 else tee, depth + 1)

    visit(root, "", "", 0)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {3, 5}
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_summary(root: TreeNode, graph: ModelGraph, backend: str, plan: Optional[RewritePlan]) -> list[str]:
    """The totals under the tree."""
    base = graph.num_params
    header = f"model: {root.name} (backend {backend}" + (f", model type {graph.model_type}" if graph.model_type else "")
    lines = [f"{header}): {len(graph)} layers, {base:,} parameters"]
    if plan is None:
        lines.append("no config given: pass --method/--set or --config to see what an adapter would change")
        return lines
    adapted = [n for n in root.walk() if n.ops and n.layer is not None]
    added = plan.num_trainable()
    model_ops = ", ".join(op.op for op in plan.ops if not op.path)
    lines.append(
        f"adapter {plan.adapter_name!r} ({plan.method}): {MARK} {len(adapted)} layers, +{added:,} trainable parameters"
        + (f"; on the whole model: {model_ops}" if model_ops else "")
    )
    share = 100.0 * added / max(base + added, 1)
    lines.append(f"trainable: {added:,} of {base + added:,} parameters ({share:.4f}%)")
    return lines


def tree_json(root: TreeNode, graph: ModelGraph, backend: str, plan: Optional[RewritePlan]) -> dict[str, Any]:
    """The same information for programs: every layer with its ops and their tensors."""
    layers = []
    for node in root.walk()[1:]:
        assert node.layer is not None
        layers.append({
            **node.layer.to_dict(),
            "num_params": node.own_params,
            "subtree_params": node.total_params,
            "ops": [
                {"op": op.op, "trainable": op.num_trainable(),
                 "tensors": {name: list(spec.shape) for name, spec in op.tensor_specs().items()}}
                for op in node.ops
            ],
        })
    added = plan.num_trainable() if plan else 0
    return {
        "model": root.name,
        "backend": backend,
        "model_type": graph.model_type,
        "layers": layers,
        "plan": plan.to_dict() if plan else None,
        "totals": {
            "base_params": graph.num_params,
            "trainable_params": added,
            "layers_adapted": sum(1 for n in root.walk()[1:] if n.ops),
        },
    }
