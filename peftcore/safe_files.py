"""Opening files that come from elsewhere: regular files only, read with a bound.

An adapter directory, a ``--config``/``--plan`` file or a framework checkpoint may be
hostile: a FIFO in place of ``adapter_config.json`` would block a plain ``open()``
forever, a device would stream without end. :func:`open_regular` opens without
blocking and refuses anything that is not a regular file (a symbolic link to a
regular file is fine: the Hugging Face cache is made of them); :func:`read_bounded`
then reads at most a given number of bytes. Every problem is an
:class:`~peftcore.errors.AdapterError` naming the file.
"""

from __future__ import annotations

import io
import os
import stat

from peftcore.errors import AdapterError


def open_regular(path: str, what: str = "file") -> io.BufferedReader:
    """Open ``path`` for binary reading if it is a regular file, without ever blocking
    (a FIFO is opened non-blocking, seen for what it is and closed)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise AdapterError(f"{path}: file is missing") from None
    except OSError as exc:
        raise AdapterError(f"{path}: cannot open the {what}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise AdapterError(f"{path}: the {what} is not a regular file ({_kind(mode)}); refusing to read it")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str, limit: int, what: str = "file") -> bytes:
    """All of the regular file ``path``, refused when larger than ``limit`` bytes."""
    with open_regular(path, what) as handle:
        try:
            data = handle.read(limit + 1)
        except OSError as exc:
            raise AdapterError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise AdapterError(f"{path}: the {what} is larger than {limit} bytes; refusing to read it")
    return data


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"
