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

import difflib
import importlib
import re
import warnings
from typing import Any, Optional, Sequence, Union

from peftcore.architectures import lora_default
from peftcore.errors import ConfigError, PeftWarning, TargetNotFoundError, UnsupportedLayerError, caller_stacklevel
from peftcore.graph import LayerNode, ModelGraph
from peftcore.pattern_keys import component_suffixes

Targets = Union[str, Sequence[str], None]

ALL_LINEAR = "all-linear"
DEFAULT_LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")

#: Bounds on a regular expression in a config (``target_modules``/``exclude_modules`` as
#: a string, ``rank_pattern``/``alpha_pattern`` keys), which may come from a file: see
#: :func:`check_regex`.
try:  # the parser ``re`` itself uses (Python 3.11 made it private)
    _sre_parse: Any = importlib.import_module("re._parser")
except ImportError:  # pragma: no cover - Python < 3.11
    _sre_parse = importlib.import_module("sre_parse")

MAX_REGEX_CHARS = 500
MAX_REGEX_REPEATS = 3
_SMALL_REPEAT = 16


def check_regex(where: str, pattern: str) -> None:
    """Refuse a regular expression whose matching time could explode, before it runs.

    Python's ``re`` backtracks, so ``([\\w.]|[\\w.])*Z`` takes time exponential in the
    length of a layer path. Allowed are patterns of at most :data:`MAX_REGEX_CHARS`
    characters with no repetition inside a repetition (``(a+)+``), no repeated
    alternation (``(a|b)*``), no back-references, and at most :data:`MAX_REGEX_REPEATS`
    long repetitions (``*``, ``+``, ``{m,n}`` with n >= 16) in all, which keeps matching
    polynomial of low degree in the path length. Every pattern HF PEFT documents
    (``.*\\.(q|v)_proj``, ``model\\.layers\\.\\d+\\.self_attn\\.(q|k|v)_proj``) passes.
    """
    if not isinstance(pattern, str):
        raise ConfigError(f"{where} must be a string, got {pattern!r}")
    if len(pattern) > MAX_REGEX_CHARS:
        raise ConfigError(f"{where} is a regular expression of {len(pattern)} characters; at most {MAX_REGEX_CHARS}")
    try:
        re.compile(pattern)
        parsed = _sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ConfigError(f"{where} is not a valid regular expression: {exc}") from None
    problem = _regex_problem(list(parsed), inside_repeat=False, counter=[0])
    if problem:
        raise ConfigError(
            f"{where} = {pattern[:80]!r} could take exponential time to match ({problem}); simplify it "
            "(see docs/reliability.md, 'Regular expressions from files')"
        )


def _regex_problem(items: list, inside_repeat: bool, counter: list[int]) -> Optional[str]:
    for op, av in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            _low, high, body = av
            repeats = high == _sre_parse.MAXREPEAT or high > 1
            if repeats:
                if inside_repeat:
                    return "a repetition inside a repetition"
                if _contains(list(body), "BRANCH"):
                    return "a repeated alternation"
                if high == _sre_parse.MAXREPEAT or high >= _SMALL_REPEAT:
                    counter[0] += 1
                    if counter[0] > MAX_REGEX_REPEATS:
                        return f"more than {MAX_REGEX_REPEATS} unbounded repetitions"
            problem = _regex_problem(list(body), inside_repeat or repeats, counter)
        elif name in ("GROUPREF", "GROUPREF_EXISTS"):
            return "a back-reference"
        elif name == "SUBPATTERN":
            problem = _regex_problem(list(av[-1]), inside_repeat, counter)
        elif name == "BRANCH":
            problem = next((p for sub in av[1] for p in [_regex_problem(list(sub), inside_repeat, counter)] if p), None)
        elif name in ("ASSERT", "ASSERT_NOT"):
            problem = _regex_problem(list(av[1]), inside_repeat, counter)
        elif name == "ATOMIC_GROUP":
            problem = _regex_problem(list(av), inside_repeat, counter)
        else:
            problem = None
        if problem:
            return problem
    return None


def _contains(items: list, wanted: str) -> bool:
    for op, av in items:
        name = str(op)
        if name == wanted:
            return True
        children: list = []
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            children = [av[2]]
        elif name == "SUBPATTERN":
            children = [av[-1]]
        elif name == "BRANCH":
            children = list(av[1])
        elif name in ("ASSERT", "ASSERT_NOT"):
            children = [av[1]]
        elif name == "ATOMIC_GROUP":
            children = [av]
        if any(_contains(list(child), wanted) for child in children):
            return True
    return False


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
        check_regex(f"{owner}.{name}", targets)
        return targets
    if not isinstance(targets, (list, tuple, set, frozenset)):
        raise ConfigError(f"{owner}.{name} must be a list of names, a regex string or 'all-linear', got {targets!r}")
    for item in targets:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{owner}.{name} entries must be non-empty strings, got {item!r}")
    return targets if isinstance(targets, list) else sorted(targets)


def matches(path: str, targets: Targets) -> bool:
    """Whether ``path`` is named by ``targets`` (list = exact or dotted suffix, str = full regex).
    To test many paths, build a :class:`TargetMatcher` once."""
    return TargetMatcher(targets)(path)


