"""Distributed training on an existing engine: DDP and FSDP2 (gloo, 2 CPU processes) end
with the same adapter weights as one process trained on the same global batches."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.subprocess_env import child_env

torch = pytest.importorskip("torch", reason="torch is not installed")

from peftcore.io import match_tensors, read_adapter  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale  # noqa: E402

WORKER = Path(__file__).with_name("distributed_worker.py")


def gloo_unavailable() -> str:
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this torch build"
    return ""


def load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("peftcore_distributed_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run DDP and FSDP training once (2 spawned processes); the folder of their results."""
    reason = gloo_unavailable()
    if reason:
        print(f"skipping distributed tests: {reason}")
        pytest.skip(reason)
    out_dir = tmp_path_factory.mktemp("distributed")
    env = child_env(*sys.path)
    done = subprocess.run(
        [sys.executable, str(WORKER), str(out_dir)], env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, f"distributed run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out_dir


@pytest.fixture(scope="module")
def single_process() -> dict[str, Any]:
    return load_worker().train_single()


def trained_adapter(out_dir: Path, mode: str) -> dict[str, np.ndarray]:
    failed = out_dir / f"{mode}.failed"
    if failed.exists():
        pytest.fail(f"{mode} training failed:\n{failed.read_text()[-3000:]}")
    skipped = out_dir / f"{mode}.skipped"
    if skipped.exists():
        reason = f"{mode} training is not possible here:\n{skipped.read_text()[-1500:]}"
        print(reason)
        pytest.skip(reason)
    files = read_adapter(str(out_dir / mode))
    return match_tensors(files.plan, files.tensors, mode)


def assert_same_adapter(distributed: dict[str, np.ndarray], single: dict[str, Any]) -> None:
    assert set(distributed) == set(single)
    start = load_worker().build()
    initial = start.export_adapter("default")
    for name, expected in single.items():
        assert not np.allclose(expected, initial[name]), f"{name} did not train"
        assert_close_to_scale(distributed[name], expected, err_msg=name)  # all-reduce sums in another order


@pytest.mark.slow
def test_ddp_matches_single_process_training(distributed_run: Path, single_process: dict[str, Any]) -> None:
    assert_same_adapter(trained_adapter(distributed_run, "ddp"), single_process)


@pytest.mark.slow
def test_fsdp_matches_single_process_training(distributed_run: Path, single_process: dict[str, Any]) -> None:
    assert_same_adapter(trained_adapter(distributed_run, "fsdp"), single_process)
