"""Crash-safe file writing: every artifact goes to a temporary file and is renamed into place.

Under ``torchrun`` only rank 0 writes: on the other ranks these functions return the path
without touching the disk, so a command's artifacts are written once whatever the process count.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from compress import distributed
from compress.errors import UserError


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    if not distributed.is_main():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r}: {e.strerror}; choose a writable output folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