class TargetMatcher:
    """:func:`matches` for one ``targets`` value, prepared once: a list becomes a set
    (a path is named when it, or one of its ends that starts a component, is in it), a
    regex is compiled. Testing a path costs a few set lookups however long the list is,
    so a config with a long ``target_modules`` list from a file costs linear work."""

    def __init__(self, targets: Targets) -> None:
        self.regex = re.compile(targets) if isinstance(targets, str) else None
        self.names = frozenset(targets) if targets is not None and not isinstance(targets, str) else frozenset()

    def __call__(self, path: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(path) is not None
        return bool(self.names) and any(suffix in self.names for suffix in component_suffixes(path))


def layer_index(path: str, patterns: Union[str, Sequence[str], None]) -> Optional[int]:
    """The block index in ``path`` after one of ``patterns`` (``model.layers.3.mlp`` -> 3)."""
    names = [patterns] if isinstance(patterns, str) else list(patterns or DEFAULT_LAYERS_PATTERNS)
    for name in names:
        found = re.search(rf"(?:^|\.){re.escape(name)}\.(\d+)(?:\.|$)", path)
        if found:
            return int(found.group(1))
    return None


def default_target_modules(graph: ModelGraph) -> Targets:
    """The ``target_modules`` a config that leaves them unset gets on this model (its
    model type's default, as HF PEFT), or None where there is none."""
    default = lora_default(graph.model_type)
    return list(default) if isinstance(default, list) else default


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
    method cannot adapt. An entry of a ``target_modules`` list that matches nothing while
    others match is a :class:`~peftcore.errors.PeftWarning` naming it and the closest
    layer names (a typo would otherwise leave those layers unadapted, silently).
    """
    explicit = target_modules is not None
    if target_modules is None:
        target_modules = default_target_modules(graph)
        if target_modules is None:
            raise ConfigError(
                f"{owner}.target_modules is not set and there is no default for model type "
                f"{graph.model_type or 'unknown'!r}; name the layers to adapt"
            )
    if target_modules == ALL_LINEAR:
        matched = [n for n in graph if n.kind == "linear" and n.path != graph.output_head]
    else:
        targeted = TargetMatcher(target_modules)
        matched = [n for n in graph if targeted(n.path)]
    before_filters = list(matched)
    if explicit and matched and isinstance(target_modules, (list, tuple, set, frozenset)):
        _warn_unmatched_entries(graph, list(target_modules), owner, supported_kinds)
    if exclude_modules is not None:
        excluded = TargetMatcher(exclude_modules)
        matched = [n for n in matched if not excluded(n.path)]
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
    names = [targets] if isinstance(targets, str) else list(targets or [])
    hints = "; ".join(dict.fromkeys(_name_hint(name, graph, kinds) for name in names[:_HINTED_NAMES]))
    shown = repr(targets) if len(names) <= _HINTED_NAMES or isinstance(targets, str) else (
        f"[{', '.join(repr(n) for n in names[:_HINTED_NAMES])}, ... and {len(names) - _HINTED_NAMES} more]"
    )
    unreached = "".join(f"; {note}" for note in graph.unreached)
    return f"{owner}: target_modules {shown} matched no layer of the model; {hints}{unreached}"


#: How many target names an error message or warning shows and looks for close layer names to
#: (a fuzzy search per name, and a list from a file may be long).
_HINTED_NAMES = 10


def _warn_unmatched_entries(graph: ModelGraph, targets: list[str], owner: str, kinds: Sequence[str]) -> None:
    # one pass over the graph: an entry names a layer when it is one of that path's component suffixes
    named = {suffix for node in graph for suffix in component_suffixes(node.path)}
    unmatched = [name for name in dict.fromkeys(targets) if name not in named]
    for name in unmatched[:_HINTED_NAMES]:
        warnings.warn(
            f"{owner}: target_modules entry {name!r} matches no layer of the model (the other entries do); "
            f"{_name_hint(name, graph, kinds)}",
            PeftWarning,
            stacklevel=caller_stacklevel(),
        )
    if len(unmatched) > _HINTED_NAMES:
        warnings.warn(
            f"{owner}: {len(unmatched) - _HINTED_NAMES} more target_modules entries match no layer of the model",
            PeftWarning,
            stacklevel=caller_stacklevel(),
        )


def _name_hint(name: str, graph: ModelGraph, kinds: Sequence[str]) -> str:
    """The layer names (last path component, as ``target_modules`` lists them) closest to
    ``name``, or, when none is close, those of the layers the method can adapt."""
    short_names = sorted({n.path.rsplit(".", 1)[-1] for n in graph if n.kind in kinds} or {n.name for n in graph})
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], short_names, n=5, cutoff=0.5)
    if close:
        return f"closest layer names: {', '.join(close)}"
    listed = ", ".join(short_names[:12]) + (f" and {len(short_names) - 12} more" if len(short_names) > 12 else "")
    return f"no layer name is close to {name!r}; layer names it can adapt: {listed}"
