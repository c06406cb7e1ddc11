"""Regression tests for issue 15 ("Reliability round 2: what an attacker found"), one
or more per numbered case, named ``test_case<N>_...``. The denial-of-service cases run
in a subprocess limited in time and memory (``resource.setrlimit``)."""

from __future__ import annotations

import threading
import warnings
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
from torch import nn  # noqa: E402

import peftcore  # noqa: E402
from peftcore import AdapterError, LoraConfig  # noqa: E402
from peftcore.testing.numerics import assert_close_to_scale, close_to_scale  # noqa: E402


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def lora(**changes: Any) -> LoraConfig:
    fields: dict[str, Any] = dict(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    return LoraConfig(**{**fields, **changes})


def two_adapters(seed: int = 0) -> Any:
    pm = peftcore.get_peft_model(mlp(seed), lora())
    pm.add_adapter("b", lora())
    pm.eval()
    return pm


def only(pm: Any, name: str, x: Any) -> Any:
    """The output with ``name`` alone active (nothing merged)."""
    pm.unmerge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.set_adapter(name)
    with torch.no_grad():
        return pm(x)


# -- 1. switching adapters while one is merged -------------------------------------------
@pytest.mark.parametrize("switch", ["set_adapter", "delete_default", "disable", "add_then_set", "load"])
def test_case1_a_merged_adapter_never_adds_to_another_ones_output(switch: str, tmp_path: Any) -> None:
    pm = two_adapters()
    x = torch.randn(3, 8)
    want_b = only(pm, "b", x)
    with torch.no_grad():
        base = pm.get_base_model()
        pm.set_adapter("default")
        with pm.disable_adapter():
            want_base = pm(x)
    pm.set_adapter("default")
    pm.merge_adapter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if switch == "set_adapter":
            pm.set_adapter("b")
            want = want_b
        elif switch == "delete_default":
            with pytest.raises(AdapterError, match="merged"):
                pm.delete_adapter("default")
            pm.set_adapter("b")
            pm.delete_adapter("default")
            want = want_b
        elif switch == "disable":
            with pm.disable_adapter(), torch.no_grad():
                assert_close_to_scale(pm(x), want_base)
            assert pm.merged_adapters == ["default"]
            want = only(pm, "default", x)
            pm.merge_adapter()
        elif switch == "add_then_set":
            pm.add_adapter("c", lora())
            pm.set_adapter("c")
            want = only(pm, "c", x)
        else:
            pm.set_adapter("b")
            pm.merge_adapter()
            pm.unmerge_adapter()
            pm.save_pretrained(tmp_path)
            pm.merge_adapter()
            pm.load_adapter(tmp_path / "b", "b2")
            pm.set_adapter("b2")
            want = want_b
    with torch.no_grad():
        got = pm(x)
    assert close_to_scale(got, want), switch
    assert set(pm.merged_adapters) <= set(pm.active_adapters)
    if switch == "set_adapter":
        assert any("unmerging them first" in str(w.message) for w in caught)
    del base


def test_case1_mixed_batches_save_and_unload_while_merged() -> None:
    pm = two_adapters()
    x = torch.randn(2, 8)
    pm.merge_adapter()
    with pytest.raises(AdapterError, match="merged"):
        pm(x, adapter_names=["b", "default"])
    want = only(pm, "default", x)
    pm.merge_adapter()
    with torch.no_grad():
        merged_unloaded = pm.merge_and_unload()(x)
    assert_close_to_scale(merged_unloaded, want)


# -- 2. unmerge keeps edits made while merged ---------------------------------------------
@pytest.mark.parametrize("edit", ["add_", "load_state_dict", "data"])
def test_case2_unmerge_keeps_a_change_made_while_merged(edit: str) -> None:
    pm = two_adapters()
    layer = pm.get_base_model()[0]
    original = layer.base_layer.weight.detach().clone()
    pm.merge_adapter()
    if edit == "add_":
        with torch.no_grad():
            layer.base_layer.weight.add_(1.0)
    elif edit == "load_state_dict":
        state = {k: v + 1.0 if k == "weight" else v for k, v in layer.base_layer.state_dict().items()}
        layer.base_layer.load_state_dict(state)
    else:
        layer.base_layer.weight.data += 1.0
    with pytest.warns(UserWarning, match="changed while adapters"):
        pm.unmerge_adapter()
    assert_close_to_scale(layer.base_layer.weight, original + 1.0)


def test_case2_unchanged_weights_unmerge_bit_exactly_without_warning() -> None:
    pm = two_adapters()
    before = {k: v.clone() for k, v in pm.get_base_model().state_dict().items()}
    for _ in range(3):
        pm.merge_adapter()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pm.unmerge_adapter()
    for key, value in pm.get_base_model().state_dict().items():
        assert torch.equal(value, before[key]), key


def test_case2_a_failed_first_merge_leaves_no_stale_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    pm = two_adapters()
    layer = pm.get_base_model()[2]
    real = type(layer).delta_weight

    def boom(self: Any, name: str) -> Any:
        raise RuntimeError("injected")

    monkeypatch.setattr(type(layer), "delta_weight", boom)
    with pytest.raises(peftcore.BackendError, match="injected"):
        pm.merge_adapter()
    monkeypatch.setattr(type(layer), "delta_weight", real)
    assert layer.merge_record is None
    with torch.no_grad():
        layer.base_layer.weight.mul_(2.0)  # a change between the failed merge and the next
    changed = layer.base_layer.weight.detach().clone()
    pm.merge_adapter()
    pm.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, changed)


