"""Plugin faults stay contained: a plugin that fails on import or in a hook is named in
the error, the other backends keep working, PEFTCORE_DISABLED_PLUGINS keeps a plugin
from being imported at all, and the lazy plugin manager starts once under threads and
survives ``fork``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.subprocess_env import child_env

torch = pytest.importorskip("torch", reason="torch is not installed")
from torch import nn  # noqa: E402

import peftcore  # noqa: E402
from peftcore import BackendError, BackendInfo, LoraConfig, PeftCoreError, PeftRegistry, hookimpl  # noqa: E402
from peftcore.config import config_class  # noqa: E402
from peftcore.plugins import ENV_BACKEND, ENV_DISABLED, get_plugin_manager, reset_plugin_manager  # noqa: E402
from peftcore.runtime import REQUIRED_PRIMITIVES  # noqa: E402


@pytest.fixture
def fresh_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    monkeypatch.delenv(ENV_DISABLED, raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def torch_still_works() -> None:
    """The first-party torch backend, end to end: wrap, run, save-free merge round trip."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    peft_model = peftcore.get_peft_model(model, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    assert peft_model.backend.name == "torch"
    out = peft_model(torch.ones(2, 4))
    peft_model.merge_adapter()
    torch.testing.assert_close(peft_model(torch.ones(2, 4)), out)
    peft_model.unmerge_adapter()


