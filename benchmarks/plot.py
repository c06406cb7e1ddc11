"""Draw the recorded results (``results.json``) as one figure::

    python benchmarks/plot.py benchmarks/results.json benchmarks/results.png

When the results hold row 7 (``--only many``), :func:`draw_many` draws its curve, cost
over the base model against the number of distinct adapters, to a figure of its own::

    python benchmarks/plot.py --many many.json benchmarks/many_adapters.png

Needs matplotlib (``pip install -e .[bench]``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Dict, List, Optional

from harness import Result

LEAST = "base model + least adapter work"  # Result.bound_ratio

COLOURS = {"HF PEFT": "#d98c3a", "peftcore": "#3a78d9", "floor": "#9a9a9a", LEAST: "#555555"}


def _by_key(results: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {r["key"]: r for r in results if r.get("peftcore") is not None}


def _result(row: Dict[str, Any]) -> Result:
    names = {spec.name for spec in dataclasses.fields(Result)}
    return Result(**{name: value for name, value in row.items() if name in names})


def _ratio(row: Dict[str, Any], library: str) -> float:
    """The library's (``"peftcore"`` or ``"HF PEFT"``) ratio to the row's reference as the
    table gives it (:meth:`harness.Result.ratio_of`: the median of the per-round ratios)."""
    ratio = _result(row).ratio_of(library)
    if ratio is None:
        raise ValueError(f"results row {row.get('key')!r} has no {library} time to compare with its reference")
    return ratio


def _relative_time(ax: Any, rows: Dict[str, Dict[str, Any]]) -> None:
    wanted = [("train_step", "training step\n(vs floor)"), ("mixed_batch", "mixed-adapter inference\n(vs base model)")]
    present = [(key, label) for key, label in wanted if key in rows]
    width = 0.35
    for offset, library in ((-width / 2, "HF PEFT"), (width / 2, "peftcore")):
        values = [_ratio(rows[key], library) for key, _ in present]
        bars = ax.bar([i + offset for i in range(len(present))], values, width, label=library, color=COLOURS[library])
        ax.bar_label(bars, fmt="%.3fx", fontsize=8)
    for i, (key, _) in enumerate(present):
        target = rows[key].get("ratio_target")
        if target:
            ax.hlines(target, i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=1)
            ax.text(i - 0.45, target + 0.004, f"target {target}x", fontsize=7, va="bottom")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(present)), [label for _, label in present], fontsize=8)
    ax.set_ylim(0.9, max(1.3, ax.get_ylim()[1]))
    ax.set_ylabel("time / reference (lower is better)")
    ax.set_title("Time relative to the floor / base model", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")


def _pair(ax: Any, row: Optional[Dict[str, Any]], title: str, ylabel: str, with_floor: bool = False) -> None:
    if row is None:
        ax.set_axis_off()
        ax.set_title(f"{title}: not measured", fontsize=10)
        return
    names = ["HF PEFT", "peftcore"]
    values = [row["hf"], row["peftcore"]]
    floor = row.get("samples", {}).get("floor")
    if with_floor and floor:
        names.insert(0, "floor")
        values.insert(0, floor[0])
    bars = ax.bar(names, [v if v else 0 for v in values], color=[COLOURS[n] for n in names])
    labels = ["0 (exact)" if v == 0 else (f"{v:.1e}" if v < 0.01 else f"{v:.3g}") for v in values]
    ax.bar_label(bars, labels=labels, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=10)


def _drift(ax: Any, rows: Dict[str, Dict[str, Any]]) -> None:
    present = [(k, k.rsplit("_", 1)[1]) for k in ("merge_drift_fp32", "merge_drift_bf16") if k in rows]
    if not present:
        _pair(ax, None, "Merge/unmerge drift", "")
        return
    width = 0.35
    floor = 1e-12  # an exact 0 is drawn as a stub on the log axis, labelled 0
    for offset, library, field in ((-width / 2, "HF PEFT", "hf"), (width / 2, "peftcore", "peftcore")):
        values = [rows[k][field] for k, _ in present]
        bars = ax.bar([i + offset for i in range(len(present))], [max(v, floor) for v in values], width,
                      label=library, color=COLOURS[library])
        ax.bar_label(bars, labels=["0" if v == 0 else f"{v:.1e}" for v in values], fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(present)), [label for _, label in present])
    ax.set_ylabel("largest base-weight change", fontsize=8)
    ax.set_title("Merge+unmerge x100: change left in base weights", fontsize=10)
    ax.legend(fontsize=8)


def draw(data: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _by_key(data["results"])
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    _relative_time(axes[0][0], rows)
    _pair(axes[0][1], rows.get("inject"), "LoRA injection, Llama-7B shape (meta)", "seconds")
    _pair(axes[1][0], rows.get("peak_memory"), "Peak memory of a training step", "MiB above pre-step", with_floor=True)
    _drift(axes[1][1], rows)
    machine = data.get("machine", {})
    figure.suptitle(
        f"peftcore vs HF PEFT {machine.get('peft', '')}: {machine.get('cpu', '')}, "
        f"{machine.get('torch_threads', '?')} thread(s), torch {machine.get('torch', '')}, {machine.get('date', '')}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def many_curves(results: List[Dict[str, Any]]) -> Dict[str, Dict[str, List[tuple]]]:
    """Row 7's ratios to the base model, ``{kind: {library: [(adapters, ratio), ...]}}``
    sorted by the number of adapters (kind: ``forward`` or ``generate``); rows that timed
    the least adapter work add a curve of it (:data:`LEAST`)."""
    curves: Dict[str, Dict[str, List[tuple]]] = {}
    for row in results:
        parts = str(row.get("key", "")).split("_")
        if len(parts) != 3 or parts[0] != "many" or not row.get("reference"):
            continue
        count, kind = int(parts[1]), parts[2]
        for library, field in (("HF PEFT", "hf"), ("peftcore", "peftcore")):
            if row.get(field):
                curves.setdefault(kind, {}).setdefault(library, []).append((count, _ratio(row, library)))
        least = _result(row).bound_ratio()
        if least is not None:
            curves.setdefault(kind, {}).setdefault(LEAST, []).append((count, least))
    for by_library in curves.values():
        for points in by_library.values():
            points.sort()
    return curves


def draw_many(data: Dict[str, Any], path: str) -> None:
    """Row 7 as two curves (forward, generate): time over the base model's against the
    number of adapters, log-scaled, both libraries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = many_curves(data["results"])
    if not curves:
        raise ValueError("no row-7 results (keys many_<N>_<kind>) to draw; run benchmarks/run.py --only many")
    figure, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (kind, by_library) in zip(axes[0], sorted(curves.items())):
        for library, points in by_library.items():
            style = {"linestyle": "dashed", "marker": "x"} if library == LEAST else {"marker": "o"}
            ax.plot([n for n, _ in points], [r for _, r in points], label=library, color=COLOURS[library], **style)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distinct adapters in the model (64-row batch, round-robin)", fontsize=8)
        ax.set_ylabel("time / base model (lower is better)", fontsize=8)
        ax.set_title(f"mixed batch, {kind}", fontsize=10)
        ax.legend(fontsize=8)
    machine = data.get("machine", {})
    figure.suptitle(f"Many adapters: {machine.get('cpu', '')}, {machine.get('torch_threads', '?')} thread(s), "
                    f"{machine.get('date', '')}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: List[str]) -> int:
    many = argv[:1] == ["--many"]
    argv = argv[1:] if many else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as handle:
        (draw_many if many else draw)(json.load(handle), argv[1])
    print(f"wrote {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
