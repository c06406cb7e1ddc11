"""The one writer every file of a save goes through.

A save directory may be shared with someone hostile (a group-writable checkpoint folder,
a folder under ``/tmp``): any name in it may be, or may become while the save runs, a
symbolic link, a FIFO or a folder. :class:`SaveDirectory` opens the directory once and
does everything relative to that descriptor, never by path:

- a file is written under a new hidden temporary name, created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` (so it is a new regular file, never a link's
  target), through the descriptor that created it, flushed with ``fsync``, and renamed
  over its target relative to the directory. Nothing is reopened, ``chmod``-ed or
  renamed by path, so swapping the temporary file for a link cannot redirect a write,
  and a swap that lands before the rename is seen (the name no longer holds the inode
  that was written) and the save rolled back;
- a name about to be replaced must be missing or a regular file: a link, FIFO, folder or
  device there is refused with an :class:`~peftcore.errors.AdapterError` naming it,
  before anything is written;
- subfolders are created with ``mkdir(dir_fd=)`` and entered with
  ``O_DIRECTORY | O_NOFOLLOW``, so a subfolder that is a link is refused;
- a file read before it is replaced (the model card) is read through the same
  descriptor with :func:`peftcore.safe_files.read_bounded`: never through a link, never
  from a FIFO, never more than a stated size.

New files get the mode any new file gets (``0o666`` less the umask, applied by the
kernel when the temporary file is created); the umask is never read or changed.
:meth:`SaveDirectory.write_files` writes a set of files, in the directory and its
subfolders, all or nothing (see there).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from typing import Callable, NamedTuple, Optional, Sequence, Union

from peftcore.errors import AdapterError
from peftcore.safe_files import kind_of, read_bounded

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | _O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _O_CLOEXEC

#: What a file of a save holds: its bytes, or a function giving them as consecutive
#: buffers (called when the file is staged, so that large contents are made one file
#: at a time and tensor memory can be written without a copy).
Content = Union[bytes, Callable[[], Sequence[Union[bytes, memoryview]]]]

#: One file of a save: (subfolder or None for the directory itself, file name, content).
FileToWrite = tuple[Optional[str], str, Content]


class SaveDirectory:
    """A directory opened once for saving; see the module docstring."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def open(cls, path: Union[str, os.PathLike], create: bool = True) -> SaveDirectory:
        """Open the folder ``path`` (created with its parents when ``create``). The last
        component must be a real folder, not a link to one."""
        path = os.fspath(path)
        if create:
            try:
                os.makedirs(path, exist_ok=True)
            except FileExistsError:
                raise AdapterError(f"{path}: exists and is not a folder; cannot save into it") from None
        try:
            fd = os.open(path, _DIR_FLAGS)
        except OSError as exc:
            raise _folder_error(path, exc, None, "") from None
        return cls(fd, path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SaveDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def shown(self, name: str) -> str:
        """How errors name ``name`` in this folder."""
        return os.path.join(self.path, name)

    def kind(self, name: str) -> Optional[int]:
        """``st_mode`` of ``name`` itself (a link is not followed); None when missing."""
        try:
            return os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return None

    def read_bounded_text(self, name: str, limit: int, what: str) -> Optional[str]:
        """The UTF-8 text of the regular file ``name`` (None when there is none), read
        through this folder, never through a link, refused above ``limit`` bytes."""
        if self.kind(name) is None:
            return None
        raw = read_bounded(name, limit, what, dir_fd=self._fd, follow_symlinks=False, shown=self.shown(name))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AdapterError(f"{self.shown(name)}: the {what} is not UTF-8 text: {exc}") from None

    def check_replaceable(self, name: str) -> None:
        """Refuse to replace ``name`` unless it is missing or a regular file."""
        mode = self.kind(name)
        if mode is not None and not stat.S_ISREG(mode):
            raise AdapterError(f"{self.shown(name)}: is {kind_of(mode)}, not a regular file; refusing to replace it")

    def check_subfolder(self, name: str) -> None:
        """Refuse a subfolder ``name`` that exists as anything but a real folder."""
        mode = self.kind(name)
        if mode is not None and not stat.S_ISDIR(mode):
            raise AdapterError(
                f"{self.shown(name)}: the folder is {kind_of(mode)}, not a folder; refusing to write outside the "
                "save directory"
            )

    def subfolder(self, name: str) -> tuple[SaveDirectory, bool]:
        """Enter the subfolder ``name``, creating it when missing; returns it and whether
        it was created. A link or a file at ``name`` is refused."""
        created = True
        try:
            os.mkdir(name, 0o777, dir_fd=self._fd)
        except FileExistsError:
            created = False
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self._fd)
        except OSError as exc:
            raise _folder_error(self.shown(name), exc, self, name) from None
        return SaveDirectory(fd, self.shown(name)), created

    def write_files(self, files: Sequence[FileToWrite]) -> None:
        """Write ``files`` all or nothing: either every one lands, or every target keeps
        what it held before (and subfolders made for the save are removed again).

        Every target name and subfolder is checked first; then every file is written in
        full to a temporary name and flushed; then the old versions are kept as hard
        links and the files renamed into place, in order (the last is the commit point
        a crash can stop at: see :mod:`peftcore.io`). If a rename fails, or a renamed
        name turns out not to hold the file that was written (a temporary file swapped
        while the save ran), the files already renamed are put back as they were.
        """
        for sub, name, _ in files:
            if sub is not None:
                self.check_subfolder(sub)
                with self.subfolder_if_present(sub) as folder:
                    if folder is not None:
                        folder.check_replaceable(name)
            else:
                self.check_replaceable(name)
        folders: dict[Optional[str], SaveDirectory] = {None: self}
        created: list[str] = []
        staged: list[tuple[SaveDirectory, str, str, tuple[int, int]]] = []
        held: list[int] = []  # each staged file stays open until the end: its inode number cannot be reused
        try:
            for sub, name, content in files:
                if sub not in folders:
                    assert sub is not None
                    folders[sub], made = self.subfolder(sub)
                    if made:
                        created.append(sub)
                folder = folders[sub]
                tmp, fd = folder._stage(name, content() if callable(content) else [content])
                held.append(fd)
                staged.append((folder, name, tmp, _identity(os.fstat(fd))))
            _commit(staged)
        except BaseException:
            for folder, _, tmp, _ in staged:
                folder._unlink_quietly(tmp)
            for sub in folders:
                if sub is not None:
                    folders[sub].close()
            for sub in reversed(created):
                try:
                    os.rmdir(sub, dir_fd=self._fd)
                except OSError:
                    pass
            raise
        finally:
            for fd in held:
                os.close(fd)
        for sub, folder in folders.items():
            folder._fsync()
            if sub is not None:
                folder.close()

    def remove_regular(self, name: str, sub: Optional[str] = None) -> None:
        """Remove ``name`` (in subfolder ``sub``) when it is a regular file; anything else
        there (nothing, a link, a folder) is left alone."""
        if sub is not None:
            with self.subfolder_if_present(sub) as folder:
                if folder is not None:
                    folder.remove_regular(name)
            return
        try:
            info = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISREG(info.st_mode):
            os.unlink(name, dir_fd=self._fd)

    def subfolder_if_present(self, name: str) -> _MaybeFolder:
        """The existing subfolder ``name`` (entered without following a link), or None."""
        if self.kind(name) is None:
            return _MaybeFolder(None)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self._fd)
        except OSError as exc:
            raise _folder_error(self.shown(name), exc, self, name) from None
        return _MaybeFolder(SaveDirectory(fd, self.shown(name)))

    # -- one file ----------------------------------------------------------------------
    def _stage(self, name: str, buffers: Sequence[Union[bytes, memoryview]]) -> tuple[str, int]:
        """Write ``buffers`` to a new temporary file for ``name``; its name and its
        descriptor (still open, for the caller to close)."""
        for _ in range(100):
            tmp = f".{name}.{secrets.token_hex(8)}.tmp"
            try:
                fd = os.open(tmp, _NEW_FILE_FLAGS, 0o666, dir_fd=self._fd)
            except FileExistsError:
                continue
            break
        else:
            raise AdapterError(f"{self.shown(name)}: could not create a temporary file next to it")
        try:
            for buffer in _coalesced(buffers):
                view = memoryview(buffer)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self._unlink_quietly(tmp)
            raise
        return tmp, fd

    def _backup(self, name: str) -> Optional[_Backup]:
        """Keep the current ``name`` (a regular file) under a hidden name, and open; None
        when there is no ``name``."""
        try:
            original = os.open(name, _READ_FLAGS, dir_fd=self._fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK):
                raise AdapterError(f"{self.shown(name)}: is a symbolic link; refusing to replace it") from None
            raise
        try:
            info = os.fstat(original)
            if not stat.S_ISREG(info.st_mode):
                raise AdapterError(
                    f"{self.shown(name)}: is {kind_of(info.st_mode)}, not a regular file; refusing to replace it"
                )
            backup = f".{name}.old.{secrets.token_hex(8)}.tmp"
            try:
                os.link(name, backup, src_dir_fd=self._fd, dst_dir_fd=self._fd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                copy = self._copy(original, backup)  # a file system without hard links
                os.close(original)
                original = copy
                info = os.fstat(copy)
        except BaseException:
            os.close(original)
            raise
        return _Backup(backup, _identity(info), original)

    def _copy(self, source: int, backup: str) -> int:
        """Copy the open regular file ``source`` to the new file ``backup``, with its
        mode; the copy's descriptor (open)."""
        target = os.open(backup, _NEW_FILE_FLAGS, 0o600, dir_fd=self._fd)
        try:
            os.fchmod(target, stat.S_IMODE(os.fstat(source).st_mode))  # put back, it must be what it was
            while chunk := os.read(source, 1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(target, view) :]
        except BaseException:
            os.close(target)
            self._unlink_quietly(backup)
            raise
        return target

    def _check_landed(self, name: str, identity: tuple[int, int]) -> None:
        """Refuse a renamed ``name`` that is not the file that was written."""
        info = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        if _identity(info) != identity or not stat.S_ISREG(info.st_mode):
            what = kind_of(info.st_mode) if not stat.S_ISREG(info.st_mode) else "another file"
            raise _swapped(self.shown(name), f"was replaced by something else ({what})")

    def _restore(self, name: str, backup: Optional[_Backup]) -> None:
        """Put ``name`` back as it was before the save: its backup, or nothing. Whatever
        happens, ``name`` is left holding no link (nor anything but a regular file)."""
        if backup is None:
            self._unlink_quietly(name)
            return
        try:
            os.replace(backup.name, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except OSError:
            self._unlink_unless_regular(name)  # the backup is gone: at least no link stays
            raise
        info = self._unlink_unless_regular(name)
        if info is not None and _identity(info) != backup.identity:  # the backup was swapped too
            self._unlink_quietly(name)

    def _unlink_unless_regular(self, name: str) -> Optional[os.stat_result]:
        """Remove ``name`` unless it is a regular file; its status when it stays."""
        try:
            info = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(info.st_mode):
            self._unlink_quietly(name)
            return None
        return info

    def _unlink_quietly(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self._fd)
        except FileNotFoundError:
            pass

    def _fsync(self) -> None:
        """Make the renames durable too (where a folder can be flushed)."""
        try:
            os.fsync(self._fd)
        except OSError:
            pass


def _coalesced(buffers: Sequence[Union[bytes, memoryview]], small: int = 1 << 16) -> list[Union[bytes, memoryview]]:
    """``buffers`` with runs of small ones joined, so many small tensors cost few writes."""
    joined: list[Union[bytes, memoryview]] = []
    pending = bytearray()
    for buffer in buffers:
        if len(buffer) < small:
            pending += buffer
            continue
        if pending:
            joined.append(bytes(pending))
            pending.clear()
        joined.append(buffer)
    if pending:
        joined.append(bytes(pending))
    return joined


def _commit(staged: Sequence[tuple[SaveDirectory, str, str, tuple[int, int]]]) -> None:
    """Rename every staged file over its target, in order; on any failure put back the
    targets already renamed. Old versions are kept as hard links until the end (and
    left in place, hidden, should putting one back fail)."""
    backups: list[tuple[SaveDirectory, Optional[_Backup]]] = []
    renamed: list[tuple[SaveDirectory, str, Optional[_Backup]]] = []
    kept: set[Optional[_Backup]] = {None}
    try:
        for folder, name, _, _ in staged:
            backups.append((folder, folder._backup(name)))
        try:
            for (folder, name, tmp, identity), (_, backup) in zip(staged, backups):
                try:
                    os.replace(tmp, name, src_dir_fd=folder._fd, dst_dir_fd=folder._fd)
                except FileNotFoundError:
                    raise _swapped(folder.shown(name), "was removed") from None
                renamed.append((folder, name, backup))
                folder._check_landed(name, identity)
        except BaseException:
            for folder, name, backup in reversed(renamed):
                try:
                    folder._restore(name, backup)
                except OSError:  # the error that stopped the save is the one to report
                    kept.add(backup)
            raise
    finally:
        for folder, backup in backups:
            if backup is not None:
                os.close(backup.fd)
                if backup not in kept:
                    folder._unlink_quietly(backup.name)


class _Backup(NamedTuple):
    """An old version of a target, kept under a hidden name (and open, so that its inode
    number cannot be reused) while files are renamed."""

    name: str
    identity: tuple[int, int]
    fd: int


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


class _MaybeFolder:
    """A context manager holding an entered subfolder, or None."""

    def __init__(self, folder: Optional[SaveDirectory]) -> None:
        self.folder = folder

    def __enter__(self) -> Optional[SaveDirectory]:
        return self.folder

    def __exit__(self, *exc: object) -> None:
        if self.folder is not None:
            self.folder.close()


def _swapped(shown: str, what: str) -> AdapterError:
    """The error for a temporary file that someone else changed while the save ran."""
    return AdapterError(
        f"{shown}: its temporary file {what} while the save ran (another process is changing the save "
        "directory); the save was rolled back"
    )


def _folder_error(shown: str, exc: OSError, parent: Optional[SaveDirectory], name: str) -> AdapterError:
    """An :class:`AdapterError` saying why the folder ``shown`` cannot be entered."""
    mode: Optional[int]
    try:
        mode = parent.kind(name) if parent is not None else os.lstat(shown).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISDIR(mode):
        return AdapterError(
            f"{shown}: the folder is {kind_of(mode)}, not a folder; refusing to write outside the save directory"
        )
    return AdapterError(f"{shown}: cannot open the folder: {exc.strerror or exc}")
