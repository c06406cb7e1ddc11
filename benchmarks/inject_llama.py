"""Benchmark: time to inject LoRA into a Llama-7B-shaped model, peftcore vs HF PEFT.

The model (hidden 4096, intermediate 11008, 32 heads, vocab 32000, ``--layers``
decoder layers) is built on the meta device, so no weights are allocated and only
the injection itself is measured: describing the model, planning, and building the
adapter layers. Each round builds a fresh model for each library (not timed) and runs
the two libraries one after the other, swapping the order every round so neither
always goes first. Results are medians over ``--rounds``.

    python benchmarks/inject_llama.py                 # 7 rounds, 32 layers
    python benchmarks/inject_llama.py --rounds 3 --layers 8 --profile

Target: peftcore takes at most half of HF PEFT's time.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import platform
import pstats
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Union

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_RATIO = 0.5


def build_model(layers: int) -> Any:
    """A Llama-7B-shaped ``LlamaForCausalLM`` with ``layers`` decoder layers, on meta."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def inject_peftcore(model: Any, targets: Union[str, List[str]], r: int) -> Any:
    import peftcore

    return peftcore.get_peft_model(model, peftcore.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))


def inject_hf(model: Any, targets: Union[str, List[str]], r: int) -> Any:
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))


LIBRARIES: Dict[str, Callable[[Any, Union[str, List[str]], int], Any]] = {
    "peftcore": inject_peftcore,
    "HF PEFT": inject_hf,
}


def trainable_count(wrapped: Any) -> int:
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def time_once(name: str, layers: int, targets: Union[str, List[str]], r: int) -> tuple:
    """Build a fresh meta model (untimed), inject, and return (seconds, trainable count)."""
    model = build_model(layers)
    gc.collect()
    start = time.perf_counter()
    wrapped = LIBRARIES[name](model, targets, r)
    elapsed = time.perf_counter() - start
    count = trainable_count(wrapped)
    del wrapped, model
    gc.collect()
    return elapsed, count


def profile_peftcore(layers: int, targets: Union[str, List[str]], r: int, top: int) -> str:
    model = build_model(layers)
    profiler = cProfile.Profile()
    profiler.enable()
    inject_peftcore(model, targets, r)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: Union[List[str], None] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="rounds per library (default 7)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (default 32, as Llama-7B)")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument(
        "--targets", choices=["all-linear", "names"], default="all-linear",
        help="target_modules: 'all-linear' or the 7 Llama linear names (default all-linear)",
    )
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one peftcore injection")
    parser.add_argument("--top", type=int, default=25, help="rows of the profile to print (default 25)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.layers < 1:
        parser.error("--rounds and --layers must be positive")

    warnings.simplefilter("ignore")
    import peft
    import torch
    import transformers

    import peftcore

    targets: Union[str, List[str]] = "all-linear" if args.targets == "all-linear" else list(LLAMA_LINEARS)
    names = list(LIBRARIES)

    # warm-up: first-use imports and plugin discovery are not what we measure
    counts: Dict[str, int] = {}
    for name in names:
        time_once(name, 1, targets, args.r)

    times: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            elapsed, counts[name] = time_once(name, args.layers, targets, args.r)
            times[name].append(elapsed)
        line = ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names)
        print(f"round {round_index + 1}/{args.rounds}: {line}", file=sys.stderr)

    if len(set(counts.values())) != 1:
        print(f"WARNING: trainable parameter counts differ: {counts}", file=sys.stderr)

    medians = {name: statistics.median(times[name]) for name in names}
    ratio = medians["peftcore"] / medians["HF PEFT"]
    target_text = f"`{args.targets}`" if args.targets == "all-linear" else "7 Llama linear names"
    print(
        f"\nLoRA injection, Llama-7B shape on meta ({args.layers} layers, r={args.r}, targets {target_text}), "
        f"{args.rounds} rounds, alternating order\n"
    )
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, peftcore {peftcore.__version__}; {platform.machine()} {platform.system()}\n")
    print("| library | median s | min s | max s | trainable params |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        values = times[name]
        print(f"| {name} | {medians[name]:.3f} | {min(values):.3f} | {max(values):.3f} | {counts[name]:,} |")
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"\nratio peftcore / HF PEFT = {ratio:.2f}x (target <= {TARGET_RATIO}x: {verdict})")

    if args.profile:
        print("\ncProfile of one peftcore injection:\n")
        print(profile_peftcore(args.layers, targets, args.r, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
