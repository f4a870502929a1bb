"""Submission files and the submissions log; the ``mmfold lb`` command.

A submission is checked against the competition's test set before it is written (row count,
every test id exactly once and in ``test.csv`` order, known label tokens, no empty label list
unless the data config allows it) and is never overwritten: a name is used once. Every
submission appends a row to ``submissions/<data>/log.csv``; ``mmfold lb`` writes the
leaderboard score back into that row and shows the log with each submission's CV-LB gap, the
number that tells you whether your CV can be trusted.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmfold import io, paths
from mmfold.errors import UserError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
LOG_COLUMNS = ["name", "time", "models", "method", "metric", "weights", "cv_mean", "cv_std",
               "cv_in_sample", "best_single", "best_single_cv", "commit", "lb"]


class SubmissionError(UserError):
    """A submission that the leaderboard would reject or mis-score."""


def submission_path(data: str, name: str) -> Path:
    """``submissions/<data>/<name>.csv``; the name must be a plain file name."""
    if not NAME_RE.fullmatch(name) or name == "log":
        raise UserError(f"bad submission name {name!r}: use letters, digits and ._+- only")
    return paths.submissions_dir(data) / f"{name}.csv"


def log_path(data: str) -> Path:
    """``submissions/<data>/log.csv``."""
    return paths.submissions_dir(data) / "log.csv"


def submission_frame(comp: Any, pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Competition-format table: the id column and the label tokens joined by the separator.

    Args:
        comp: The competition (its ``cfg`` names the columns and separator; ``test`` the ids).
        pred: ``(n_test, L)`` 0/1 matrix in test order.
        classes: Label tokens of the columns of ``pred``.
    """
    cfg, tokens = comp.cfg, np.asarray(classes, dtype=object)
    labels = [cfg.label_sep.join(tokens[np.flatnonzero(row)]) for row in np.asarray(pred)]
    return pd.DataFrame({cfg.id_col: comp.test["id"].astype(str).to_numpy(), cfg.label_col: labels})


def validate_submission(df: pd.DataFrame, comp: Any, classes: list[str]) -> None:
    """Refuse a submission the leaderboard would reject or silently mis-score.

    Raises:
        SubmissionError: naming what is wrong and the first offending ids.
    """
    cfg = comp.cfg
    if comp.test is None:
        raise SubmissionError(f"data '{cfg.name}' has no test set (data.test_csv is null)")
    if list(df.columns) != [cfg.id_col, cfg.label_col]:
        raise SubmissionError(f"columns {list(df.columns)} != [{cfg.id_col!r}, {cfg.label_col!r}]")
    want = comp.test["id"].astype(str).tolist()
    if len(df) != len(want):
        raise SubmissionError(f"{len(df)} rows but test.csv has {len(want)}")
    got = df[cfg.id_col].astype(str)
    _check_ids(got, want)
    labels = df[cfg.label_col].astype(str)
    _check_labels(labels, got, cfg.label_sep, classes, cfg.allow_empty_labels)


def _check_ids(got: pd.Series, want: list[str]) -> None:
    """Every test id once, in test.csv order."""
    dup = got[got.duplicated()].tolist()
    missing = sorted(set(want) - set(got))
    if dup or missing:
        raise SubmissionError(f"test ids: duplicated {dup[:5]}, missing {missing[:5]}")
    if got.tolist() != want:
        first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        raise SubmissionError(f"rows are not in test.csv order (first at row {first + 1})")


def _check_labels(cells: pd.Series, ids: pd.Series, sep: str, classes: list[str],
                  allow_empty: bool) -> None:
    """Only known tokens; an empty list only if the competition accepts one."""
    lists = cells.map(lambda c: [t for t in c.split(sep) if t])
    known = set(classes)
    unknown = lists.map(lambda ls: any(t not in known for t in ls))
    if unknown.any():
        raise SubmissionError(f"unknown label tokens for ids {ids[unknown].tolist()[:5]}")
    empty = lists.map(len) == 0
    if empty.any() and not allow_empty:
        raise SubmissionError(f"{int(empty.sum())} rows with no label (first ids "
                              f"{ids[empty].tolist()[:5]}); set data.allow_empty_labels=true "
                              "if the competition accepts that, or keep blend.min_labels >= 1")


