"""peftcore against Hugging Face PEFT, side by side: one markdown table of medians and ratios.

    python benchmarks/run.py                      # everything (about 20 minutes on 2 CPU cores)
    python benchmarks/run.py --quick              # fewer rounds, smaller injection
    python benchmarks/run.py --only train,mixed   # some measurements
    python benchmarks/run.py --save               # also write benchmarks/results.json and results.png
    python benchmarks/run.py --singa-seed-dir /path/to/singa/examples/singa_peft \\
        --singa-python /opt/singa-venv/bin/python  # add the SINGA row

Measurements (one module each): ``train`` (LoRA training step vs HF PEFT vs the floor),
``inject`` (Llama-7B-shaped injection on meta), ``mixed`` (8-adapter mixed batch
inference), ``merge`` (merge/unmerge drift, fp32 and bf16), ``memory`` (training-step
peak memory), ``decode`` (unmerged greedy decoding, batch 1 and 8), ``many`` (a
64-row mixed batch over 1 to 256 adapters, forward and generate), ``dora`` (the DoRA
training step vs HF PEFT's DoRA vs the floor), ``qlora`` (peak training memory on a
4-bit base vs float32, and the QLoRA step vs HF PEFT's), ``compile`` (the LoRA training
step under ``torch.compile`` vs the compiled floor), ``compile_decode`` (greedy decoding
of ``decode``'s models under ``torch.compile``, vs the compiled base model), ``singa`` (SINGA's
PEFT example, when available), ``singa_start`` (``get_peft_model`` on a SINGA model in a
fresh interpreter, torch installed). Runs on CUDA when it is available (``--device`` to
choose). On a CPU the default is one torch thread timed by
thread CPU time, which stays meaningful on a machine shared with other work; use
``--threads N`` for wall-clock timing with N threads. Needs torch, transformers and
peft (``pip install -e .[bench]``); a measurement whose libraries are missing prints a
skipped row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

from harness import (
    Clock,
    Result,
    Settings,
    fix_allocation_placement,
    load_average,
    machine,
    machine_text,
    markdown_table,
    progress,
)

HERE = os.path.dirname(os.path.abspath(__file__))
MEASUREMENTS = (
    "train", "inject", "mixed", "merge", "memory", "decode", "many", "dora", "qlora", "compile", "compile_decode",
    "singa", "singa_start",
)
TORCH_TITLES = {
    "train": "1. LoRA training step",
    "inject": "2. inject LoRA, Llama-7B shape",
    "mixed": "3. mixed-adapter inference",
    "merge": "4. merge+unmerge x100",
    "memory": "5. peak memory of a training step",
    "decode": "6. unmerged greedy decoding",
    "many": "7. mixed batch over many adapters",
    "dora": "8. DoRA training step",
    "qlora": "9-10. QLoRA memory and step time",
    "compile": "11. LoRA training step under torch.compile",
    "compile_decode": "12. greedy decoding under torch.compile",
}


def _missing_libraries() -> Optional[str]:
    missing = []
    for module in ("torch", "transformers", "peft", "peftcore"):
        try:
            __import__(module)
        except Exception as exc:
            missing.append(f"{module} ({type(exc).__name__})")
    return ", ".join(missing) or None


def _measure(name: str, settings: Settings, clock: Clock, args: argparse.Namespace) -> List[Result]:
    if name == "singa_start":
        import bench_singa_start

        return [bench_singa_start.run(settings, args.singa_python)]
    if name == "singa":
        import bench_singa

        return [bench_singa.run(settings, args.singa_seed_dir, args.singa_python)]
    missing = _missing_libraries()
    if missing:
        return [Result(key=name, title=TORCH_TITLES[name], unit="", note=f"not importable: {missing}")]
    if name in ("train", "dora"):
        import bench_train

        return [bench_train.run(settings, clock, use_dora=name == "dora")]
    if name == "compile":
        import bench_compile

        return [bench_compile.run(settings, clock)]
    if name == "compile_decode":
        import bench_compile_decode

        return bench_compile_decode.run(settings, clock)
    if name == "inject":
        import bench_inject

        return [bench_inject.run(settings)]
    if name == "mixed":
        import bench_mixed

        return [bench_mixed.run(settings, clock)]
    if name == "many":
        import bench_many

        return bench_many.run(settings, clock)
    if name == "decode":
        import bench_decode

        return bench_decode.run(settings, clock)
    if name == "qlora":
        import bench_qlora

        return bench_qlora.run(settings, clock)
    if name == "merge":
        import bench_merge

        return bench_merge.run(settings)
    import bench_memory

    return [bench_memory.run(settings)]


def _settings(args: argparse.Namespace) -> Settings:
    device = args.device
    try:
        import torch
    except ImportError:
        return Settings(device="cpu", threads=args.threads or 1, quick=args.quick)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = args.threads or (torch.get_num_threads() if device == "cuda" else 1)
    torch.set_num_threads(threads)
    return Settings(device=device, threads=threads, quick=args.quick)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and an 8-layer injection model")
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help=f"comma-separated: {','.join(MEASUREMENTS)}")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (CPU default 1, thread CPU time)")
    parser.add_argument("--singa-seed-dir", help="checkout of SINGA's examples/singa_peft, for the SINGA row")
    parser.add_argument("--singa-python", help="a Python interpreter with SINGA, when this one has none")
    parser.add_argument("--save", action="store_true", help="write results.json and results.png next to this script")
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--plot", help="draw the results to this image path (needs matplotlib)")
    args = parser.parse_args(argv)
    chosen = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MEASUREMENTS]
    if unknown:
        parser.error(f"unknown measurement(s) {unknown}; choose from {list(MEASUREMENTS)}")
    if args.threads < 0:
        parser.error("--threads must be positive")
    if args.save:
        args.json = args.json or os.path.join(HERE, "results.json")
        args.plot = args.plot or os.path.join(HERE, "results.png")

    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    fixed_placement = fix_allocation_placement()
    settings = _settings(args)
    clock = Clock(settings)
    started, load_at_start = time.perf_counter(), load_average()
    results: List[Result] = []
    for name in chosen:
        progress(f"== {name}")
        begun = time.perf_counter()
        results.extend(_measure(name, settings, clock, args))
        progress(f"== {name} took {time.perf_counter() - begun:.0f} s")
    info = machine(settings, clock)
    info["harness_seconds"] = round(time.perf_counter() - started, 1)
    info["load_average_start"] = load_at_start
    info["allocation_placement_fixed"] = fixed_placement

    print(f"\n{machine_text(info)}; harness {info['harness_seconds']:.0f} s\n")
    print(markdown_table(results))
    data: Dict[str, Any] = {"machine": info, "results": [r.to_dict() for r in results]}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(data, handle, indent=1)
        progress(f"wrote {args.json}")
    if args.plot:
        import plot

        plot.draw(data, args.plot)
        progress(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
