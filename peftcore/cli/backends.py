"""``peftcore backends``: every installed backend, whether it can run, and what it builds.

A backend builds a method when it has a builder for every plan op the method's planner
emits (:meth:`~peftcore.registry.MethodRegistry.ops_of`), so a new method or a plugin
that adds builders shows up here without changes to this module.
"""

from __future__ import annotations

from typing import Any

from peftcore.plugins import ENV_DISABLED, PluginManager
from peftcore.registry import PeftRegistry


def backend_records(manager: PluginManager) -> list[dict[str, Any]]:
    """One dict per backend: name, framework, available, reason, version, ops, methods,
    ``missing``: each registered method it cannot build, with the op types it lacks, and
    ``limitations``: the backend's own reasons, by method (see ``BackendInfo``)."""
    records = []
    for name, backend in sorted(manager.backends().items()):
        info = backend.info
        ops = backend.ops() if info.available else []
        missing = PeftRegistry.missing_ops(ops) if info.available else {}
        records.append({
            "name": name,
            "framework": info.framework,
            "available": info.available,
            "reason": info.reason,
            "version": info.version,
            "ops": ops,
            "methods": sorted(m for m, lacking in missing.items() if not lacking),
            "missing": {m: lacking for m, lacking in sorted(missing.items()) if lacking},
            "limitations": dict(sorted(dict(info.limitations or {}).items())) if info.available else {},
        })
    return records


def other_plugins(manager: PluginManager) -> list[dict[str, str]]:
    """Plugins that failed to load or were disabled (they are not in the table)."""
    found = [{"name": f.name, "state": f"failed to load: {f.error}"} for f in manager.failures]
    found.extend({"name": n, "state": f"disabled by {ENV_DISABLED}"} for n in sorted(manager.disabled))
    return found


def render_backends(records: list[dict[str, Any]], others: list[dict[str, str]]) -> list[str]:
    """The table, then one line per reason a backend is unavailable, a method unbuildable, or
    a method it builds limited to some forms."""
    rows = [("backend", "framework", "available", "version", "methods")]
    for record in records:
        rows.append((
            record["name"],
            record["framework"],
            "yes" if record["available"] else "no",
            record["version"] or "-",
            ", ".join(record["methods"]) or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    notes = []
    for record in records:
        if not record["available"]:
            notes.append(f"{record['name']}: unavailable: {record['reason'] or 'no reason given'}")
        limitations = record.get("limitations", {})
        for method, lacking in record["missing"].items():
            why = f": {limitations[method]}" if method in limitations else ""
            notes.append(f"{record['name']}: cannot build {method} (no builder for {', '.join(lacking)}){why}")
        for method in record["methods"]:  # built, but not in every form
            if method in limitations:
                notes.append(f"{record['name']}: {method} is limited: {limitations[method]}")
        known = set(PeftRegistry.names()) | set(record["methods"]) | set(record["missing"])
        for variant, why in limitations.items():  # a method's form (LoRA's dora), not a method
            if variant not in known:
                notes.append(f"{record['name']}: cannot build {variant}: {why}")
    notes.extend(f"{other['name']}: {other['state']}" for other in others)
    if not records:
        lines = ["no backend plugin is installed (pip install peftcore[torch])"]
    return lines + ([""] + notes if notes else [])
