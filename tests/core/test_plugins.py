"""Plugin discovery, backend selection and plugin faults."""

import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

import peftcore
from peftcore import BackendError, BackendInfo, LoraConfig, hookimpl
from peftcore.plugins import ENV_BACKEND, ENV_DISABLED, PluginManager, get_plugin_manager, reset_plugin_manager
from peftcore.runtime import REQUIRED_PRIMITIVES, BackendRuntime


class FakeModel:
    pass


class BrokenRuntime(BackendRuntime):
    """A runtime claiming FakeModel whose every other primitive raises."""

    name, framework = "broken", "Fake"

    def info(self) -> BackendInfo:
        return BackendInfo("broken", "Fake", available=True, version="0")

    def detect(self, model: Any) -> bool:
        return isinstance(model, FakeModel)


def _raiser(name: str) -> Any:
    def primitive(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    primitive.__name__ = name
    return primitive


for _name in REQUIRED_PRIMITIVES:
    if _name not in vars(BrokenRuntime):
        setattr(BrokenRuntime, _name, _raiser(_name))


class BrokenBackend:
    """A backend plugin whose runtime raises in every primitive but ``info`` and ``detect``."""

    @hookimpl
    def peftcore_backend(self) -> BackendRuntime:
        return BrokenRuntime()


@pytest.fixture
def fresh_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    monkeypatch.delenv(ENV_DISABLED, raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def test_first_party_backends_come_from_entry_points(fresh_manager: None) -> None:
    backends = get_plugin_manager().backends()
    assert {"torch", "singa"} <= set(backends)
    assert backends["torch"].info.framework == "PyTorch"


def test_unknown_backend_lists_installed(fresh_manager: None) -> None:
    with pytest.raises(BackendError, match=r"(?s)unknown backend 'torh'.*'torch'.*installed backends:\n.*torch \(PyTorch\)"):
        get_plugin_manager().get_backend("torh")


def test_selection_order(fresh_manager: None, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    manager = get_plugin_manager()
    assert manager.select_backend(model).name == "torch"  # detection
    monkeypatch.setenv(ENV_BACKEND, "nope")
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        manager.select_backend(model)
    assert manager.select_backend(model, config=LoraConfig(backend="torch")).name == "torch"  # config beats env
    with pytest.raises(BackendError, match="unknown backend 'other'"):
        manager.select_backend(model, backend="other", config=LoraConfig(backend="torch"))  # argument beats config


def test_no_backend_recognises_model(fresh_manager: None) -> None:
    with pytest.raises(BackendError, match=r"no installed backend recognises a .*FakeModel.*installed backends"):
        peftcore.get_peft_model(FakeModel(), LoraConfig(target_modules=["x"]))


def test_disabled_plugins_env(fresh_manager: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DISABLED, "torch, singa")
    reset_plugin_manager()
    manager = get_plugin_manager()
    assert "torch" not in manager.backends()
    with pytest.raises(BackendError, match="torch: disabled by PEFTCORE_DISABLED_PLUGINS"):
        manager.get_backend("torch")


def test_plugin_raising_in_hook_is_named_and_others_keep_working(fresh_manager: None) -> None:
    torch = pytest.importorskip("torch")
    manager = get_plugin_manager()
    manager.register(BrokenBackend(), "broken")
    with pytest.raises(BackendError, match=r"backend 'broken' failed in describe: RuntimeError: boom"):
        peftcore.get_peft_model(FakeModel(), LoraConfig(target_modules=["x"]))
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    wrapped = peftcore.get_peft_model(model, LoraConfig(target_modules=["0"]))
    assert wrapped.backend.name == "torch"


def test_incomplete_backend_is_unavailable_and_told_what_it_lacks(fresh_manager: None) -> None:
    class HalfRuntime(BackendRuntime):
        def info(self) -> BackendInfo:
            return BackendInfo("half", "Fake", available=True)

        def detect(self, model: Any) -> bool:
            return False

    class HalfBackend:
        @hookimpl
        def peftcore_backend(self) -> BackendRuntime:
            return HalfRuntime()

    manager = get_plugin_manager()
    manager.register(HalfBackend(), "half")
    with pytest.raises(BackendError, match="half.*not available: its runtime does not implement describe, peft_model_class"):
        manager.get_backend("half")


def test_a_backend_hook_returning_something_else_is_unavailable(fresh_manager: None) -> None:
    class OddBackend:
        @hookimpl
        def peftcore_backend(self) -> Any:
            return {"not": "a runtime"}

    manager = get_plugin_manager()
    manager.register(OddBackend(), "odd")
    with pytest.raises(BackendError, match="odd.*not available.*returned dict, not a peftcore.runtime.BackendRuntime"):
        manager.get_backend("odd")


def test_entry_point_that_fails_to_import_is_reported(fresh_manager: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "broken_peftcore_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-peftcore-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[peftcore]\nbrokenplug = broken_peftcore_plugin_module\n")
    (tmp_path / "broken_peftcore_plugin_module.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reset_plugin_manager()
    manager = get_plugin_manager()
    assert "brokenplug" in [f.name for f in manager.failures]
    assert "broken on purpose" in manager.describe_backends()
    with pytest.raises(BackendError, match="brokenplug.*failed to load: ImportError: this plugin is broken on purpose"):
        manager.get_backend("brokenplug")
    assert "torch" in manager.backends()


def test_lazy_manager_is_built_once_under_threads(fresh_manager: None) -> None:
    seen = []
    barrier = threading.Barrier(8)

    def grab() -> None:
        barrier.wait()
        seen.append(get_plugin_manager())

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(m) for m in seen}) == 1


def test_hooks_are_called_on_the_selected_backend_only(fresh_manager: None) -> None:
    manager = PluginManager(load_entry_points=False)
    calls = []

    class Recorder(BrokenBackend):
        def __init__(self, label: str) -> None:
            self.label = label

        @hookimpl
        def peftcore_backend(self) -> BackendRuntime:
            calls.append(self.label)
            return BrokenRuntime()

    manager.register(Recorder("a"), "a")
    manager.register(Recorder("b"), "b")
    assert manager.get_backend("b").info.name == "broken"
    assert calls == ["b"]  # only b's backend hook ran


def test_a_misspelled_hook_leaves_its_plugin_out_named_and_the_others_working(
    fresh_manager: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pluggy's check_pending runs after the entry points load: a hook implementation with
    no specification would otherwise be ignored silently."""
    dist = tmp_path / "typo_peftcore_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: typo-peftcore-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[peftcore]\ntypoplug = typo_peftcore_plugin_module\n")
    (tmp_path / "typo_peftcore_plugin_module.py").write_text(
        "from peftcore import hookimpl\n\n@hookimpl\ndef peftcore_register_method():\n    return []\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reset_plugin_manager()
    manager = get_plugin_manager()
    failure = next(f for f in manager.failures if f.name == "typoplug")
    assert "peftcore_register_method" in failure.error and "unknown hook" in failure.error
    assert manager.pm.get_plugin("typoplug") is None
    assert "torch" in manager.backends()


def test_registering_a_plugin_with_a_misspelled_hook_is_refused_by_name(fresh_manager: None) -> None:
    class Typo:
        @hookimpl
        def peftcore_op_builder(self, backend: str) -> Any:
            return {}

    manager = PluginManager(load_entry_points=False)
    with pytest.raises(BackendError, match="plugin 'typo' could not be registered.*peftcore_op_builder"):
        manager.register(Typo(), "typo")
    assert manager.pm.get_plugin("typo") is None


class LimitedRuntime(BrokenRuntime):
    """Declares that it cannot build prefix tuning, and builds nothing but freeze_base."""

    def info(self) -> BackendInfo:
        return BackendInfo("limited", "Fake", available=True, version="0", limitations={"prefix_tuning": "no attention"})

    def builders(self) -> Any:
        return {}


class LimitedBackend:
    @hookimpl
    def peftcore_backend(self) -> BackendRuntime:
        return LimitedRuntime()


def test_the_core_refuses_what_a_backend_declares_it_cannot_build(fresh_manager: None) -> None:
    from peftcore import PlanError, PrefixTuningConfig

    manager = PluginManager(load_entry_points=False)
    manager.register(LimitedBackend(), "limited")
    backend = manager.get_backend("limited")
    with pytest.raises(PlanError, match=r"limited backend cannot build prefix_tuning \(PrefixTuningConfig\): no attention"):
        backend.refuse_unbuildable(PrefixTuningConfig(num_virtual_tokens=2))
    backend.refuse_unbuildable(LoraConfig())  # not declared: left to the builders' own check


def test_builders_are_keyed_by_op_class_and_an_op_name_key_is_turned_into_its_class() -> None:
    from peftcore.methods.lora import AddLora
    from peftcore.plan import FreezeBase
    from peftcore.plugins import by_op_class

    def build(*args: Any) -> None:
        return None

    assert by_op_class({AddLora: build, "freeze_base": build, "no_such_op": build}) == {AddLora: build, FreezeBase: build}
