"""Reading files that come from elsewhere: regular files only, with a bound.

This is the one reader every peftcore file read goes through (adapter configs, the
weights file, an existing model card, the CLI's ``--config``/``--plan``, framework
checkpoints). An adapter directory or a file named on the command line may be
hostile: a FIFO in place of ``adapter_config.json`` would block a plain ``open()``
forever, a device would stream without end, a sparse file can claim gigabytes.
:func:`open_regular` opens without blocking and refuses anything that is not a regular
file; :func:`read_bounded` then refuses a file larger than its bound *before* reading
it (from ``fstat``) and reads at most one byte more than the bound (for files, such as
those of ``/proc``, whose size ``fstat`` does not know). Every problem is an
:class:`~peftcore.errors.AdapterError` naming the file.

Symbolic links are followed by default: the Hugging Face cache stores every file as a
link into its blob store, and loading must keep working there. A writer that reads a
file it is about to replace (the model card) passes ``follow_symlinks=False`` and a
directory descriptor, so a link planted in the save directory is refused rather than
read (see :mod:`peftcore.save_dir`).
"""

from __future__ import annotations

import errno
import io
import os
import stat
from typing import Optional

from peftcore.errors import AdapterError

#: Largest text file read whole (configs, plans, model cards); real ones are kilobytes.
MAX_TEXT_BYTES = 16 * 1024 * 1024


def open_regular(
    path: str,
    what: str = "file",
    *,
    dir_fd: Optional[int] = None,
    follow_symlinks: bool = True,
    shown: Optional[str] = None,
) -> io.BufferedReader:
    """Open ``path`` for binary reading if it is a regular file, without ever blocking
    (a FIFO is opened non-blocking, seen for what it is and closed).

    ``dir_fd`` makes ``path`` relative to an open directory; ``follow_symlinks=False``
    refuses a symbolic link at ``path``; ``shown`` is the name errors give (default
    ``path``)."""
    shown = shown or path
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise AdapterError(f"{shown}: file is missing") from None
    except OSError as exc:
        if not follow_symlinks and exc.errno in (errno.ELOOP, errno.EMLINK) and _is_link(path, dir_fd):
            raise AdapterError(f"{shown}: the {what} is a symbolic link; refusing to read it") from None
        raise AdapterError(f"{shown}: cannot open the {what}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise AdapterError(f"{shown}: the {what} is not a regular file ({kind_of(mode)}); refusing to read it")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(
    path: str,
    limit: int,
    what: str = "file",
    *,
    dir_fd: Optional[int] = None,
    follow_symlinks: bool = True,
    shown: Optional[str] = None,
) -> bytes:
    """All of the regular file ``path``, refused when larger than ``limit`` bytes (its
    size is checked before anything is read). Keywords as :func:`open_regular`."""
    shown = shown or path
    with open_regular(path, what, dir_fd=dir_fd, follow_symlinks=follow_symlinks, shown=shown) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise AdapterError(f"{shown}: the {what} is {size} bytes, larger than {limit} bytes; refusing to read it")
        try:
            data = handle.read(limit + 1)
        except OSError as exc:
            raise AdapterError(f"{shown}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise AdapterError(f"{shown}: the {what} is larger than {limit} bytes; refusing to read it")
    return data


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words, from its ``st_mode``."""
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _is_link(path: str, dir_fd: Optional[int]) -> bool:
    try:
        return stat.S_ISLNK(os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
