"""Submission files and the submissions log; the ``mmfold submit`` command.

A submission has the competition's format: the header and row order of its sample
submission when the data config names one (``data.sample_submission``), else
``<id_col>,<label_col>`` in ``test.csv`` order. It is checked before it is written (columns,
row count, every test id exactly once and in that order, known label tokens, no empty label
list unless the data config allows it) and is never overwritten: a name is used once.

Every submission appends a row to ``submissions/<data>/log.csv`` holding every setting that
changed it. ``mmfold submit`` appends each leaderboard score, with its UTC time, to
``submissions/<data>/lb.csv`` (a second score never replaces the first), copies the latest
into the log row, and shows the log with each submission's CV-LB gap, the number that tells
you whether your CV can be trusted. A score is typed (``--score``, source ``manual``) or read
back from Kaggle (``--kaggle``: the logged CSV is submitted to ``data.kaggle`` through
:mod:`mmfold.kaggle`, source ``kaggle`` with the submission's id in ``ref``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmfold import fileio, hints, paths
from mmfold.errors import UserError
from mmfold.metrics import metric_label

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
RESERVED_NAMES = ("log", "lb")  # submissions/<data>/log.csv and lb.csv
# The first 13 are the original columns: an older log keeps them, later ones are appended.
LOG_COLUMNS = ["name", "time", "models", "method", "metric", "weights", "cv_mean", "cv_std",
               "cv_in_sample", "best_single", "best_single_cv", "commit", "lb",
               "transform", "n_trials", "seed", "cooccurrence", "min_labels", "max_labels",
               "top_k", "exponents", "thresholds", "thresholds_file", "note"]
LB_COLUMNS = ["name", "time", "lb", "metric", "source", "ref"]  # source: manual | kaggle; ref: Kaggle's id
SCORE_RANGE = (0.0, 1.0)  # every metric in mmfold.metrics.METRICS is a share
MAX_SHOWN = 5  # ids named in a mismatch message


class SubmissionError(UserError):
    """A submission that the leaderboard would reject or mis-score."""


def submission_path(data: str, name: str) -> Path:
    """``submissions/<data>/<name>.csv``; the name must be a plain file name."""
    if not NAME_RE.fullmatch(name) or name in RESERVED_NAMES:
        raise UserError(f"bad submission name {name!r}: use letters, digits and ._+- only")
    return paths.submissions_dir(data) / f"{name}.csv"


def log_path(data: str) -> Path:
    """``submissions/<data>/log.csv``."""
    return paths.submissions_dir(data) / "log.csv"


@dataclass
class SubmissionFormat:
    """What the leaderboard expects: header, which column is which, and the row order."""

    columns: list[str]  # the header, in order
    id_col: str
    label_col: str
    ids: list[str]  # the row order: the sample submission's, else test.csv's
    order: str = "test.csv"  # where the row order comes from, for messages


@dataclass(frozen=True)
class SampleAdvice:
    """How the command at hand lets a user name another sample submission, or none: the
    project's setting (``data.sample_submission``), or an exported bundle's ``--sample`` flag.
    Messages about a sample submission name the switch of the command that read it."""

    setting: str  # what named the file, as the message's prefix
    pick: str  # how to give the right one
    none: str  # how to write the default header instead


PROJECT_ADVICE = SampleAdvice(
    setting="data.sample_submission",
    pick="put this test set's sample submission beside its test file (TEST= takes the one beside it), "
         "or name it: ARGS='data.sample_submission=<path>'",
    none="set data.sample_submission=null")


def submission_format(comp: Any, advice: SampleAdvice = PROJECT_ADVICE) -> SubmissionFormat:
    """The format of ``data.sample_submission`` if the data config names one, else the default.

    The sample's header is followed exactly (names and order, e.g. ``Id,Predicted``). Its id
    column is the one named ``data.id_col``, else the one not named ``data.label_col``, else
    the first (the Kaggle convention); when the sample has rows they must be exactly the test
    ids, and their order is the submission's. ``advice`` words the messages for the command
    that reads it (the project, or a bundle's flags).

    Raises:
        UserError: the file is missing, or has columns that cannot be mapped to one id column
            and one label-list column, or ids that are not the test ids.
    """
    cfg = comp.cfg
    test_ids = comp.test["id"].astype(str).tolist()
    if not cfg.sample_submission:
        return SubmissionFormat([cfg.id_col, cfg.label_col], cfg.id_col, cfg.label_col, test_ids)
    from mmfold.data.competition import read_table

    path = paths.resolve(cfg.root) / cfg.sample_submission
    default = f"{cfg.id_col},{cfg.label_col}"
    if not path.exists():
        rel = "" if Path(cfg.sample_submission).is_absolute() else f" (relative to data.root={cfg.root})"
        raise UserError(f"{advice.setting}: {path} not found{rel}; {advice.pick}, or {advice.none} to write {default}")
    sample = read_table(path, cfg.encoding)
    id_col, label_col, how = _sample_columns(list(sample.columns), cfg, path, advice)
    ids = sample[id_col].astype(str).tolist()
    if ids:
        test = paths.resolve(cfg.root) / str(cfg.test_csv)
        _check_sample_ids(ids, test_ids, f"{path}: its {how} {id_col!r}", test, advice)
    return SubmissionFormat(list(sample.columns), id_col, label_col, ids or test_ids,
                            "sample submission" if ids else "test.csv")


def _sample_columns(cols: list[str], cfg: Any, path: Path,
                    advice: SampleAdvice = PROJECT_ADVICE) -> tuple[str, str, str]:
    """(id column, label column, how the id column was chosen) of a sample submission."""
    if len(cols) != 2 or cols[0] == cols[1]:
        raise UserError(f"{path}: {len(cols)} column{'s' if len(cols) != 1 else ''} {cols}; mmfold "
                        "writes one id column and one column of labels joined by data.label_sep "
                        f"({advice.none} to write {cfg.id_col},{cfg.label_col})")
    if cfg.id_col in cols:
        id_col, how = cfg.id_col, "column named data.id_col"
    elif cfg.label_col in cols:
        id_col, how = next(c for c in cols if c != cfg.label_col), "column not named data.label_col"
    else:
        id_col, how = cols[0], "first column"
    return id_col, next(c for c in cols if c != id_col), how


def _check_sample_ids(ids: list[str], test_ids: list[str], where: str, test: Path,
                      advice: SampleAdvice = PROJECT_ADVICE) -> None:
    """The sample's ids are the test ids, each once (else it belongs to another test set, as
    the first stage's sample does for a stage-2 test file: say how to give the right one)."""
    s = pd.Series(ids)
    dup = s[s.duplicated()].tolist()
    extra = [i for i in ids if i not in set(test_ids)]
    missing = [i for i in test_ids if i not in set(ids)]
    if dup or extra or missing:
        parts = ([f"duplicated {_first(dup)}"] if dup else []) + \
                ([f"{len(extra)} not in {test.name} (first: {_first(extra)})"] if extra else []) + \
                ([f"missing {len(missing)} test ids (first: {_first(missing)})"] if missing else [])
        raise UserError(f"{where} should hold every id of {test} once: {'; '.join(parts)}; if it belongs "
                        f"to another test set, {advice.pick}")


def _first(ids: list[str]) -> str:
    """The first few ids, quoted."""
    more = f" ... ({len(ids)} in all)" if len(ids) > MAX_SHOWN else ""
    return ", ".join(repr(i) for i in ids[:MAX_SHOWN]) + more


def submission_frame(comp: Any, pred: np.ndarray, classes: list[str],
                     fmt: SubmissionFormat | None = None) -> pd.DataFrame:
    """Competition-format table: ids and the label tokens joined by the separator.

    Args:
        comp: The competition (its ``cfg`` names the separator; ``test`` the ids).
        pred: ``(n_test, L)`` 0/1 matrix in test order.
        classes: Label tokens of the columns of ``pred``.
        fmt: Header and row order; :func:`submission_format` of ``comp`` when None.
    """
    fmt = fmt or submission_format(comp)
    cfg, tokens = comp.cfg, np.asarray(classes, dtype=object)
    labels = [cfg.label_sep.join(tokens[np.flatnonzero(row)]) for row in np.asarray(pred)]
    df = pd.DataFrame({fmt.id_col: comp.test["id"].astype(str).to_numpy(), fmt.label_col: labels})
    df = df.set_index(fmt.id_col, drop=False).loc[fmt.ids].reset_index(drop=True)
    return df[fmt.columns]


def validate_submission(df: pd.DataFrame, comp: Any, classes: list[str],
                        fmt: SubmissionFormat | None = None) -> None:
    """Refuse a submission the leaderboard would reject or silently mis-score.

    Raises:
        SubmissionError: naming what is wrong and the first offending ids.
    """
    cfg = comp.cfg
    if comp.test is None:
        raise SubmissionError(f"data '{cfg.name}' has no test set (data.test_csv is null)")
    fmt = fmt or submission_format(comp)
    if list(df.columns) != fmt.columns:
        raise SubmissionError(f"columns {list(df.columns)} != {fmt.columns}")
    if len(df) != len(fmt.ids):
        raise SubmissionError(f"{len(df)} rows but test.csv has {len(fmt.ids)}")
    got = df[fmt.id_col].astype(str)
    _check_ids(got, fmt.ids, fmt.order)
    labels = df[fmt.label_col].astype(str)
    _check_labels(labels, got, cfg.label_sep, classes, cfg.allow_empty_labels)


def _check_ids(got: pd.Series, want: list[str], order: str = "test.csv") -> None:
    """Every test id once, in the expected order (``order`` names where it comes from)."""
    dup = got[got.duplicated()].tolist()
    missing = sorted(set(want) - set(got))
    if dup or missing:
        raise SubmissionError(f"test ids: duplicated {dup[:5]}, missing {missing[:5]}")
    if got.tolist() != want:
        first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        raise SubmissionError(f"rows are not in {order} order (first at row {first + 1})")


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
        return fileio.write_new(path, lambda tmp: df.to_csv(tmp, index=False))
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
            stack.enter_context(fileio.file_lock(log_path(data).with_suffix(".lock")))
            break
        except fileio.LockedError:
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
        return fileio.append_csv_row(log_path(data), full)


def read_log(data: str) -> pd.DataFrame:
    """The log as strings, exactly as written."""
    path = log_path(data)
    if not path.exists():
        raise UserError(f"{path} not found: no blend logged yet (run `{hints.make('blend', data)}`)")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def lb_path(data: str) -> Path:
    """``submissions/<data>/lb.csv``: every leaderboard score written back, oldest first."""
    return paths.submissions_dir(data) / "lb.csv"


def read_lb(data: str) -> pd.DataFrame:
    """Every recorded leaderboard score (``name,time,lb,metric``), as strings; empty if none."""
    path = lb_path(data)
    if not path.exists():
        return pd.DataFrame(columns=LB_COLUMNS)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def parse_score(text: str) -> float:
    """A leaderboard score typed by a user, or a message saying what is wrong with it.

    Raises:
        UserError: not a finite number (``81,2`` gets a hint about the decimal point).
    """
    try:
        score = float(text)
    except ValueError:
        hint = f": use a decimal point ({text.replace(',', '.')})" if "," in text else ""
        raise UserError(f"LB score {text!r} is not a number{hint}") from None
    if not math.isfinite(score):
        raise UserError(f"LB score {text!r} is not a number")
    return score


def check_score(score: float, metric: str) -> None:
    """Refuse a score the metric cannot have; 81.2 for an F1 is a percentage typed by habit.

    Raises:
        UserError: outside the metric's range, with the fraction when it looks like a percentage.
    """
    lo, hi = SCORE_RANGE
    if lo <= score <= hi:
        return
    hint = (f"; it looks like a percentage: did you mean LB={score / 100:g}?"
            if hi < score <= 100 * hi else "")
    raise UserError(f"LB {score:g} is outside the range of {metric_label(metric)} scores, "
                    f"[{lo:g}, {hi:g}]{hint}")


def record_lb(data: str, name: str, score: float, source: str = "manual", ref: str = "") -> pd.Series:
    """Append a leaderboard score to ``lb.csv`` and show the latest in the submission's log row.

    Earlier scores are kept: ``lb.csv`` is only appended to, and a score an older log held in
    its ``lb`` cell is moved into it (time unknown) before the first new one. ``source`` says
    where the score came from (``manual``: typed; ``kaggle``: read back, ``ref`` its id).

    Raises:
        UserError: no such submission in the log, or a score out of the metric's range.
    """
    with _log_lock(data):
        log = read_log(data)
        rows = np.flatnonzero(log["name"] == name)
        if not len(rows):
            raise UserError(f"no submission named {name!r} in {log_path(data)}; "
                            f"known: {log['name'].tolist()[-10:]}")
        row = rows[-1]
        metric = log.loc[row].get("metric") or "samples"
        check_score(score, metric)
        old = log.loc[row, "lb"]
        if old and not (read_lb(data)["name"] == name).any():
            fileio.append_csv_row(lb_path(data), {"name": name, "time": "", "lb": old, "metric": metric})
        fileio.append_csv_row(lb_path(data), {"name": name, "time": utc_now(), "lb": repr(float(score)),
                                              "metric": metric, "source": source, "ref": ref})
        log.loc[row, "lb"] = repr(float(score))
        fileio.write_csv(log, log_path(data))
    return log.loc[row]


def log_table(data: str) -> pd.DataFrame:
    """The log with numbers parsed, the latest LB of each submission, how many were recorded
    (``lb_n``) and when (``lb_time``), and ``gap = lb - cv_mean``; best LB first, then best CV."""
    log = read_log(data)
    cols = ["name", "time", "method", "metric", "models", "cv_mean", "cv_std", "cv_in_sample", "lb"]
    out = log.reindex(columns=cols, fill_value="")
    hist = read_lb(data).groupby("name")
    latest, count = hist.last(), hist.size()
    out["lb_n"] = out["name"].map(count).fillna((out["lb"] != "").astype(int)).astype(int)
    out["lb_time"] = out["name"].map(latest["time"]).fillna("")
    out["lb"] = out["name"].map(latest["lb"]).fillna(out["lb"])
    for c in ("cv_mean", "cv_std", "cv_in_sample", "lb"):
        out[c] = pd.to_numeric(out[c], errors="coerce")
    out["gap"] = out["lb"] - out["cv_mean"]
    out = out.sort_values(["lb", "cv_mean"], ascending=False, na_position="last")
    return out.reset_index(drop=True)


def log_row(data: str, name: str) -> pd.Series:
    """A submission's (latest) row of the log.

    Raises:
        UserError: no such submission.
    """
    log = read_log(data)
    rows = np.flatnonzero(log["name"] == name)
    if not len(rows):
        raise UserError(f"no submission named {name!r} in {log_path(data)}; known: {log['name'].tolist()[-10:]}")
    return log.loc[rows[-1]]


def kaggle_tag(data: str, name: str) -> str:
    """How a submission's Kaggle description starts: finds it again after a cut-short wait."""
    return f"mmfold {paths.data_name(data)}/{name}:"


def kaggle_message(data: str, row: pd.Series) -> str:
    """The description a Kaggle submission carries: the blend, its honest CV and its members
    with their weights (read back on the leaderboard page, beside the public score)."""
    metric = metric_label(row.get("metric") or "samples")
    cv = f"honest CV {float(row['cv_mean']):.4f}" if row.get("cv_mean") else "honest CV unknown"
    if row.get("cv_std"):
        cv += f" ± {float(row['cv_std']):.4f}"
    try:
        weights = json.loads(row.get("weights") or "{}")
    except ValueError:
        weights = {}
    members = str(row.get("models") or "").split()
    listed = ", ".join(f"{m} {weights[m]:.2f}" if isinstance(weights.get(m), (int, float)) else m for m in members)
    method = f" by {row['method']}" if row.get("method") else ""
    commit = f"; commit {row['commit']}" if row.get("commit") else ""
    return f"{kaggle_tag(data, row['name'])} {cv} ({metric}); {len(members)} members{method}: {listed}{commit}"


def submit_to_kaggle(data: str, name: str, overrides: list[str] = (), wait_s: float | None = None,
                     force: bool = False) -> tuple[float, str, pd.Series]:
    """Submit the logged CSV of ``name`` to the data config's competition (``data.kaggle``),
    wait for its public score and record it (source ``kaggle``, the submission's id).

    A submission this command made before whose score never came back (a wait cut short) is
    waited for again instead of being submitted twice; ``force`` submits anew. Nothing is
    recorded unless a score comes back.

    Returns:
        The score, the Kaggle id and the updated log row.

    Raises:
        UserError: no competition named, no such submission or CSV, already scored (without
            ``force``), or anything Kaggle refused (credentials, daily limit, format), one line.
    """
    from mmfold import kaggle
    from mmfold.config import data_yaml, load_config

    slug = load_config(data, None, list(overrides)).data.kaggle
    if not slug:
        raise UserError(f"data.kaggle is not set: add `kaggle: <slug>` under data: in {data_yaml(data)} "
                        "(the slug is the part of the competition's URL after /competitions/)")
    row, csv = log_row(data, name), submission_path(data, name)
    if not csv.exists():
        raise UserError(f"{csv} not found: the log names {name!r} but its submission file is gone")
    earlier = read_lb(data).reindex(columns=LB_COLUMNS, fill_value="")
    earlier = earlier[(earlier["name"] == name) & (earlier["source"] == "kaggle")]
    resubmit = hints.make('submit', data, force=True, NAME=name, KAGGLE='1')
    if len(earlier) and not force:
        last = earlier.iloc[-1]
        raise UserError(f"{name} is on the leaderboard already (Kaggle submission {last['ref']}, LB {last['lb']}); "
                        f"the same file scores the same: to submit it again anyway, {resubmit}")
    api = kaggle.client()
    found = None if force else kaggle.find_submission(api, slug, kaggle_tag(data, name))
    if found is not None:
        ref = int(found.ref)
        print(f"{name} was submitted to {slug} before (Kaggle submission {ref}); waiting for its score "
              "instead of submitting it again")
    else:
        ref = kaggle.submit_file(api, slug, csv, kaggle_message(data, row))
        print(f"submitted {csv.name} to {slug}: Kaggle submission {ref}; waiting for its public score")
    score = kaggle.wait_for_score(api, ref, kaggle.WAIT_S if wait_s is None else wait_s, label=name,
                                  resubmit=resubmit)
    return score, str(ref), record_lb(data, name, score, source="kaggle", ref=str(ref))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmfold submit --name NAME --score 0.912``, ``--name NAME --kaggle`` or ``--show``."""
    p.add_argument("--name", help="submission name (the CSV's stem)")
    p.add_argument("--score", help="leaderboard score to record for --name (every one is kept)")
    p.add_argument("--kaggle", action="store_true",
                   help="submit --name's CSV to the competition data.kaggle names, wait for its public score, record it")
    p.add_argument("--wait", type=float, default=None,
                   help="with --kaggle: seconds to wait for the score (default 600)")
    p.add_argument("--show", action="store_true", help="print the log sorted, with the CV-LB gap")


def run(args: argparse.Namespace) -> int:
    """Record a score (needs --name; typed, or read back from Kaggle) and/or show the log."""
    if args.kaggle:
        if not args.name or args.score is not None:
            raise UserError("--kaggle needs --name (the logged submission to send) and no --score")
        score, ref, row = submit_to_kaggle(args.data, args.name, args.overrides, args.wait, args.force)
        gap = score - float(row["cv_mean"]) if row["cv_mean"] else float("nan")
        print(f"recorded LB {score:g} for {args.name} from Kaggle submission {ref} (CV {row['cv_mean']}, "
              f"gap {gap:+.4f}; in {lb_path(args.data)})")
    if args.score is not None:
        if not args.name:
            raise UserError("--score needs --name (the submission it belongs to)")
        score = parse_score(args.score)
        row = record_lb(args.data, args.name, score)
        gap = score - float(row["cv_mean"]) if row["cv_mean"] else float("nan")
        n = int((read_lb(args.data)["name"] == args.name).sum())
        print(f"recorded LB {score:g} for {args.name} (CV {row['cv_mean']}, gap {gap:+.4f}; "
              f"{n} LB score{'s' if n != 1 else ''} recorded for it, in {lb_path(args.data)})")
    if args.show or (args.score is None and not args.kaggle):
        with pd.option_context("display.width", 200, "display.max_colwidth", 40,
                               "display.float_format", "{:.4f}".format):
            print(log_table(args.data).to_string(index=False, na_rep="-"))
    return 0
