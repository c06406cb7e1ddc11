"""``rank_pattern``/``alpha_pattern`` keys matched against many layers, in bounded work.

A key is a regular expression matched against the end of a layer path, as HF PEFT
matches it: ``(.*\\.)?(?:key)`` must match the whole path, and the first key in the
dict's order that matches wins. Matched naively, every key is compiled and run against
every layer, so a config with 12,000 keys on a model with hundreds of layers takes
minutes. Here:

- A *literal* key (letters, digits, ``_``, ``-``, escaped punctuation such as ``\\.``,
  and bare ``.``, which matches any one character) has a fixed length ``L``, so it can
  only match the path's last ``L`` characters, and only where they start a component.
  Literal keys are grouped by length and by where their bare dots are; a group is one
  dict lookup per candidate suffix, whatever its size. Every key HF PEFT's docs show,
  the full module paths tools write and ``re.escape``'d paths are literal.
- Any other key is compiled once and run against each layer, in the dict's order, only
  while it could still be the first match.

The work (one unit per group probed or regex run) is computed before matching; a config
needing more than :data:`MAX_MATCH_WORK` units on a model is refused with a
:class:`~peftcore.errors.ConfigError` naming the field, and at most
:data:`MAX_REGEX_KEYS` keys of a field may be non-literal (each is checked by
:func:`~peftcore.targeting.check_regex`, which costs a parse).
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

from peftcore.errors import ConfigError

#: Most units of matching work (a group probed or a regex run, per layer) per field.
MAX_MATCH_WORK = 5_000_000
#: Most keys of one field that are regular expressions rather than literal names.
MAX_REGEX_KEYS = 1_000

_LITERAL_CHAR = re.compile(r"[A-Za-z0-9_\-]")


def literal_form(key: str) -> Optional[tuple[str, tuple[int, ...]]]:
    """``(text, wildcard positions)`` of a literal key (see the module docstring), or
    None for a key that needs the regex engine. In ``text`` a wildcard is ``"."``."""
    chars: list[str] = []
    wild: list[int] = []
    index = 0
    while index < len(key):
        char = key[index]
        if char == "\\" and index + 1 < len(key) and not key[index + 1].isalnum() and not key[index + 1].isspace():
            chars.append(key[index + 1])
            index += 2
            continue
        if char == ".":
            wild.append(len(chars))
        elif not _LITERAL_CHAR.fullmatch(char):
            return None
        chars.append(char)
        index += 1
    return ("".join(chars), tuple(wild)) if chars else None


def component_suffixes(path: str) -> list[str]:
    """The path and each of its ends that starts a component (``a.b.c``: ``a.b.c``, ``b.c``, ``c``)."""
    return [path] + [path[i + 1 :] for i, char in enumerate(path) if char == "."]


def count_regex_keys(keys: Iterable[str]) -> int:
    """How many of ``keys`` are not literal."""
    return sum(1 for key in keys if literal_form(key) is None)


class PatternKeys:
    """The keys of one ``*_pattern`` dict, prepared to find each layer's first match."""

    def __init__(self, keys: Iterable[str], field: str) -> None:
        self.field = field
        self.keys = list(keys)
        # length -> wildcard positions -> masked text -> first key index
        self._groups: dict[int, dict[tuple[int, ...], dict[str, int]]] = {}
        self._regexes: list[tuple[int, re.Pattern[str]]] = []
        for order, key in enumerate(self.keys):
            form = literal_form(key)
            if form is None:
                self._regexes.append((order, re.compile(rf"(?:.*\.)?(?:{key})")))
                continue
            text, wild = form
            self._groups.setdefault(len(text), {}).setdefault(wild, {}).setdefault(text, order)
        if len(self._regexes) > MAX_REGEX_KEYS:
            raise ConfigError(
                f"{field} has {len(self._regexes)} keys that are regular expressions; at most {MAX_REGEX_KEYS} "
                "(name layers literally, e.g. 'model.layers.0.self_attn.q_proj', which any number may be)"
            )

    def work(self, paths: Sequence[str]) -> int:
        """The units of work :meth:`first_matches` will do on ``paths``."""
        probes = sum(len(self._groups.get(len(s), ())) for path in paths for s in component_suffixes(path))
        return probes + len(self._regexes) * len(paths)

    def first_matches(self, paths: Sequence[str]) -> dict[str, Optional[str]]:
        """Each path's first matching key (None where no key matches). Refuses, before
        matching, a config whose matching work on these paths exceeds the bound."""
        work = self.work(paths)
        if work > MAX_MATCH_WORK:
            raise ConfigError(
                f"{self.field}: matching its {len(self.keys)} keys against {len(paths)} layers needs {work:,} steps, "
                f"more than the limit of {MAX_MATCH_WORK:,}; use fewer keys, or literal layer names"
            )
        return {path: self._first_match(path) for path in paths}

    def _first_match(self, path: str) -> Optional[str]:
        best: Optional[int] = None
        for suffix in component_suffixes(path):
            for wild, table in self._groups.get(len(suffix), {}).items():
                masked = suffix
                if wild:
                    chars = list(suffix)
                    for position in wild:
                        chars[position] = "."
                    masked = "".join(chars)
                order = table.get(masked)
                if order is not None and (best is None or order < best):
                    best = order
        for order, pattern in self._regexes:
            if best is not None and order > best:
                break
            if pattern.fullmatch(path):
                best = order
                break
        return None if best is None else self.keys[best]
