"""Parsing JSON that comes from files, within bounds.

Configs, plans, safetensors headers and checkpoint attributes come from files anyone may
write. Python's ``json`` accepts numbers of any size (``10**400`` as an int, which
later overflows a float), ``NaN``/``Infinity``, and nesting deep enough to raise
``RecursionError``. :func:`loads` refuses all of these with a ``ValueError``, which each
caller turns into its own peftcore error naming the file: integers of more than
:data:`MAX_INT_DIGITS` digits, non-finite floats, nesting deeper than
:data:`MAX_DEPTH` and, when asked, more than ``max_objects`` objects (counted while
parsing, so a header of millions of tiny entries stops early).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Optional

#: Larger integers than any size, rank or count a file may hold (2**64 has 20 digits).
MAX_INT_DIGITS = 20

#: Deeper nesting than any config, plan or header has.
MAX_DEPTH = 64


def loads(
    text: str,
    max_objects: Optional[int] = None,
    object_pairs_hook: Optional[Callable[[list[tuple[str, Any]]], Any]] = None,
) -> Any:
    """``json.loads`` within the bounds above; any breach is a ``ValueError``."""
    objects = 0

    def pairs(items: list[tuple[str, Any]]) -> Any:
        nonlocal objects
        objects += 1
        if max_objects is not None and objects > max_objects:
            raise ValueError(f"more than {max_objects} JSON objects")
        return object_pairs_hook(items) if object_pairs_hook is not None else dict(items)

    try:
        value = json.loads(
            text, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_refuse, object_pairs_hook=pairs
        )
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    _check_depth(value)
    return value


def _bounded_int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer {literal[:24]}... has more than {MAX_INT_DIGITS} digits")
    return int(literal)


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal[:40]} is out of range")
    return value


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_depth(value: Any) -> None:
    """Refuse nesting deeper than MAX_DEPTH, walking iteratively."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
