"""Atomic writes, never-overwrite, append-only logs and process locks."""

import multiprocessing as mp
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mmfold import fileio


def test_failing_writer_leaves_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    fileio.write_json(target, {"v": 1})

    def full_disk(tmp: Path) -> None:
        tmp.write_text('{"v": 2, "trunc')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        fileio.atomic_write(target, full_disk)
    assert target.read_text().strip().endswith("}") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


def test_write_new_refuses_existing(tmp_path: Path) -> None:
    p = tmp_path / "sub.csv"
    fileio.write_new(p, lambda t: t.write_text("first"))
    with pytest.raises(FileExistsError):
        fileio.write_new(p, lambda t: t.write_text("second"))
    assert p.read_text() == "first"


def test_append_csv_row_keeps_rows_and_adds_columns(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    fileio.append_csv_row(log, {"name": "a", "cv": 0.5})
    fileio.append_csv_row(log, {"name": "b", "cv": 0.6, "lb": 0.61, "weights": {"m": 1.0}})
    df = pd.read_csv(log, dtype=str, keep_default_na=False)
    assert df["name"].tolist() == ["a", "b"] and df["lb"].tolist() == ["", "0.61"]
    assert df["weights"][1] == '{"m": 1.0}'


def _hold(path: str, ready, release) -> None:
    with fileio.file_lock(path):
        ready.set()
        release.wait(10)


def _holder(lock: Path) -> tuple[mp.process.BaseProcess, Any]:
    """Another process holding ``lock`` until the returned event is set."""
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(lock), ready, release))
    proc.start()
    assert ready.wait(10)
    return proc, release


def test_lock_refuses_second_holder_and_dies_with_process(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    proc, _ = _holder(lock)
    with pytest.raises(fileio.LockedError, match="locked by pid"):
        with fileio.file_lock(lock):
            pass
    proc.kill()  # a dead holder must not leave the lock stuck
    proc.join()
    with fileio.file_lock(lock):
        pass


def test_waiting_lock_blocks_until_the_holder_is_done(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    proc, release = _holder(lock)
    threading.Timer(0.5, release.set).start()
    start = time.perf_counter()
    with fileio.file_lock(lock, wait=True):  # waits instead of raising LockedError
        waited = time.perf_counter() - start
        assert release.is_set()
    proc.join()
    assert waited >= 0.4


def test_orphan_temps_of_a_killed_writer_are_removed_and_nothing_else(tmp_path: Path) -> None:
    for name in ("last.pt", "oof.parquet"):  # a SIGKILL after mkstemp, before the rename
        fileio._temp_beside(tmp_path / name).write_bytes(b"half")
    fileio.write_text(tmp_path / "keep.json", "{}")
    (tmp_path / "user.tmp").write_text("a user's own file")  # not one of ours: not hidden
    temps = sorted(p.name for p in tmp_path.glob(".*.tmp"))
    assert len(temps) == 2

    assert [p.name for p in fileio.remove_orphan_temps(tmp_path, ["oof.parquet"])] == [t for t in temps if "oof" in t]
    assert [p.name for p in fileio.remove_orphan_temps(tmp_path)] == [t for t in temps if "last" in t]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json", "user.tmp"]
