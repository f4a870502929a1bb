"""Atomic file writes and per-run locks.

Every artifact mmfold produces goes through :func:`atomic_write`, so a crash, a kill or a full
disk leaves either the previous file or the new one, never half of either. Files a user made
(folds, submissions, the submissions log) are protected further by :func:`write_new`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from mmfold.errors import UserError


class LockedError(UserError, RuntimeError):
    """Another live process holds the lock (a user error: printed in one line, no traceback)."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through a temp file in the same folder, then ``os.replace`` it.

    Args:
        path: Destination file.
        write: Called with the temp path; it must create that file.

    Returns:
        The destination path.

    If ``write`` raises (a full disk, a bug, Ctrl-C), the temp file is removed and the previous
    file at ``path`` is untouched.
    """
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


TEMP_SUFFIX = ".tmp"


def _temp_prefix(name: str) -> str:
    """Temp files are hidden and start with their destination's name, so a sweep can tell
    whose they are."""
    return f".{name}."


def _temp_beside(path: Path) -> Path:
    """An empty hidden temp file in ``path``'s folder (same filesystem, so rename is atomic).

    Made world-readable like a normal file (``mkstemp`` alone would leave it 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=TEMP_SUFFIX, dir=path.parent)
    os.fchmod(fd, 0o644)
    os.close(fd)
    return Path(name)


def remove_orphan_temps(folder: str | Path, names: list[str] | None = None) -> list[Path]:
    """Delete temp files that a killed writer left in ``folder``; return what was removed.

    :func:`atomic_write` cleans up after itself unless the process dies (SIGKILL, power cut)
    between creating its temp file and renaming it. Call this only while holding the lock
    that serialises writers of ``folder`` (or of ``names`` in it): a live writer's temp file
    must not vanish under it.

    Args:
        folder: The folder to sweep (not recursive).
        names: Only temps of these destination file names; all of them when None.
    """
    folder = Path(folder)
    prefixes = [_temp_prefix(n) for n in names] if names is not None else ["."]
    patterns = [f"{prefix}*{TEMP_SUFFIX}" for prefix in prefixes]
    removed = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def _fsync(path: Path) -> None:
    """Flush a file to disk so the rename never exposes an empty file after a power cut."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically write bytes."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write pretty JSON (numpy scalars are converted)."""
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    """Let json serialise numpy scalars/arrays and paths."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    """Atomically write a DataFrame as parquet (index not stored)."""
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_csv(df: pd.DataFrame, path: str | Path, **kwargs: Any) -> Path:
    """Atomically write a DataFrame as CSV (index not stored)."""
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, **kwargs))


def write_new(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Atomically create ``path``; refuse if it exists, even if another process races us.

    ``os.link`` fails when the destination exists, so two writers can never both win.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file", str(path))
    tmp = _temp_beside(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def append_csv_row(path: str | Path, row: dict[str, Any]) -> Path:
    """Append one row to a CSV log by rewriting it atomically; earlier rows are kept verbatim.

    New columns are added (earlier rows get blanks); nothing is ever dropped.
    """
    path = Path(path)
    old = pd.read_csv(path, dtype=str, keep_default_na=False) if path.exists() else pd.DataFrame()
    new = pd.concat([old, pd.DataFrame([{k: _cell(v) for k, v in row.items()}])], ignore_index=True)
    return write_csv(new.fillna(""), path)


def _cell(v: Any) -> str:
    """Render a log cell: JSON for containers, plain text otherwise."""
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=_json_default)
    return "" if v is None else str(v)


@contextlib.contextmanager
def file_lock(path: str | Path, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` for the duration of the block.

    ``flock`` locks die with their process, so a killed run never leaves a stale lock behind.

    Args:
        path: The lock file (created if missing).
        wait: Block until the holder is done instead of refusing (for short critical sections
            such as collecting a model, which two fold runs may reach at the same time).

    Raises:
        LockedError: another live process holds it and ``wait`` is False.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            holder = Path(path).read_text(errors="replace").strip() or "another process"
            raise LockedError(f"{path} is locked by {holder}; is another run on this fold?") from e
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        yield path
    finally:
        os.close(fd)
