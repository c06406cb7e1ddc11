"""Issue 23, class 5: changing adapters while other threads serve the model.

Reader threads run a real tiny Llama (``tests/integration/tiny.py``) with a mixed batch
(``adapter_names=[...]``), with the active adapter, or through ``generate``, while one
writer thread changes the adapters in a bounded loop: ``load_adapter`` onto the served
name, ``set_peft_model_state_dict``, ``delete_adapter`` then ``add_adapter``/``load_adapter``,
``set_adapter``, merging, disabling, ``add_weighted_adapter``. The outputs of every state
the model can be in were computed beforehand, in one thread; each reader call must
equal one of them as a whole (every row from the same state: no row from half a change,
none matching neither the old adapter nor the new). A refusal may only be an
:class:`~peftcore.errors.AdapterError` with the message the test names (a bare
``KeyError`` or any other exception fails the test). After each change the writer waits
(bounded) for a reader call to finish, so reads and changes really interleave.

The model of :mod:`peftcore.model_lock` makes this hold: forwards read, changes write.
"""

from __future__ import annotations

import copy
import pickle
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("transformers")

import peftcore  # noqa: E402
from peftcore import AdapterError, LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from peftcore.model_lock import model_lock  # noqa: E402
from peftcore.testing.numerics import FLOAT32_RTOL, assert_close_to_scale, close_to_scale, scaled_difference  # noqa: E402
from tests.integration import tiny  # noqa: E402

ROWS = ["a", "b", "__base__", "b", "a", "b"]
TOKENS = tiny.random_ids(len(ROWS), 8)
READERS = 3
CHANGES = 24  # writes per test: a few seconds in all on two shared CPU cores
WAIT_FOR_READ_S = 2.0
NO_ADAPTER_B = r"adapter_names names no adapter 'b'"
MERGED = r"Cannot pass `adapter_names` when there are merged adapters"


def lora(random_init: bool = True) -> LoraConfig:
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], init_lora_weights=not random_init
    )


def logits(pm: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return pm(TOKENS, **kwargs).logits


class Served:
    """A tiny Llama with adapters ``a`` and ``b``, the two versions of ``b`` as saved
    directories and state dicts, and the outputs of each state, computed in one thread."""

    def __init__(self, tmp_path: Path) -> None:
        torch.manual_seed(1)
        self.pm = peftcore.get_peft_model(tiny.llama_lm(), lora(), adapter_name="a")
        self.dirs: dict[str, str] = {}
        self.states: dict[str, dict[str, Any]] = {}
        for version, seed in (("new", 3), ("old", 2)):  # "old" last: it is the one served at the start
            torch.manual_seed(seed)
            if "b" in self.pm.peft_config:
                self.pm.delete_adapter("b")
            self.pm.add_adapter("b", lora())
            self.pm.save_pretrained(str(tmp_path / version), selected_adapters=["b"])
            self.dirs[version] = str(tmp_path / version / "b")
            self.states[version] = get_peft_model_state_dict(self.pm, adapter_name="b")
        self.pm.eval()
        self.mixed = {"old": logits(self.pm, adapter_names=ROWS)}
        self.pm.load_adapter(self.dirs["new"], "b")
        self.mixed["new"] = logits(self.pm, adapter_names=ROWS)
        self.pm.load_adapter(self.dirs["old"], "b")
        self.mixed["all base"] = logits(self.pm, adapter_names=["__base__"] * len(ROWS))
        self.plain = {"a": logits(self.pm)}
        self.pm.set_adapter("b")
        self.plain["b"] = logits(self.pm)
        self.pm.set_adapter("a")
        self.plain["base"] = self.mixed["all base"]
        for outputs in (self.mixed, self.plain):
            _check_distinct(outputs)


def _check_distinct(outputs: dict[str, Any]) -> None:
    """Every two states differ by far more than the tolerance of the comparisons (float
    rounding differs by route: folded, stacked, merged weights)."""
    names = list(outputs)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            gap, scale = scaled_difference(outputs[first], outputs[second])
            assert gap > 100 * FLOAT32_RTOL * scale, f"states {first!r} and {second!r} give the same output"


def _state_of(out: Any, outputs: dict[str, Any]) -> Optional[str]:
    """The one state whose output ``out`` equals, every row, or None."""
    for name, expected in outputs.items():
        if out.shape == expected.shape and close_to_scale(out, expected):
            return name
    return None


def _describe_rows(out: Any, outputs: dict[str, Any]) -> str:
    """Which states each row of ``out`` matches, for the failure message."""
    rows = []
    for row in range(out.shape[0]):
        matches = [n for n, e in outputs.items() if out.shape == e.shape and close_to_scale(out[row], e[row])]
        rows.append(f"row {row} ({ROWS[row] if row < len(ROWS) else '?'}): {matches or 'NEITHER'}")
    return "; ".join(rows)


class Serving:
    """Reader threads calling ``read()`` until stopped, checking each result."""

    def __init__(self, read: Callable[[], Any], outputs: dict[str, Any], refusals: tuple[str, ...] = ()) -> None:
        self.read, self.outputs, self.refusals = read, outputs, refusals
        self.stop = threading.Event()
        self.done = threading.Condition()
        self.calls = 0
        self.seen: set[str] = set()
        self.refused = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._serve, daemon=True) for _ in range(READERS)]

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                out = self.read()
            except AdapterError as exc:
                with self.done:
                    self.refused += 1
                    if not any(re.search(pattern, str(exc)) for pattern in self.refusals):
                        self.failures.append(f"unexpected refusal: {exc}")
                continue
            except Exception as exc:  # a bare KeyError from inside the routing lands here
                with self.done:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                return
            state = _state_of(out, self.outputs)
            with self.done:
                if state is None:
                    self.failures.append("a call saw no consistent state: " + _describe_rows(out, self.outputs))
                else:
                    self.seen.add(state)
                self.calls += 1
                self.done.notify_all()

    def __enter__(self) -> Serving:
        for thread in self.threads:
            thread.start()
        return self

    def wait_for_a_read(self) -> None:
        """Until one more reader call ends (bounded), so that changes and reads interleave."""
        with self.done:
            before = self.calls + self.refused
            self.done.wait_for(lambda: self.calls + self.refused > before or bool(self.failures), WAIT_FOR_READ_S)

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in self.threads), "a reader thread hangs"

    def check(self, must_see: set[str]) -> None:
        assert not self.failures, self.failures[:3]
        assert self.calls >= READERS
        assert must_see <= self.seen, f"readers saw only {sorted(self.seen)}"