# -- 3. mixed-batch routing is per call, thread-safe ----------------------------------------
def test_case3_concurrent_mixed_batches_give_the_serial_results() -> None:
    pm = two_adapters()
    pm.add_adapter("c", lora())
    names = ["default", "b", "c", "__base__"]
    rng = np.random.default_rng(0)
    jobs = []
    for _ in range(48):
        rows = [names[i] for i in rng.integers(0, len(names), size=5)]
        jobs.append((torch.randn(5, 8), rows))
    with torch.no_grad():
        serial = [pm(x, adapter_names=rows) for x, rows in jobs]
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for index in range(worker, len(jobs), 6):
                x, rows = jobs[index]
                with torch.no_grad():
                    results[index] = pm(x, adapter_names=rows)
                    pm(x)  # a plain call in between must not be routed by another thread
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    wrong = sum(not close_to_scale(r, s) for r, s in zip(results, serial))
    assert wrong == 0
    assert all(layer.batch_routing is None for layer in pm.get_base_model() if hasattr(layer, "lora_A"))


# -- 4. safe_merge checks the layer's current dtype -------------------------------------
def test_case4_safe_merge_checks_the_dtype_the_layer_has_now() -> None:
    pm = peftcore.get_peft_model(mlp(), lora())
    with torch.no_grad():
        for layer in pm.get_base_model():
            if hasattr(layer, "lora_A"):
                layer.lora_A["default"].weight.fill_(300.0)
                layer.lora_B["default"].weight.fill_(300.0)
    pm.half()  # the graph still says float32
    before = {k: v.clone() for k, v in pm.get_base_model().state_dict().items()}
    with pytest.raises(AdapterError, match="float16"):
        pm.merge_adapter(safe_merge=True)
    for key, value in pm.get_base_model().state_dict().items():
        assert torch.equal(value, before[key]), key


# -- 5. the stored plan and the config must agree --------------------------------------
@pytest.mark.parametrize("field", ["scaling", "r", "lora_alpha"])
def test_case5_a_plan_disagreeing_with_its_config_is_refused(tmp_path: Any, field: str) -> None:
    import json

    from safetensors.numpy import load_file, save_file

    from peftcore.io import METADATA_KEY, WEIGHTS_NAME

    pm = peftcore.get_peft_model(mlp(), lora())
    pm.save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    from safetensors import safe_open

    with safe_open(str(weights), "np") as handle:
        metadata = dict(handle.metadata())
    record = json.loads(metadata[METADATA_KEY])
    op = next(op for op in record["plan"]["ops"] if op.get("op") == "lora" or "scaling" in op)
    op[field] = {"scaling": 50.0, "r": 3, "lora_alpha": 100.0}[field]
    metadata[METADATA_KEY] = json.dumps(record)
    save_file(load_file(str(weights)), str(weights), metadata=metadata)
    before = weights.read_bytes()
    model = mlp()
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors.*layer '0'.*disagrees with the config"):
        peftcore.PeftModel.from_pretrained(model, tmp_path)
    assert not any(hasattr(m, "lora_A") for m in model.modules())
    assert weights.read_bytes() == before


