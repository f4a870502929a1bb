"""Optuna studies on disk: the one SQLite storage of the blend's and the sweep's studies.

Both stages keep their studies in SQLite so that a killed or interrupted run resumes. The
storage is opened here, once per URL, the same way for both: write-ahead logging (Optuna
commits several times per trial; with SQLite's default journal each commit is an fsync,
measured ~8x slower than an in-memory study) and trial heartbeats, so that a trial whose
process was killed does not stay RUNNING forever (:func:`fail_stale_trials`).
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmfold import paths

# A trial whose process was killed stays RUNNING forever unless something notices: with a
# heartbeat, a trial silent for GRACE_S seconds is marked FAIL when a study is next opened.
HEARTBEAT_S = 10
GRACE_S = 60
SQLITE = "sqlite:///"


def sqlite_url(path: Path) -> str:
    """SQLAlchemy URL of an SQLite file (its folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE}{path.resolve()}"


def blend_url(data: str) -> str:
    """``oof/<data>/blend.db``: the blend studies, next to the OOF files they were tuned on."""
    return sqlite_url(paths.oof_dir(data) / "blend.db")


def sweep_url(data: str, study: str) -> str:
    """``sweeps/<data>/<study>.db``: one file per sweep study."""
    return sqlite_url(paths.sweeps_dir(data) / f"{study}.db")


@contextlib.contextmanager
def heartbeat_api() -> Iterator[None]:
    """Optuna flags its heartbeat API "experimental"; we rely on it knowingly, so say nothing."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


@functools.lru_cache(maxsize=8)
def storage(url: str) -> Any:
    """The Optuna storage of a URL; SQLite gets write-ahead logging and heartbeats.

    WAL with synchronous=NORMAL keeps the database consistent after a crash (at worst the
    last trials are lost, and a resumed study redoes them). Other URLs are returned as they
    are, for Optuna to open.
    """
    import optuna

    if not url.startswith(SQLITE):
        return url
    path = url.removeprefix(SQLITE)

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=60, check_same_thread=False)  # heartbeat thread
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    with heartbeat_api():
        return optuna.storages.RDBStorage(url, engine_kwargs={"creator": connect},
                                          heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)


def fail_stale_trials(study: Any) -> None:
    """Mark FAIL the RUNNING trials whose heartbeat stopped (their process was killed)."""
    import optuna

    with heartbeat_api():
        optuna.storages.fail_stale_trials(study)


def complete_trials(study: Any) -> list[Any]:
    """Finished trials (a killed run leaves RUNNING ones behind; they are not counted)."""
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
