"""Crash-safe file writing: write under a temporary name in the same directory, fsync, then rename.

A crash or a full disk mid-write leaves the previous file (or checkpoint directory) intact, never a
truncated one under the final name. Free space is checked before large writes so a full disk is a
clear error up front.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


class DiskFullError(OSError):
    """Not enough free space to write a checkpoint or log."""


def ensure_free_space(directory: str | Path, needed_bytes: int, what: str, margin: float = 1.1) -> None:
    """Raise DiskFullError when `directory`'s filesystem has less than needed_bytes x margin free."""
    directory = Path(directory)
    probe = directory if directory.exists() else next((p for p in directory.parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * margin:
        raise DiskFullError(
            errno.ENOSPC,
            f"not enough disk space to write {what} in {directory}: need about {needed_bytes / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB free. Free some space (or point the run at another disk) and resume with --resume.",
        )


def _raise_if_disk_full(err: OSError, target: Path, what: str) -> None:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(err.errno, f"disk full while writing {what} to {target}; the previous version is intact") from err


def atomic_write(path: str | Path, write: Callable[[Path], None], what: str = "a file") -> None:
    """Call write(tmp_path), fsync it, then atomically replace `path` with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(err, path, what)
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, what: str = "a file") -> None:
    atomic_write(path, lambda p: p.write_text(text), what)


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so the names created or renamed in it survive a power loss too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_dir(path: str | Path, write: Callable[[Path], None], what: str = "a directory") -> None:
    """Build a directory under a temporary name next to `path` (`.name.*.tmp`), then rename it into place.
    `write` should fsync its files (atomic_write does).

    If `path` exists it is replaced (moved aside to `.name.old` first, removed after the rename succeeds).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(err, path, what)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