def write_submission(df: pd.DataFrame, path: Path) -> Path:
    """Write atomically; an existing file is never replaced.

    Raises:
        UserError: the file exists.
    """
    try:
        return io.write_new(path, lambda tmp: df.to_csv(tmp, index=False))
    except FileExistsError as e:
        raise UserError(f"{path} exists; submissions are never overwritten: pick another "
                        "NAME=...") from e


def git_commit() -> str:
    """Short commit of the project (``-dirty`` with uncommitted changes), or ``unknown``."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=paths.root(), capture_output=True, text=True,
                              timeout=10, check=False)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def utc_now() -> str:
    """ISO time in UTC, seconds precision."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextmanager
def _log_lock(data: str, wait_s: float = 30.0) -> Iterator[None]:
    """Serialise read-modify-write of the log, so two blends finishing together keep both rows."""
    deadline, stack = time.monotonic() + wait_s, ExitStack()
    while True:
        try:
            stack.enter_context(io.file_lock(log_path(data).with_suffix(".lock")))
            break
        except io.LockedError:
            if time.monotonic() > deadline:
                raise UserError(f"{log_path(data)} is locked by another process") from None
            time.sleep(0.2)
    with stack:
        yield


def append_log(data: str, row: dict[str, Any]) -> Path:
    """Append a submission's row (missing columns blank, ``lb`` empty); earlier rows kept."""
    full = {c: row.get(c, "") for c in LOG_COLUMNS}
    full |= {k: v for k, v in row.items() if k not in LOG_COLUMNS}
    with _log_lock(data):
        return io.append_csv_row(log_path(data), full)


def read_log(data: str) -> pd.DataFrame:
    """The log as strings, exactly as written."""
    path = log_path(data)
    if not path.exists():
        raise UserError(f"{path} not found: no submission made yet (run `make blend`)")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def record_lb(data: str, name: str, score: float) -> pd.Series:
    """Write a leaderboard score into the submission's log row (the latest row of that name).

    Raises:
        UserError: no such submission in the log.
    """
    with _log_lock(data):
        log = read_log(data)
        rows = np.flatnonzero(log["name"] == name)
        if not len(rows):
            raise UserError(f"no submission named {name!r} in {log_path(data)}; "
                            f"known: {log['name'].tolist()[-10:]}")
        log.loc[rows[-1], "lb"] = repr(float(score))
        io.write_csv(log, log_path(data))
    return log.loc[rows[-1]]


def log_table(data: str) -> pd.DataFrame:
    """The log with numbers parsed and ``gap = lb - cv_mean``, best LB first, then best CV."""
    log = read_log(data)
    cols = ["name", "time", "method", "models", "cv_mean", "cv_std", "cv_in_sample", "lb"]
    out = log[cols].copy()
    for c in ("cv_mean", "cv_std", "cv_in_sample", "lb"):
        out[c] = pd.to_numeric(out[c], errors="coerce")
    out["gap"] = out["lb"] - out["cv_mean"]
    out = out.sort_values(["lb", "cv_mean"], ascending=False, na_position="last")
    return out.reset_index(drop=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmfold lb --name NAME --score 0.912`` or ``mmfold lb --show``."""
    p.add_argument("--name", help="submission name (the CSV's stem)")
    p.add_argument("--score", type=float, help="leaderboard score to record for --name")
    p.add_argument("--show", action="store_true", help="print the log sorted, with the CV-LB gap")


def run(args: argparse.Namespace) -> int:
    """Record a score (needs --name) and/or show the log."""
    if args.score is not None:
        if not args.name:
            raise UserError("--score needs --name (the submission it belongs to)")
        row = record_lb(args.data, args.name, args.score)
        gap = args.score - float(row["cv_mean"]) if row["cv_mean"] else float("nan")
        print(f"recorded LB {args.score} for {args.name} (CV {row['cv_mean']}, gap {gap:+.4f})")
    if args.show or args.score is None:
        with pd.option_context("display.width", 200, "display.max_colwidth", 40,
                               "display.float_format", "{:.4f}".format):
            print(log_table(args.data).to_string(index=False, na_rep="-"))
    return 0