# -- 13. SystemExit from a plugin is contained -------------------------------------------
def test_case13_sys_exit_in_a_plugin_import_or_hook_is_a_plugin_failure(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftcore import hookimpl
    from peftcore.plugins import ENV_BACKEND, ENV_DISABLED, get_plugin_manager, reset_plugin_manager
    from tests.reliability.test_plugin_faults import install_entry_point, torch_still_works

    monkeypatch.delenv(ENV_BACKEND, raising=False)
    monkeypatch.delenv(ENV_DISABLED, raising=False)
    reset_plugin_manager()
    try:
        install_entry_point(tmp_path, monkeypatch, "quitter", "import sys\nsys.exit(0)\n")
        manager = get_plugin_manager()
        assert "SystemExit" in {f.name: f.error for f in manager.failures}["quitter"]

        class ExitingHooks:
            @hookimpl
            def peftcore_layer_kinds(self, backend: str) -> Any:
                raise SystemExit(0)

            @hookimpl
            def peftcore_register_methods(self) -> Any:
                raise SystemExit(3)

        manager.register(ExitingHooks(), "exiting-hooks")
        with pytest.warns(UserWarning, match="SystemExit"):
            torch_still_works()
        assert any(f.name == "exiting-hooks" and "SystemExit" in f.error for f in manager.failures)
    finally:
        reset_plugin_manager()


# -- 10. convert --to hf is all-or-nothing, with save_pretrained's file modes -------------
def test_case10_convert_to_hf_rolls_back_when_a_rename_fails(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import stat

    from peftcore.convert import convert
    from peftcore.io import CONFIG_NAME, WEIGHTS_NAME

    first = peftcore.get_peft_model(mlp(0), lora())
    first.save_pretrained(tmp_path / "one")
    second = peftcore.get_peft_model(mlp(1), lora(lora_alpha=8))
    second.save_pretrained(tmp_path / "two")
    out = tmp_path / "out"
    convert(tmp_path / "one", out, to="hf")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        made = stat.S_IMODE(os.stat(out / name).st_mode)
        saved = stat.S_IMODE(os.stat(tmp_path / "one" / name).st_mode)
        assert made == saved
    before = {name: (out / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any, **dir_fds: Any) -> None:
        if str(dst).endswith(WEIGHTS_NAME):
            raise OSError(28, "No space left on device")
        real_replace(src, dst, **dir_fds)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        convert(tmp_path / "two", out, to="hf", overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert {name: (out / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)} == before
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


# -- 11. writing a file never touches the process umask ---------------------------------------
def test_case11_saving_never_changes_the_umask(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import stat

    calls: list[int] = []
    real_umask = os.umask

    def spy(mask: int) -> int:
        calls.append(mask)
        return real_umask(mask)

    old = real_umask(0o077)
    try:
        monkeypatch.setattr(os, "umask", spy)
        pm = two_adapters()
        pm.save_pretrained(tmp_path)
        from peftcore.convert import convert

        convert(tmp_path, tmp_path / "hf", to="hf")
    finally:
        real_umask(old)
    assert calls == []
    for path in [tmp_path / "adapter_model.safetensors", tmp_path / "b" / "adapter_config.json", tmp_path / "hf" / "adapter_model.safetensors"]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path  # 0666 less umask 077


# -- 12. a symlinked adapter subfolder is refused -------------------------------------------
def test_case12_a_symlinked_adapter_folder_is_refused_before_writing(tmp_path: Any) -> None:
    import os

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save = tmp_path / "save"
    save.mkdir()
    os.symlink(elsewhere, save / "b")
    pm = two_adapters()
    with pytest.raises(AdapterError, match=r"save/b.*symbolic link"):
        pm.save_pretrained(save)
    assert list(elsewhere.iterdir()) == []
    assert sorted(p.name for p in save.iterdir()) == ["b"]  # default not written either
    (save / "file").write_text("x")
    os.symlink(save / "file", save / "c")
    pm.add_adapter("c", lora())
    with pytest.raises(AdapterError, match="symbolic link"):
        pm.save_pretrained(save, selected_adapters=["c"])


# -- 14. adapter names -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["__base__", "x" * 300, "é" * 150, "tab\there"])
def test_case14_bad_adapter_names_are_refused_before_anything_is_written(name: str, tmp_path: Any) -> None:
    pm = peftcore.get_peft_model(mlp(), lora())
    with pytest.raises(AdapterError, match="adapter name"):
        pm.add_adapter(name, lora())
    assert list(pm.peft_config) == ["default"]
    from peftcore.io import adapter_subfolders

    with pytest.raises(AdapterError, match="adapter name"):
        adapter_subfolders(["default", name])
    pm.save_pretrained(tmp_path / "fine")
    pm.peft_config[name] = pm.peft_config["default"]  # as if smuggled in: still nothing written
    pm.plans[name] = pm.plans["default"]
    with pytest.raises(AdapterError, match="adapter name"):
        pm.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# -- 1 + 2 attacked together: random sequences of state changes -------------------------
def test_case1_and_2_random_sequences_keep_output_equal_to_base_plus_active_adapters() -> None:
    """Bounded Hypothesis run over sequences of merge / unmerge / set_adapter / edits of
    the base weight / add / delete / disable: after every step, the output must be what
    the (edited) base weights plus exactly the active adapters give."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    steps = st.lists(
        st.one_of(
            st.just(("merge",)),
            st.just(("unmerge",)),
            st.tuples(st.just("set"), st.sampled_from(["default", "b", "c"])),
            st.tuples(st.just("edit"), st.sampled_from([0, 2]), st.floats(-0.5, 0.5, width=32)),
            st.just(("add_c",)),
            st.just(("delete_c",)),
            st.just(("disabled",)),
        ),
        max_size=10,
    )

    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(steps)
    def run(sequence: list) -> None:
        pm = two_adapters()
        base = pm.get_base_model()
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
        truth = {i: base[i].base_layer.weight.detach().clone() for i in (0, 2)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in sequence:
                if step[0] == "merge":
                    pm.merge_adapter()
                elif step[0] == "unmerge":
                    pm.unmerge_adapter()
                elif step[0] == "set" and step[1] in pm.peft_config:
                    pm.set_adapter(step[1])
                elif step[0] == "edit":
                    with torch.no_grad():
                        base[step[1]].base_layer.weight.add_(step[2])
                    truth[step[1]] = truth[step[1]] + step[2]
                elif step[0] == "add_c" and "c" not in pm.peft_config:
                    pm.add_adapter("c", lora())
                elif step[0] == "delete_c" and "c" in pm.peft_config and "c" not in pm.merged_adapters:
                    pm.delete_adapter("c")
                elif step[0] == "disabled":
                    with pm.disable_adapter(), torch.no_grad():
                        assert_close_to_scale(pm(x), reference(pm, truth, x, []))
                with torch.no_grad():
                    got = pm(x)
                assert close_to_scale(got, reference(pm, truth, x, pm.active_adapters)), step
            pm.unmerge_adapter()
        for i in (0, 2):
            assert_close_to_scale(base[i].base_layer.weight, truth[i])

    run()


def reference(pm: Any, truth: dict, x: Any, active: list) -> Any:
    """What the base weights ``truth`` plus the ``active`` adapters compute."""
    base = pm.get_base_model()
    h = x
    for i in (0, 2):
        weight = truth[i].clone()
        for name in active:
            weight = weight + base[i].delta_weight(name).detach()
        h = torch.nn.functional.linear(h, weight, base[i].base_layer.bias)
        if i == 0:
            h = torch.relu(h)
    return h


def test_case2_bitfit_unmerge_keeps_a_bias_edit_made_while_merged() -> None:
    from peftcore import BitFitConfig

    pm = peftcore.get_peft_model(mlp(), BitFitConfig(target_modules=["0", "2"]))
    layer = pm.get_base_model()[0]
    with torch.no_grad():
        for store in layer.bitfit_bias.values():
            store.add_(0.25)
    original = layer.base_layer.bias.detach().clone()
    pm.merge_adapter()
    pm.unmerge_adapter()
    assert torch.equal(layer.base_layer.bias, original)  # unchanged: bit-exact
    pm.merge_adapter()
    with torch.no_grad():
        layer.base_layer.bias.add_(1.0)
    with pytest.warns(UserWarning, match="bias changed while adapters"):
        pm.unmerge_adapter()
    assert_close_to_scale(layer.base_layer.bias, original + 1.0)
