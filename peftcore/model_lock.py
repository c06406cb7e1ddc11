"""One reader-writer lock per PeftModel: forward passes read, adapter changes write.

A model that serves requests from several threads while another thread changes its
adapters (``load_adapter`` onto a served name, ``delete_adapter`` then ``add_adapter``,
``set_adapter``, merging, ``set_peft_model_state_dict``...) must never let a forward see
half of a change: some layers with the old tensors and some with the new, or an adapter
whose name the routing checked but whose tensors are gone. So every PeftModel has one
:class:`ModelLock`:

* a forward pass (plain, mixed-adapter, ``generate``) and every call that only reads the
  adapters (``save_pretrained``, ``export_adapter``) holds it for **reading**: any number
  run at once, and none of them overlaps a change;
* every call that changes adapters, their state or the weights holds it for **writing**:
  it waits until the forwards running have finished, and forwards that start meanwhile
  wait for it to finish, so each forward sees the model wholly before or wholly after it.

The lock is reentrant: a change may call other changes and run forwards (XPrompt
scores a prompt by running the model), and a thread inside a forward may make a change,
which waits for the other threads' forwards to end (SINGA builds pending adapters from
inside the first forward). Two threads asking that at once would wait for each other
forever, so the second gets an :class:`~peftcore.errors.AdapterError`. It is fair both
ways: a waiting change keeps new forwards out, so a steady stream of forwards cannot
starve it, and the forwards that waited for a change go in before the next change, so
a busy writer cannot starve them.

The lock lives in a table beside the model, keyed weakly by the model object, never on
the model: a PeftModel stays picklable and deep-copyable, and a copy gets its own lock.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Any, Callable, Iterator, Optional, TypeVar, cast

from peftcore.errors import AdapterError

__all__ = ["ModelLock", "changes_model", "model_lock", "reading", "reads_model", "writing"]

Function = TypeVar("Function", bound=Callable[..., Any])


class ModelLock:
    """A reentrant reader-writer lock, fair both ways (see the module docstring): a
    waiting writer holds back new readers, and when a writer finishes, the readers that
    were waiting for it go in before the next writer."""

    __slots__ = (
        "_mutex", "_released", "_readers", "_writer", "_write_depth", "_writers_waiting", "_readers_waiting",
        "_reader_pass", "_upgrading", "changes",
    )

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._released = threading.Condition(self._mutex)
        self._readers: dict[int, int] = {}  # thread id -> depth of its read sections
        self._writer: Optional[int] = None
        self._write_depth = 0
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._reader_pass = 0  # readers that may still go in before the next writer
        self._upgrading: Optional[int] = None  # a reader waiting to write
        #: counts the write sections begun and ended: a cache kept for the length of one
        #: call (a ``generate``) is stale once it moves (a change made from inside the call)
        self.changes = 0

    def acquire_read(self) -> None:
        """Start a read section; waits while another thread changes (or waits to change) the model."""
        me = threading.get_ident()
        with self._mutex:
            depth = self._readers.get(me, 0)
            if not depth and self._writer != me and (self._writer is not None or self._writers_waiting):
                self._wait_to_read()
            self._readers[me] = depth + 1

    def _wait_to_read(self) -> None:
        self._readers_waiting += 1
        try:
            while self._writer is not None or (self._writers_waiting and not self._reader_pass):
                self._released.wait()
        except BaseException:
            self._readers_waiting -= 1
            self._reader_pass = min(self._reader_pass, self._readers_waiting)  # a writer must not wait for it
            self._released.notify_all()
            raise
        self._readers_waiting -= 1
        if self._reader_pass:
            self._reader_pass -= 1

    def release_read(self) -> None:
        me = threading.get_ident()
        with self._mutex:
            depth = self._readers.get(me, 0) - 1
            if depth < 0:
                raise RuntimeError("release_read: this thread holds no read section of the model's lock")
            if depth:
                self._readers[me] = depth
                return
            del self._readers[me]
            if self._writers_waiting:
                self._released.notify_all()

    def acquire_write(self) -> None:
        """Start a write section; waits until no other thread reads or writes."""
        me = threading.get_ident()
        with self._mutex:
            if self._writer == me:
                self._write_depth += 1
                self.changes += 1
                return
            upgrading = me in self._readers
            if upgrading:
                if self._upgrading is not None:
                    raise AdapterError(
                        "two threads are changing the model's adapters from inside forward passes of it at once; "
                        "each would wait for the other's forward to end: change adapters outside forward passes"
                    )
                self._upgrading = me
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._reader_pass or any(t != me for t in self._readers):
                    self._released.wait()
            except BaseException:
                if self._writers_waiting == 1:
                    self._released.notify_all()  # it gave up: wake the readers it held back
                raise
            finally:
                self._writers_waiting -= 1
                if upgrading:
                    self._upgrading = None
            self._writer = me
            self._write_depth = 1
            self.changes += 1

    def release_write(self) -> None:
        with self._mutex:
            if self._writer != threading.get_ident():
                raise RuntimeError("release_write: this thread does not hold the model's lock for writing")
            self._write_depth -= 1
            self.changes += 1
            if not self._write_depth:
                self._writer = None
                self._reader_pass = self._readers_waiting
                self._released.notify_all()


_LOCKS: weakref.WeakKeyDictionary[Any, ModelLock] = weakref.WeakKeyDictionary()
_CREATING = threading.Lock()


def model_lock(model: Any) -> ModelLock:
    """The lock of ``model`` (made on first use; see the module docstring)."""
    try:
        return _LOCKS[model]
    except KeyError:
        with _CREATING:
            return _LOCKS.setdefault(model, ModelLock())


@contextlib.contextmanager
def reading(model: Any) -> Iterator[None]:
    """Hold ``model``'s lock for reading in the block."""
    lock = model_lock(model)
    lock.acquire_read()
    try:
        yield
    finally:
        lock.release_read()


@contextlib.contextmanager
def writing(model: Any) -> Iterator[None]:
    """Hold ``model``'s lock for writing in the block."""
    lock = model_lock(model)
    lock.acquire_write()
    try:
        yield
    finally:
        lock.release_write()


def changes_model(function: Function) -> Function:
    """Decorate a method (or a function whose first argument is the model) that changes
    the model's adapters or weights: it runs holding the model's lock for writing."""

    @functools.wraps(function)
    def locked(model: Any, *args: Any, **kwargs: Any) -> Any:
        lock = model_lock(model)
        lock.acquire_write()
        try:
            return function(model, *args, **kwargs)
        finally:
            lock.release_write()

    return cast(Function, locked)


def reads_model(function: Function) -> Function:
    """Decorate a method (or a function whose first argument is the model) that reads the
    adapters and must see them consistent: it runs holding the model's lock for reading."""

    @functools.wraps(function)
    def locked(model: Any, *args: Any, **kwargs: Any) -> Any:
        lock = model_lock(model)
        lock.acquire_read()
        try:
            return function(model, *args, **kwargs)
        finally:
            lock.release_read()

    return cast(Function, locked)
