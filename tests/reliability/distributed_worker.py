"""Distributed LoRA training on CPU (gloo), for ``test_distributed_training.py``.

Run as ``python distributed_worker.py OUT_DIR``: spawns 2 processes with
``torch.multiprocessing`` on localhost (a free TCP port), trains the same tiny LoRA
model with DistributedDataParallel, then with FSDP2 (``fully_shard``), each rank taking
its half of every global batch, and saves both adapters from rank 0 with
``save_pretrained`` under ``OUT_DIR/ddp`` and ``OUT_DIR/fsdp``. Anything a rank could
not do is written to ``OUT_DIR/<mode>.skipped`` (not possible with this torch) or
``OUT_DIR/<mode>.failed`` (an error, with its traceback). The test imports :func:`build`,
:func:`global_batches` and :func:`train_single` to compute the single-process reference.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import traceback
from typing import Any, Callable, Iterator

import torch
from torch import nn

import peftcore
from peftcore import LoraConfig

WORLD_SIZE = 2
STEPS = 5
GLOBAL_BATCH = 8
LEARNING_RATE = 0.1


def build() -> peftcore.PeftModel:
    """The same starting model and adapter in every process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    return peftcore.get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False))


def global_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        yield torch.randn(GLOBAL_BATCH, 8, generator=generator), torch.randn(GLOBAL_BATCH, 4, generator=generator)


def train(module: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Plain SGD on the mean squared error; the loss is a mean over the batch it is given."""
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=LEARNING_RATE)
    for inputs, targets in batches:
        loss = nn.functional.mse_loss(module(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def train_single() -> dict[str, Any]:
    """The reference: one process, whole global batches."""
    peft_model = build()
    train(peft_model, global_batches())
    return peft_model.export_adapter("default")


def local_batches(rank: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    share = GLOBAL_BATCH // WORLD_SIZE
    for inputs, targets in global_batches():
        yield inputs[rank * share : (rank + 1) * share], targets[rank * share : (rank + 1) * share]


def run_ddp(rank: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    peft_model = build()
    train(DistributedDataParallel(peft_model), local_batches(rank))  # the PeftModel itself is the module
    if rank == 0:
        peft_model.save_pretrained(os.path.join(out_dir, "ddp"))


def run_fsdp(rank: int, out_dir: str) -> None:
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError as exc:
        with open(os.path.join(out_dir, "fsdp.skipped"), "a") as handle:
            handle.write(f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {exc}\n")
        return
    peft_model = build()
    for layer in (peft_model.model[0], peft_model.model[2]):
        fully_shard(layer)
    fully_shard(peft_model)  # the PeftModel itself is the root module
    train(peft_model, local_batches(rank))
    sharded = [m for m in peft_model.modules() if isinstance(m, FSDPModule)]
    for module in sharded:  # every rank: gather the full parameters of every sharded group
        module.unshard()
    if rank == 0:
        peft_model.save_pretrained(os.path.join(out_dir, "fsdp"))
    for module in sharded:
        module.reshard()


def attempt(mode: str, run: Callable[[int, str], None], rank: int, out_dir: str) -> None:
    import torch.distributed as dist

    try:
        run(rank, out_dir)
    except Exception:
        with open(os.path.join(out_dir, f"{mode}.failed"), "a") as handle:
            handle.write(f"rank {rank}:\n{traceback.format_exc()}\n")
    dist.barrier()


def worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=120),  # a stuck collective fails instead of hanging
    )
    try:
        attempt("ddp", run_ddp, rank, out_dir)
        attempt("fsdp", run_fsdp, rank, out_dir)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    import torch.multiprocessing as mp

    out_dir = sys.argv[1]
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # localhost only, whatever the host's network
    mp.spawn(worker, args=(free_port(), out_dir), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main()