def _until(condition: Callable[[], bool], bound_s: float = 10.0) -> bool:
    deadline = time.monotonic() + bound_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _mixed_reader(served: Served) -> Callable[[], Any]:
    return lambda: logits(served.pm, adapter_names=ROWS)


def test_load_adapter_onto_the_served_name(tmp_path: Path) -> None:
    served = Served(tmp_path)
    with Serving(_mixed_reader(served), served.mixed) as serving:
        for change in range(CHANGES):
            served.pm.load_adapter(served.dirs["new" if change % 2 == 0 else "old"], "b")
            serving.wait_for_a_read()
    serving.check({"old", "new"})


def test_set_peft_model_state_dict_while_serving(tmp_path: Path) -> None:
    served = Served(tmp_path)
    with Serving(_mixed_reader(served), served.mixed) as serving:
        for change in range(CHANGES):
            set_peft_model_state_dict(served.pm, served.states["new" if change % 2 == 0 else "old"], "b")
            serving.wait_for_a_read()
    serving.check({"old", "new"})


def test_delete_then_add_while_serving(tmp_path: Path) -> None:
    """Between ``delete_adapter`` and ``add_adapter`` the name is gone: a call then is
    refused with an AdapterError naming it. ``add_adapter`` with LoRA's default
    initialisation (B = 0) serves ``b`` as the base model; ``load_adapter`` onto the
    free name adds and fills it in one change."""
    served = Served(tmp_path)
    served.mixed["b is zero"] = logits(served.pm, adapter_names=[r if r != "b" else "__base__" for r in ROWS])
    del served.mixed["all base"]
    with Serving(_mixed_reader(served), served.mixed, refusals=(NO_ADAPTER_B,)) as serving:
        for change in range(CHANGES):
            served.pm.delete_adapter("b")
            if change % 2 == 0:
                served.pm.add_adapter("b", lora(random_init=False))
            else:
                served.pm.load_adapter(served.dirs["old"], "b")
            serving.wait_for_a_read()
    serving.check({"old", "b is zero"})


