"""Planning pieces several methods share."""

from __future__ import annotations

from typing import Optional, Sequence

from peftcore.config import check
from peftcore.errors import TargetNotFoundError, closest
from peftcore.graph import ModelGraph
from peftcore.plan import SaveModule
from peftcore.targeting import matches


def validate_modules_to_save(owner: str, modules: Optional[Sequence[str]]) -> None:
    """``modules_to_save`` is None or a list of non-empty layer names."""
    if modules is None:
        return
    check(
        isinstance(modules, (list, tuple)) and all(isinstance(m, str) and m for m in modules),
        f"{owner}.modules_to_save must be a list of layer names, got {modules!r}",
    )


def modules_to_save_ops(graph: ModelGraph, modules: Optional[Sequence[str]], owner: str) -> list[SaveModule]:
    """One :class:`SaveModule` op per layer named (exact name or dotted suffix) in ``modules``.

    A name that matches nothing is an error; the op records the shapes of every
    parameter under the module so loading can check them.
    """
    ops: list[SaveModule] = []
    for name in modules or ():
        found = [n for n in graph if matches(n.path, [name])]
        # keep only the outermost matches (a nested match would be saved twice)
        outer = [n for n in found if not any(n.path.startswith(o.path + ".") for o in found)]
        if not outer:
            hints = closest(name, graph.paths)
            hint = f"; closest layer names: {', '.join(hints)}" if hints else ""
            raise TargetNotFoundError(f"{owner}: modules_to_save entry {name!r} matched no layer{hint}")
        for node in outer:
            ops.append(SaveModule(path=node.path, param_shapes=graph.subtree_params(node.path)))
    return ops
