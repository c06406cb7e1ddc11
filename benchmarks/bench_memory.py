"""Measurement 5: peak memory of one training step (measurement 1's), peftcore vs HF PEFT.

Reported: the peak of memory in use during a steady-state step (after two warm-up
steps, so AdamW's state already exists) above what was in use just before it:
activations kept for backward, gradients, temporaries.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
* CPU: each library's step runs in a fresh process; the kernel's resident-set high-water
  mark (``VmHWM``) is reset just before the step (``/proc/self/clear_refs``) and read
  after it. glibc is told to map every allocation of 64 KiB or more on its own
  (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set at once and the
  high-water mark follows the tensors actually alive.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
from typing import Dict, List, Optional

from harness import Result, Settings, median, progress

CONTENDERS = ("floor", "HF PEFT", "peftcore")
MIB = 1024.0 * 1024.0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        found = re.search(field + r":\s+(\d+)", handle.read())
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(found.group(1))


def peak_in_this_process(contender: str, device: str) -> float:
    """MiB above the pre-step level at the peak of one steady-state training step."""
    import torch

    from bench_train import TrainingStep

    step = TrainingStep(contender, device)
    step()
    step()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MIB
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024.0


def _cpu_peak_in_child(contender: str, threads: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, os.path.abspath(__file__), "--child", contender, "--threads", str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child for {contender} failed: {done.stderr.strip()[-800:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"])


def _cpu_supported() -> Optional[str]:
    if not sys.platform.startswith("linux"):
        return "CPU peak memory needs Linux's /proc/self/clear_refs"
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError as exc:
        return f"cannot reset the resident-set high-water mark ({exc})"
    return None


def run(settings: Settings) -> Result:
    title = "5. peak memory of a training step"
    unit = "MiB above pre-step"
    if settings.device == "cpu":
        reason = _cpu_supported()
        if reason:
            return Result(key="peak_memory", title=title, unit=unit, target_text="<= HF PEFT", note=reason)
    peaks: Dict[str, List[float]] = {name: [] for name in CONTENDERS}
    rounds = settings.rounds(3, 1)
    for round_index in range(rounds):
        order = CONTENDERS if round_index % 2 == 0 else CONTENDERS[::-1]
        for name in order:
            if settings.device == "cuda":
                peaks[name].append(peak_in_this_process(name, "cuda"))
                gc.collect()
            else:
                peaks[name].append(_cpu_peak_in_child(name, settings.threads))
        progress(f"peak memory round {round_index + 1}/{rounds}: " + ", ".join(f"{n} {peaks[n][-1]:.1f} MiB" for n in CONTENDERS))
    return Result(
        key="peak_memory",
        title=title,
        unit=unit,
        peftcore=median(peaks["peftcore"]),
        hf=median(peaks["HF PEFT"]),
        ratio_target=1.0,
        target_text="<= HF PEFT",
        note=f"floor {median(peaks['floor']):.1f} MiB",
        samples=peaks,
    )


def _child(argv: List[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=CONTENDERS, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps({"peak_mib": peak_in_this_process(args.child, "cpu")}))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