# -- a plugin that fails on import --------------------------------------------------------------
def install_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> Path:
    """A distribution on sys.path whose ``peftcore`` entry point ``name`` is module ``<name>_plugin``."""
    dist = tmp_path / f"{name}_dist-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-dist\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[peftcore]\n{name} = {name}_plugin\n")
    (tmp_path / f"{name}_plugin.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "imported.marker"


@pytest.mark.parametrize("error", ["RuntimeError('cannot find libfoo')", "ImportError('no module bar')", "ZeroDivisionError()"])
def test_plugin_raising_on_import_is_named_and_others_work(
    fresh_manager: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    install_entry_point(tmp_path, monkeypatch, "exploding", f"raise {error}\n")
    manager = get_plugin_manager()
    failure = {f.name: f.error for f in manager.failures}["exploding"]
    assert error.split("(")[0] in failure
    assert "exploding: failed to load" in manager.describe_backends()
    with pytest.raises(BackendError, match=r"unknown backend 'exploding' \(its plugin failed to load"):
        manager.get_backend("exploding")
    torch_still_works()


def test_disabled_plugin_is_never_imported(fresh_manager: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = install_entry_point(
        tmp_path, monkeypatch, "unwanted", f"open({str(tmp_path / 'imported.marker')!r}, 'w').close()\nraise RuntimeError('boom')\n"
    )
    monkeypatch.setenv(ENV_DISABLED, "unwanted")
    reset_plugin_manager()
    manager = get_plugin_manager()
    assert not marker.exists() and "unwanted_plugin" not in sys.modules
    assert manager.failures == []
    assert "unwanted: disabled by PEFTCORE_DISABLED_PLUGINS" in manager.describe_backends()
    torch_still_works()


def test_disabling_the_torch_backend_is_explained(fresh_manager: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DISABLED, "torch")
    reset_plugin_manager()
    with pytest.raises(BackendError, match=r"(?s)no installed backend recognises.*torch: disabled by PEFTCORE_DISABLED_PLUGINS"):
        peftcore.get_peft_model(nn.Sequential(nn.Linear(2, 2)), LoraConfig(target_modules=["0"]))


# -- a plugin that raises inside a backend hook -------------------------------------------------
class FlakyNet(nn.Sequential):
    """A model only the flaky backend is asked to handle."""


def flaky_backend(failing_primitive: str) -> Any:
    """A backend plugin that is the torch backend, except that ``failing_primitive`` of its
    runtime raises."""
    from peftcore_torch.runtime import TorchRuntime

    def breaks(name: str) -> Any:
        def primitive(self: Any, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"{name} exploded")

        return primitive

    class FlakyRuntime(TorchRuntime):
        name = "flaky"

        def info(self) -> BackendInfo:
            return BackendInfo("flaky", "PyTorch", available=True, version="0")

        def detect(self, model: Any) -> bool:
            return isinstance(model, FlakyNet)

    if failing_primitive:
        setattr(FlakyRuntime, failing_primitive, breaks(failing_primitive))

    class FlakyPlugin:
        @hookimpl
        def peftcore_backend(self) -> Any:
            return FlakyRuntime()

    return FlakyPlugin()


#: Every primitive the workflow below reaches (``detect`` has a test of its own).
PRIMITIVES = [name for name in REQUIRED_PRIMITIVES if name != "detect"]


def flaky_workflow(tmp_path: Path) -> None:
    """Every PeftModel operation, so that each backend hook is called at least once."""
    torch.manual_seed(0)
    model = FlakyNet(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    peft_model = peftcore.get_peft_model(model, LoraConfig(r=2, target_modules=["0", "2"]), backend="flaky")
    peft_model(torch.ones(1, 4))
    peft_model.save_pretrained(tmp_path / "flaky")
    peft_model.merge_adapter()
    peft_model.unmerge_adapter()
    peft_model.load_adapter(tmp_path / "flaky", "second")
    peft_model.delete_adapter("second")
    with peft_model.disable_adapter():
        peft_model(torch.ones(1, 4))
    peft_model.get_nb_trainable_parameters()
    peft_model.merge_and_unload()


def test_flaky_backend_works_when_nothing_fails(fresh_manager: None, tmp_path: Path) -> None:
    get_plugin_manager().register(flaky_backend(failing_primitive=""), "flaky")
    flaky_workflow(tmp_path)


@pytest.mark.parametrize("primitive", PRIMITIVES)
def test_a_runtime_raising_in_a_primitive_is_named_and_others_work(
    fresh_manager: None, tmp_path: Path, primitive: str
) -> None:
    get_plugin_manager().register(flaky_backend(primitive), "flaky")
    with pytest.raises(BackendError, match=rf"backend 'flaky' failed in [\w ]+: RuntimeError: {primitive} exploded"):
        flaky_workflow(tmp_path)
    torch_still_works()


def test_a_plugin_whose_detect_raises_does_not_hide_the_others(fresh_manager: None) -> None:
    get_plugin_manager().register(flaky_backend("detect"), "flaky")
    torch_still_works()  # torch alone claims the model; the flaky plugin's error is set aside
    with pytest.raises(BackendError, match=r"(?s)no installed backend recognises.*! backend 'flaky' failed in detect"):
        peftcore.get_peft_model(object(), LoraConfig(target_modules=["x"]))


# -- a plugin that raises inside a broadcast (extension) hook ----------------------------------
class BadExtension:
    @hookimpl
    def peftcore_layer_kinds(self, backend: str) -> Any:
        raise RuntimeError("layer kinds exploded")

    @hookimpl
    def peftcore_op_builders(self, backend: str) -> Any:
        raise RuntimeError("op builders exploded")


def test_plugin_raising_in_an_extension_hook_is_named_and_others_work(fresh_manager: None) -> None:
    get_plugin_manager().register(BadExtension(), "badext")
    with pytest.warns(UserWarning, match="badext"):
        torch_still_works()


# -- the lazy start under threads and processes ------------------------------------------------
def test_threads_asking_at_once_get_one_manager_and_working_backends(fresh_manager: None) -> None:
    barrier = threading.Barrier(12)
    seen: list[Any] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            barrier.wait()
            manager = get_plugin_manager()
            seen.append(manager)
            assert manager.get_backend("torch").available
            assert PeftRegistry.get("lora") is LoraConfig
        except BaseException as exc:  # collected, re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert len(seen) == 12 and len({id(m) for m in seen}) == 1


def test_a_plugin_method_is_found_while_another_thread_loads_plugins(fresh_manager: None) -> None:
    loading, release = threading.Event(), threading.Event()

    @config_class
    class RaceConfig(LoraConfig):
        method = "race_lora"
        peft_type = "RACE_LORA"

    class SlowMethods:
        @hookimpl
        def peftcore_register_methods(self) -> Any:
            loading.set()
            release.wait(10)
            return [RaceConfig]

    get_plugin_manager().register(SlowMethods(), "slow-methods")
    PeftRegistry._plugins_loaded = False
    results: dict[str, Any] = {}

    def first() -> None:
        results["first"] = PeftRegistry.get("race_lora")

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert loading.wait(10)
        release_later = threading.Timer(0.5, release.set)
        release_later.start()
        try:
            results["second"] = PeftRegistry.get("race_lora")
        except PeftCoreError as exc:
            results["second"] = exc
    finally:
        release.set()
        thread.join(10)
        PeftRegistry._methods.pop("race_lora", None)
    assert results["second"] is RaceConfig


FORK_WHILE_STARTING = """
import os, sys, threading, time
import peftcore.plugins as plugins

inside, leave = threading.Event(), threading.Event()

def slow_start():  # a thread that is inside the lazy start when the process forks
    with plugins._lock:
        inside.set()
        leave.wait()

thread = threading.Thread(target=slow_start)
thread.start()
inside.wait()
pid = os.fork()
if pid == 0:
    plugins.get_plugin_manager().get_backend("torch")
    os._exit(0)
leave.set()
thread.join()
deadline = time.monotonic() + 8
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.05)
os.kill(pid, 9)
os.waitpid(pid, 0)
sys.exit("the forked child hung in get_plugin_manager()")
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    env = child_env(*sys.path)
    env.pop(ENV_DISABLED, None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_another_thread_starts_the_manager() -> None:
    done = run_python(FORK_WHILE_STARTING)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_children_and_fresh_processes_get_working_managers() -> None:
    code = textwrap.dedent(
        """
        import os, sys
        import torch, peftcore
        from peftcore import LoraConfig
        from peftcore.plugins import get_plugin_manager
        parent = get_plugin_manager()
        parent.get_backend("torch")

        def use():
            model = torch.nn.Sequential(torch.nn.Linear(3, 2))
            peft_model = peftcore.get_peft_model(model, LoraConfig(r=1, target_modules=["0"]))
            assert peft_model(torch.ones(1, 3)).shape == (1, 2)

        pid = os.fork()
        if pid == 0:
            ok = get_plugin_manager() is parent  # the inherited manager is this process's now
            use()
            os._exit(0 if ok else 3)
        use()
        sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        """
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
