"""Durable, all-or-nothing writes of the files a user relies on.

:func:`replacing` hands out a temporary name in the target's own folder (``.NAME.tmp-PID``, a
hidden file that folder scanners skip, see :func:`is_temporary`); once the caller has written
it, the file is flushed to disk (``fsync``), renamed onto ``NAME`` (``os.replace``, atomic on
POSIX) and the folder entry flushed. Whatever happens (the process killed, the disk full, a
power cut), ``NAME`` then holds either what it held before (or is absent) or the complete new
file, never a part of one. A temporary left by a killed writer is removed by the next write of
the same file (:func:`remove_stale_temporaries`).

A device that runs out of space raises :class:`NoSpaceError`, which names the file; the
libraries that write (numpy, safetensors) do not always say why a write failed, so a failed
write on a device with no free block left counts as "no space" too.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.errors import UserError

TEMP_MARK = ".tmp-"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_OWN_TEMP = re.compile(r"\.(.+)" + re.escape(TEMP_MARK) + r"(\d+)")
_LIBRARY_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # Rust's tempfile crate (safetensors)
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports errno


class NoSpaceError(UserError, OSError):
    """A file could not be written because its device is full (or the user's quota is)."""

    def __init__(self, path: str | Path, cause: BaseException, hint: str = "") -> None:
        code = _errno_of(cause)
        reason = "disk quota exceeded" if code == errno.EDQUOT else "no space left on the device"
        super().__init__(code or errno.ENOSPC, reason, str(path))
        self.path = Path(path)
        self.hint = hint or "free some space and try again"
        # the failed write never touches ``path``: what is there now was there before
        self.kept = (f"{self.path.name} keeps its previous content" if self.path.exists()
                     else "nothing was written there")

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.strerror} ({self.kept}); {self.hint}"

    def __reduce__(self) -> tuple:  # OSError's would pass (errno, strerror, path) to __init__
        return type(self), (self.path, OSError(self.errno, self.strerror), self.hint)


def fsync_path(path: str | Path) -> None:
    """``fsync`` a file, or a directory (so that a rename inside it survives a crash)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temporary(name: str) -> bool:
    """Whether a file name is a temporary of :func:`replacing`, or of the writer it calls
    (safetensors writes ``.tmpXXXXXX`` next to its file first), possibly left half written by a
    killed process: never a file to read."""
    return name.startswith(".") and (TEMP_MARK in name or bool(_LIBRARY_TEMP.fullmatch(name)))


def temporary_path(path: Path) -> Path:
    """The temporary name :func:`replacing` writes ``path`` under in this process."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


@contextmanager
def replacing(path: str | Path, batch: bool = False) -> Iterator[Path]:
    """Write ``path`` all-or-nothing: yields the temporary path to write (see module docstring).

    The caller may also make a folder there (and fsync what it writes into it): the folder then
    appears at ``path`` complete, and a folder already at ``path`` is never replaced.
    ``batch=True``: one of many files written into the same folder (a CT series); the caller
    removes the stale temporaries there before (:func:`remove_stale_temporaries`) and fsyncs
    the folder once after (:func:`fsync_path`).
    """
    path = Path(path)
    if not batch:
        remove_stale_temporaries(path.parent, path.name)
    tmp = temporary_path(path)
    try:
        yield tmp
        fsync_path(tmp)
        if tmp.is_dir() and path.exists():
            raise FileExistsError(errno.EEXIST, "refusing to replace a folder", str(path))
        os.replace(tmp, path)
        if not batch:
            fsync_path(path.parent)
    except BaseException as exc:
        full = no_space(exc, path.parent)
        _remove(tmp)
        if full:
            raise NoSpaceError(path, exc) from exc
        raise


def remove_stale_temporaries(folder: str | Path, name: str = "") -> None:
    """Remove the temporaries in ``folder`` (of the file or folder ``name`` only, if given)
    whose writing process is gone: what a killed writer left behind."""
    try:
        entries = list(Path(folder).iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        match = _OWN_TEMP.fullmatch(entry.name)
        if match and (not name or match.group(1) == name) and not _alive(int(match.group(2))):
            _remove(entry)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``path`` gets ``data``, all-or-nothing."""
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """``path`` gets ``text``, all-or-nothing."""
    return write_bytes(path, text.encode(encoding))


def no_space(exc: BaseException, folder: Path) -> bool:
    """Whether the failed write ``exc`` into ``folder`` was for want of space: its errno says
    so, or (an OSError without errno, as numpy raises) the device has no free block left."""
    code = _errno_of(exc)
    if code in _NO_SPACE:
        return True
    if not isinstance(exc, OSError) or code:
        return False
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    match = _RUST_OS_ERROR.search(str(exc))
    return int(match.group(1)) if match else None


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
