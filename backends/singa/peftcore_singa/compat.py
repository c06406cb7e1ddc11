"""Compatibility shims that let Apache SINGA 5.x import on current Python and numpy.

SINGA's Python package still uses names that newer interpreters removed:

* ``collections.Iterable``: ``singa/model.py`` does ``from collections import Iterable``,
  an alias removed in Python 3.10. The shim sets
  ``collections.Iterable = collections.abc.Iterable``.
* ``np.float`` and ``np.int``: ``singa/tensor.py`` (``from_numpy``, ``copy_from_numpy``
  and so ``Model.load_states``) uses them; numpy 1.24 removed them. The shim sets
  ``np.float = float`` and ``np.int = int``.

A third is needed by the import itself: ``singa/__init__.py`` calls
``faulthandler.enable()``, which needs ``sys.stderr`` to be a real file. Where it is not
(pytest's ``capsys``, some notebook and GUI consoles) the import fails with
``UnsupportedOperation: fileno``; :func:`import_singa` then imports with the process's
own ``sys.__stderr__`` in place, so SINGA's crash tracebacks go to the real stderr.

Each shim is applied only where the attribute is missing (numpy < 1.24 still has the
deprecated aliases, so nothing is set there), and :func:`apply_shims` must run before
the first ``import singa``. Every module of this package that imports singa calls it
first; user code that imports singa itself before peftcore_singa should call
:func:`apply_shims` (or apply the same two lines) first. The shims only add the old
names back with the values they used to have, so other code is unaffected.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import sys
import warnings
from typing import Any, Iterator

_applied = False


def _numpy_has(np: Any, name: str) -> bool:
    with warnings.catch_warnings():  # numpy 1.20-1.23 warn when the alias is read
        warnings.simplefilter("ignore")
        return hasattr(np, name)


def apply_shims() -> list[str]:
    """Add the removed names SINGA needs, where missing. Returns what was added.

    Safe to call any number of times; it does nothing after the first call.
    """
    global _applied
    added: list[str] = []
    if _applied:
        return added
    if not hasattr(collections, "Iterable"):
        collections.Iterable = collections.abc.Iterable  # type: ignore[attr-defined]
        added.append("collections.Iterable")
    import numpy as np

    if not _numpy_has(np, "float"):
        np.float = float  # type: ignore[attr-defined]
        added.append("numpy.float")
    if not _numpy_has(np, "int"):
        np.int = int  # type: ignore[attr-defined]
        added.append("numpy.int")
    _applied = True
    return added


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
    except Exception:  # io.UnsupportedOperation, AttributeError, a closed stream...
        return False
    return True


@contextlib.contextmanager
def _stderr_with_fileno() -> Iterator[None]:
    """``sys.stderr`` as a real file while SINGA's ``faulthandler.enable()`` runs."""
    replaced = sys.stderr
    if _has_fileno(replaced) or not _has_fileno(sys.__stderr__):
        yield
        return
    sys.stderr = sys.__stderr__
    try:
        yield
    finally:
        sys.stderr = replaced


def import_singa() -> Any:
    """Apply the shims, then import and return the ``singa`` package (with its
    ``tensor``, ``autograd``, ``layer``, ``model`` and ``device`` submodules loaded).

    Raises whatever the import raises (ImportError without SINGA, or an error from a
    SINGA built against another numpy). When no ``singa`` package can be found at all,
    it raises ImportError *before* applying the shims, so asking whether the backend is
    available changes nothing in a process without SINGA.
    """
    if "singa" not in sys.modules:
        import importlib.util

        if importlib.util.find_spec("singa") is None:
            raise ModuleNotFoundError("No module named 'singa'", name="singa")
    apply_shims()
    with _stderr_with_fileno():
        import singa
        import singa.autograd
        import singa.device
        import singa.layer
        import singa.model
        import singa.tensor

    return singa


def singa_version(singa: Any) -> str:
    """SINGA's version as ``major.minor.patch`` (``__version__`` is an int like 5100)."""
    try:
        from importlib import metadata

        return metadata.version("singa")
    except Exception:  # not installed as a distribution (e.g. a source build on the path)
        raw = getattr(singa, "__version__", "")
        if isinstance(raw, int):
            return f"{raw // 1000}.{raw // 100 % 10}.{raw % 100}"
        return str(raw)


def singa_imported() -> bool:
    """Whether singa is already imported in this process (detection never imports it)."""
    return "singa" in sys.modules and sys.modules["singa"] is not None
