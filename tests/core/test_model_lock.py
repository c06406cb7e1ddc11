"""The reader-writer lock every PeftModel has (:mod:`peftcore.model_lock`), on its own.

Threads are coordinated with events and barriers, every wait bounded, so a lock that
deadlocks fails the test instead of hanging it.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any, Callable

import pytest

from peftcore.errors import AdapterError
from peftcore.model_lock import ModelLock, changes_model, model_lock, reading, reads_model, writing

WAIT_S = 10.0


def started(target: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def finished(thread: threading.Thread) -> bool:
    thread.join(WAIT_S)
    return not thread.is_alive()


def until(condition: Callable[[], bool]) -> bool:
    """Whether ``condition`` becomes true within the bound (polled)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def waiting(lock: ModelLock, readers: int = 0, writers: int = 0) -> bool:
    """Whether that many threads come to wait on ``lock`` to read and to write."""
    return until(lambda: (lock._readers_waiting, lock._writers_waiting) == (readers, writers))


def test_readers_run_together() -> None:
    lock = ModelLock()
    together = threading.Barrier(4, timeout=WAIT_S)

    def read() -> None:
        lock.acquire_read()
        try:
            together.wait()  # breaks (and fails the thread) unless all four read at once
        finally:
            lock.release_read()

    threads = [started(read) for _ in range(4)]
    assert all(finished(t) for t in threads)
    assert not together.broken


def test_a_writer_waits_for_readers_and_holds_later_readers_back() -> None:
    lock = ModelLock()
    order: list[str] = []
    lock.acquire_read()
    writer = started(lambda: (lock.acquire_write(), order.append("write"), lock.release_write()))
    assert waiting(lock, writers=1)
    late_reader = started(lambda: (lock.acquire_read(), order.append("late read"), lock.release_read()))
    assert waiting(lock, readers=1, writers=1), "a reader went in ahead of a waiting writer"
    assert not order
    lock.release_read()
    assert finished(writer) and finished(late_reader)
    assert order == ["write", "late read"]


def test_readers_that_waited_go_in_before_the_next_writer() -> None:
    lock = ModelLock()
    order: list[str] = []
    lock.acquire_write()
    reader = started(lambda: (lock.acquire_read(), order.append("read"), lock.release_read()))
    assert waiting(lock, readers=1)
    lock.release_write()
    lock.acquire_write()  # at once: the reader that waited goes first all the same
    order.append("second write")
    lock.release_write()
    assert finished(reader)
    assert order == ["read", "second write"]


class Model:
    """Any object a lock can be kept for."""


def test_reentrant_writes_and_reads_inside_a_write() -> None:
    model = Model()
    with writing(model), writing(model), reading(model):
        other = started(lambda: (model_lock(model).acquire_read(), model_lock(model).release_read()))
        assert waiting(model_lock(model), readers=1)
    assert finished(other)
    lock = ModelLock()
    lock.acquire_read()
    lock.acquire_read()
    lock.release_read()
    lock.release_read()


def test_a_reader_may_write_after_the_other_readers_leave() -> None:
    lock = ModelLock()
    other_inside, other_may_leave = threading.Event(), threading.Event()

    def other_reader() -> None:
        lock.acquire_read()
        other_inside.set()
        other_may_leave.wait(WAIT_S)
        lock.release_read()

    other = started(other_reader)
    assert other_inside.wait(WAIT_S)
    lock.acquire_read()
    upgraded = threading.Event()

    def upgrade_then_leave() -> None:
        lock.acquire_write()
        upgraded.set()
        lock.release_write()

    # the upgrade runs in this thread; the other reader leaves from its own thread meanwhile
    threading.Timer(0.2, other_may_leave.set).start()
    upgrade_then_leave()
    lock.release_read()
    assert upgraded.is_set() and finished(other)


def test_two_readers_upgrading_at_once_get_an_adapter_error_not_a_deadlock() -> None:
    lock = ModelLock()
    both_inside = threading.Barrier(2, timeout=WAIT_S)
    outcomes: list[str] = []
    first_waits = threading.Event()

    def reader_that_writes(first: bool) -> None:
        lock.acquire_read()
        try:
            both_inside.wait()
            if not first:
                first_waits.wait(WAIT_S)
                time.sleep(0.1)  # the first one is now waiting to write
            else:
                first_waits.set()
            try:
                lock.acquire_write()
            except AdapterError as exc:
                outcomes.append(f"refused: {exc}")
                return
            outcomes.append("wrote")
            lock.release_write()
        finally:
            lock.release_read()

    threads = [started(lambda: reader_that_writes(True)), started(lambda: reader_that_writes(False))]
    assert all(finished(t) for t in threads), "two upgrading readers deadlocked"
    assert sorted(o.split(":")[0] for o in outcomes) == ["refused", "wrote"]
    assert any("from inside forward passes" in o for o in outcomes)


def test_decorators_lock_on_the_first_argument() -> None:
    class Served:
        @changes_model
        def change(self) -> int:
            assert model_lock(self)._writer == threading.get_ident()
            return 1

        @reads_model
        def read(self) -> int:
            assert threading.get_ident() in model_lock(self)._readers
            return 2

    served = Served()
    assert served.change() == 1 and served.read() == 2
    assert Served.change.__name__ == "change"


def test_each_model_has_its_own_lock_and_it_goes_with_the_model() -> None:
    first, second = Model(), Model()
    assert model_lock(first) is model_lock(first)
    assert model_lock(first) is not model_lock(second)
    from peftcore import model_lock as module

    count = len(module._LOCKS)
    del first
    gc.collect()
    assert len(module._LOCKS) <= count - 1  # the collection may free other tests' models too


@pytest.mark.parametrize("release", ["release_read", "release_write"])
def test_releasing_what_is_not_held_is_an_error(release: str) -> None:
    with pytest.raises(RuntimeError, match="this thread"):
        getattr(ModelLock(), release)()


def test_changes_counts_write_sections_and_not_reads() -> None:
    """``changes`` moves whenever a write section begins or ends (nested ones included),
    so a cache kept for one call can tell that a change happened during the call."""
    lock = ModelLock()
    assert lock.changes == 0
    lock.acquire_read()
    lock.acquire_read()
    lock.release_read()
    lock.release_read()
    assert lock.changes == 0
    lock.acquire_read()
    lock.acquire_write()  # a change from inside a forward of the same thread
    seen_inside = lock.changes
    lock.acquire_write()
    lock.release_write()
    lock.release_write()
    lock.release_read()
    assert 0 < seen_inside < lock.changes == 4
