"""Saving is atomic: a save that dies half-way leaves the previous adapter intact and loadable."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.subprocess_env import child_env

torch = pytest.importorskip("torch", reason="torch is not installed")

import peftcore  # noqa: E402
from peftcore import LoraConfig, PeftModel  # noqa: E402
from peftcore.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter  # noqa: E402

WORKER = Path(__file__).with_name("interrupted_save_worker.py")
TEMP_PREFIX = f".{WEIGHTS_NAME}."


def small_model() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))


def save_previous(directory: Path) -> dict[str, np.ndarray]:
    """Save the adapter that must survive; returns its tensors."""
    peft_model = peftcore.get_peft_model(small_model(), LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    peft_model.save_pretrained(directory)
    return peft_model.export_adapter("default")


def digest(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in (CONFIG_NAME, WEIGHTS_NAME)}


def weight_temp_files(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(TEMP_PREFIX) and name.endswith(".tmp")]


def kill_during_save(directory: Path, width: int, layers: int) -> bool:
    """Start a large save over ``directory`` in a subprocess and SIGKILL it as soon as its
    weights file is being written. True when the kill landed before the rename."""
    env = child_env(*sys.path)
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(directory), str(width), str(layers)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if weight_temp_files(directory):
                proc.kill()
                break
            time.sleep(0.0005)
        else:
            if proc.returncode not in (None, 0):
                pytest.fail(f"save worker failed:\n{proc.stderr.read().decode()[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)
    return proc.returncode == -signal.SIGKILL and bool(weight_temp_files(directory))


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_killed_save_leaves_previous_adapter_loadable(tmp_path: Path) -> None:
    directory = tmp_path / "adapter"
    previous = save_previous(directory)
    before = digest(directory)
    landed = False
    for layers in (8, 16, 24):  # a larger save if the kill came too late (a very fast disk)
        landed = kill_during_save(directory, 1024, layers)
        if landed:
            break
        save_previous(directory)  # the save finished first: put the previous adapter back, retry
    assert landed, "could not kill the save while its weights were being written"
    assert digest(directory) == before
    loaded = PeftModel.from_pretrained(small_model(), directory)  # the leftover temp file is ignored
    now = loaded.export_adapter("default")
    assert set(now) == set(previous)
    for name in previous:
        np.testing.assert_array_equal(now[name], previous[name])


def test_failed_save_cleans_up_and_keeps_previous(tmp_path: Path) -> None:
    directory = tmp_path / "adapter"
    previous = save_previous(directory)
    before = digest(directory)
    peft_model = peftcore.get_peft_model(small_model(), LoraConfig(r=2, target_modules=["0", "2"]))
    exported = peft_model.export_adapter("default")
    broken = {**exported, "0.lora_A": exported["0.lora_A"].astype(object)}  # safetensors cannot write it
    with pytest.raises(Exception, match="object"):
        from peftcore.io import save_adapter

        save_adapter(str(directory), peft_model.peft_config["default"], peft_model.plans["default"], broken)
    assert sorted(set(os.listdir(directory)) - {"README.md"}) == [CONFIG_NAME, WEIGHTS_NAME]  # + HF's model card
    assert digest(directory) == before
    files = read_adapter(str(directory))
    np.testing.assert_array_equal(files.tensors["base_model.model.0.lora_A.weight"], previous["0.lora_A"])


def test_save_over_an_existing_adapter_replaces_both_files(tmp_path: Path) -> None:
    directory = tmp_path / "adapter"
    save_previous(directory)
    peft_model = peftcore.get_peft_model(small_model(), LoraConfig(r=3, lora_alpha=6, target_modules=["2"]))
    peft_model.save_pretrained(directory)
    assert sorted(set(os.listdir(directory)) - {"README.md"}) == [CONFIG_NAME, WEIGHTS_NAME]  # + HF's model card
    files = read_adapter(str(directory))
    assert files.config.r == 3 and files.plan == peft_model.plans["default"]


def test_saved_files_get_the_usual_permissions(tmp_path: Path) -> None:
    """Saved files get the mode any new file gets: 0666 less the umask."""
    save_previous(tmp_path)
    umask = os.umask(0o022)
    os.umask(umask)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
