"""Crash-safe file writing: every artifact goes to a temporary file and is renamed into place;
and run folders owned by one process at a time (:func:`run_folder_lock`).

Under ``torchrun`` only rank 0 writes: on the other ranks these functions return the path
without touching the disk, so a command's artifacts are written once whatever the process count.
A write that fails for lack of space or permission is a :class:`~compress.errors.UserError`
naming the file; the earlier file stays as it was.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from compress import distributed
from compress.errors import UserError, clip

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "staged_file", "ensure_writable_dir",
           "run_folder_lock", "write_error", "LOCK_NAME"]

LOCK_NAME = ".lock"
# errors of the machine, not of the program: full disk, quota, permissions, read-only file system, file size limit
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG, errno.EIO}


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_error(path: str | os.PathLike, e: BaseException) -> UserError:
    """The one-line error of a failed write to ``path`` (disk full, permission denied, ...)."""
    text = str(e).strip()
    reason = getattr(e, "strerror", None) or clip(text.splitlines()[0] if text else type(e).__name__, 160)
    if isinstance(e, RuntimeError) or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free some space (or raise the limit) and run the same command again"
    else:
        hint = "choose a writable output folder"
    return UserError(f"cannot write {str(path)!r}: {reason}; {hint} (the earlier file, if any, is unchanged)")


def _is_write_failure(e: BaseException) -> bool:
    """An error of writing (not of the program): an OSError, or torch's wrapper of one."""
    if isinstance(e, OSError):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e) for w in ("file write failed", "No space left",
                                                                     "Disk quota", "File too large"))


def _atomic(path: str | os.PathLike, write: Callable[[Any], Any]) -> Path:
    path = Path(path)
    if not distributed.is_main():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r}: {e.strerror}; choose a writable output folder") from None
    f = None
    try:
        with os.fdopen(fd, "wb") as raw:
            f = _Recording(raw)
            write(f)
            f.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        failed = f.error if f is not None and f.error is not None else e
        if isinstance(e, Exception) and _is_write_failure(failed):
            raise write_error(path, failed) from None
        raise
    return path


class _Recording:
    """A binary file that remembers the first error of a write: writers such as ``torch.save``
    report a failed write as their own error ("unexpected pos ..."), which hides the cause."""

    def __init__(self, f: Any):
        self._f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path``, renamed to ``path`` when the block ends without an
    error and removed when it raises: the block writes and checks the file (e.g. exports and
    verifies an ONNX model), and a failure leaves the earlier ``path`` untouched.

    Yields:
        The temporary path (same folder and suffix, hidden name).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r}: {e.strerror}; choose a writable output folder") from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    return _atomic(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (a crash never leaves a truncated checkpoint)."""
    return _atomic(path, lambda f: torch.save(obj, f))


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that files can be written in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"output folder {str(path)!r} is not writable ({e.strerror}); pass a writable --out") from None
    return path


_HELD: dict[str, int] = {}  # run folders this process has locked: real path -> lock file descriptor


@contextmanager
def run_folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Own the run folder ``folder`` for the block: one process at a time.

    An exclusive ``flock`` on ``<folder>/.lock``, which holds the owner's PID. A second process
    on the same folder is refused at once with a :class:`UserError` naming that PID. The kernel
    releases the lock when its process ends, however it ends, so the lock of a killed run is
    taken over by the next command. Re-entrant within a process (a run locks its folder and the
    training it starts locks ``train/`` inside it). Under ``torchrun`` rank 0 holds it, and the
    other ranks leave the folder alone (they neither create it nor test it: they write nothing).

    Yields:
        ``folder`` as a :class:`~pathlib.Path` (created when missing, by rank 0).
    """
    if not str(folder).strip():
        raise UserError("the run folder (--out) is empty; name a folder, e.g. runs/my-run")
    if not distributed.is_main():
        yield Path(folder)
        return
    folder = ensure_writable_dir(folder)
    key = os.path.realpath(folder)
    if key in _HELD:
        yield folder
        return
    path = folder / LOCK_NAME
    fd = _acquire(path)
    _HELD[key] = fd
    try:
        yield folder
    finally:
        del _HELD[key]
        try:
            os.unlink(path)  # still holding the lock: a process waiting on this file sees it is gone
        except OSError:
            pass
        os.close(fd)


def _acquire(path: Path) -> int:
    """Lock ``path`` (created if needed) and write this PID into it; a file replaced or removed
    by its previous owner while we waited is locked again afresh."""
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create the lock file {str(path)!r}: {e.strerror}; choose a writable "
                            f"--out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(fd)
            os.close(fd)
            raise UserError(f"run folder {str(path.parent)!r} is in use by another compress process (PID {owner}, lock "
                            f"file {str(path)!r}); wait for it to finish, or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the previous owner removed the file after we opened it: lock the new one
    raise UserError(f"cannot lock {str(path)!r}: it keeps being replaced by another process")


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"
