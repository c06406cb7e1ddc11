"""Which layers a config targets, decided on the ModelGraph alone.

Matching rules (those of Hugging Face PEFT, so configs carry over):

- a list of names matches a layer whose path equals a name or ends in ``"." + name``;
- a string is a regular expression that must match the whole path;
- ``"all-linear"`` matches every linear layer except the model's output head;
- ``exclude_modules`` removes layers with the same rules;
- ``layers_to_transform`` keeps only layers whose block index (the number after one of
  ``layers_pattern``, by default ``layers``, ``h``, ``block``, ``blocks``, ``layer``) is listed.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence, Union

from peftcore.errors import ConfigError, TargetNotFoundError, UnsupportedLayerError, closest
from peftcore.graph import LayerNode, ModelGraph

Targets = Union[str, Sequence[str], None]

ALL_LINEAR = "all-linear"
DEFAULT_LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")

#: Targets used when a config leaves ``target_modules`` unset, by model type (as HF PEFT).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
    "gpt_neox": ["query_key_value"],
}


def validate_targets(owner: str, name: str, targets: Targets, allow_none: bool = True) -> Targets:
    """Check a ``target_modules``-style value, raising :class:`ConfigError`; return it
    normalised for saving (a set or tuple of names becomes a sorted list)."""
    if targets is None:
        if not allow_none:
            raise ConfigError(f"{owner}.{name} must be set")
        return None
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            return targets
        try:
            re.compile(targets)
        except re.error as exc:
            raise ConfigError(f"{owner}.{name} is not a valid regular expression: {exc}") from None
        return targets
    if not isinstance(targets, (list, tuple, set, frozenset)):
        raise ConfigError(f"{owner}.{name} must be a list of names, a regex string or 'all-linear', got {targets!r}")
    for item in targets:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{owner}.{name} entries must be non-empty strings, got {item!r}")
    return targets if isinstance(targets, list) else sorted(targets)


def matches(path: str, targets: Targets) -> bool:
    """Whether ``path`` is named by ``targets`` (list = exact or dotted suffix, str = full regex)."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def layer_index(path: str, patterns: Union[str, Sequence[str], None]) -> Optional[int]:
    """The block index in ``path`` after one of ``patterns`` (``model.layers.3.mlp`` -> 3)."""
    names = [patterns] if isinstance(patterns, str) else list(patterns or DEFAULT_LAYERS_PATTERNS)
    for name in names:
        found = re.search(rf"(?:^|\.){re.escape(name)}\.(\d+)(?:\.|$)", path)
        if found:
            return int(found.group(1))
    return None


def select_layers(
    graph: ModelGraph,
    target_modules: Targets,
    *,
    owner: str,
    supported_kinds: Sequence[str],
    exclude_modules: Targets = None,
    layers_to_transform: Union[int, Sequence[int], None] = None,
    layers_pattern: Union[str, Sequence[str], None] = None,
) -> list[LayerNode]:
    """Return the layers of ``graph`` the targets select, in model order.

    Raises :class:`TargetNotFoundError` (listing the closest layer names) when nothing
    matches, and :class:`UnsupportedLayerError` when a matched layer is of a kind the
    method cannot adapt.
    """
    if target_modules is None:
        target_modules = DEFAULT_TARGETS.get(graph.model_type)
        if target_modules is None:
            raise ConfigError(
                f"{owner}.target_modules is not set and there is no default for model type "
                f"{graph.model_type or 'unknown'!r}; name the layers to adapt"
            )
    if target_modules == ALL_LINEAR:
        matched = [n for n in graph if n.kind == "linear" and n.path != graph.output_head]
    else:
        matched = [n for n in graph if matches(n.path, target_modules)]
    before_filters = list(matched)
    if exclude_modules is not None:
        matched = [n for n in matched if not matches(n.path, exclude_modules)]
    if layers_to_transform is not None:
        wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        matched = [n for n in matched if layer_index(n.path, layers_pattern) in wanted]

    if not matched:
        raise TargetNotFoundError(_nothing_matched(graph, target_modules, before_filters, owner, supported_kinds))
    bad = [n for n in matched if n.kind not in supported_kinds]
    if bad:
        listed = ", ".join(f"{n.path!r} ({n.type_name or n.kind})" for n in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise UnsupportedLayerError(
            f"{owner} targets {listed}{more}, which are not of a supported kind "
            f"({', '.join(supported_kinds)}); narrow target_modules or exclude them"
        )
    return matched


def _nothing_matched(
    graph: ModelGraph, targets: Targets, before_filters: list[LayerNode], owner: str, kinds: Sequence[str]
) -> str:
    if before_filters:
        return (
            f"{owner}: target_modules matched {len(before_filters)} layer(s) but exclude_modules / "
            f"layers_to_transform removed them all (e.g. {before_filters[0].path!r})"
        )
    candidates = [n.path for n in graph if n.kind in kinds] or graph.paths
    names = [targets] if isinstance(targets, str) else list(targets or [])
    hints: list[str] = []
    for name in names:
        for hint in closest(name, candidates):
            if hint not in hints:
                hints.append(hint)
    hint_text = f"; closest layer names: {', '.join(hints[:8])}" if hints else ""
    return f"{owner}: target_modules {targets!r} matched no layer of the model{hint_text}"