def test_switching_merging_disabling_and_combining_while_serving(tmp_path: Path) -> None:
    """Plain forwards (the active adapter) see ``a``, ``b`` or the base model, never a
    model half switched, half merged or half disabled; mixed batches see their rows or,
    while an adapter is merged, a refusal."""
    served = Served(tmp_path)
    pm = served.pm
    changes: list[Callable[[], Any]] = [
        lambda: pm.set_adapter("b"),
        lambda: pm.merge_adapter(),
        lambda: pm.unmerge_adapter(),
        lambda: pm.set_adapter("a"),
        lambda: pm.disable_adapter_layers(),
        lambda: pm.enable_adapter_layers(),
        lambda: pm.add_weighted_adapter(["a", "b"], [0.5, 0.5], "w", combination_type="cat"),
        lambda: pm.delete_adapter("w"),
    ]
    mixed = {"rows": served.mixed["old"], "all base": served.mixed["all base"]}
    with Serving(lambda: logits(pm), served.plain) as plain, Serving(
        _mixed_reader(served), mixed, refusals=(MERGED,)
    ) as routed:
        for change in range(3 * len(changes)):
            changes[change % len(changes)]()
            plain.wait_for_a_read()
    plain.check({"a", "b", "base"})
    routed.check({"rows"})


def test_generate_with_adapter_names_while_loading(tmp_path: Path) -> None:
    """Each ``generate`` call decodes every row with one version of ``b`` throughout."""
    served = Served(tmp_path)
    pm = served.pm

    def generate() -> Any:
        with torch.no_grad():
            return pm.generate(input_ids=TOKENS, adapter_names=ROWS, max_new_tokens=4, do_sample=False).float()

    tokens = {"old": generate()}
    pm.load_adapter(served.dirs["new"], "b")
    tokens["new"] = generate()
    pm.load_adapter(served.dirs["old"], "b")
    assert not torch.equal(tokens["old"], tokens["new"]), "both versions of b decode the same tokens"
    with Serving(generate, tokens) as serving:
        for change in range(CHANGES // 2):
            pm.load_adapter(served.dirs["new" if change % 2 == 0 else "old"], "b")
            serving.wait_for_a_read()
    assert not serving.failures, serving.failures[:3]
    assert serving.calls >= READERS


def test_a_change_waits_for_a_running_forward_and_holds_later_ones(tmp_path: Path) -> None:
    """A forward that is running when a change starts finishes on the old state; one
    started while the change waits runs on the new state."""
    served = Served(tmp_path)
    pm = served.pm
    layer = pm.get_base_model().model.layers[0].self_attn.q_proj
    inside, release = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def slow_hook(module: Any, args: Any) -> None:
        if threading.current_thread().name == "first":
            inside.set()
            release.wait(10)

    handle = layer.register_forward_pre_hook(slow_hook)
    try:
        first = threading.Thread(name="first", target=lambda: results.update(first=logits(pm, adapter_names=ROWS)))
        writer = threading.Thread(target=lambda: pm.load_adapter(served.dirs["new"], "b"))
        second = threading.Thread(target=lambda: results.update(second=logits(pm, adapter_names=ROWS)))
        lock = model_lock(pm)
        first.start()
        assert inside.wait(10)
        writer.start()
        assert _until(lambda: lock._writers_waiting == 1), "the change did not wait for the running forward"
        second.start()
        assert _until(lambda: lock._readers_waiting == 1), "a forward went in ahead of the waiting change"
        assert writer.is_alive() and "second" not in results
        release.set()
        for thread in (first, writer, second):
            thread.join(30)
    finally:
        handle.remove()
        release.set()
    assert _state_of(results["first"], served.mixed) == "old"
    assert _state_of(results["second"], served.mixed) == "new"


def test_changing_adapters_from_inside_a_forward_of_the_same_thread(tmp_path: Path) -> None:
    """A hook that changes adapters from inside the model's own forward (the only
    forward running) does not deadlock: the change happens, and later calls see it."""
    served = Served(tmp_path)
    pm = served.pm
    layer = pm.get_base_model().model.layers[0].self_attn.q_proj
    calls: list[int] = []

    def switch_once(module: Any, args: Any) -> None:
        if not calls:
            calls.append(1)
            pm.set_adapter("b")

    handle = layer.register_forward_pre_hook(switch_once)
    done = threading.Thread(target=lambda: logits(pm))
    try:
        done.start()
        done.join(30)
    finally:
        handle.remove()
    assert not done.is_alive(), "a change from inside a forward deadlocked"
    assert pm.active_adapters == ["b"]
    assert_close_to_scale(logits(pm), served.plain["b"])


def test_the_lock_is_not_part_of_the_model(tmp_path: Path) -> None:
    """The model pickles and deep-copies as before; a copy gets a lock of its own."""
    served = Served(tmp_path)
    model_lock(served.pm)
    clone = copy.deepcopy(served.pm)
    assert model_lock(clone) is not model_lock(served.pm)
    restored = pickle.loads(pickle.dumps(served.pm))
    assert_close_to_scale(logits(restored, adapter_names=ROWS), served.mixed["old"])
    assert not any("lock" in name.lower() for name in vars(served.pm))
