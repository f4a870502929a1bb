"""Submission validation and writing, the submissions log and ``mmfold submit``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mmfold import cli
from mmfold.ensemble import submission as submit
from mmfold.config import DataConfig
from mmfold.errors import UserError
from mmfold.ensemble.submission import SubmissionError

CLASSES = ["cat", "dog", "10"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MMFOLD_HOME", str(tmp_path))
    return tmp_path


def comp(allow_empty: bool = False, sep: str = " ", sample: str | None = None) -> SimpleNamespace:
    cfg = DataConfig(name="d", root="input/d", id_col="ImageID", label_col="Labels", label_sep=sep,
                     allow_empty_labels=allow_empty, sample_submission=sample)
    return SimpleNamespace(cfg=cfg, test=pd.DataFrame({"id": ["a.jpg", "b.jpg", "c.jpg"]}))


PRED = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1]])


def test_submission_frame_uses_competition_columns_tokens_and_separator() -> None:
    df = submit.submission_frame(comp(sep="|"), PRED, CLASSES)
    assert list(df.columns) == ["ImageID", "Labels"]
    assert df["ImageID"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert df["Labels"].tolist() == ["cat|10", "dog", "cat|dog|10"]
    submit.validate_submission(df, comp(sep="|"), CLASSES)


def test_validation_rejects_wrong_row_count() -> None:
    df = submit.submission_frame(comp(), PRED, CLASSES).iloc[:2]
    with pytest.raises(SubmissionError, match="2 rows but test.csv has 3"):
        submit.validate_submission(df, comp(), CLASSES)


def test_validation_rejects_duplicates_order_and_unknown_tokens() -> None:
    good = submit.submission_frame(comp(), PRED, CLASSES)
    dup = good.assign(ImageID=["a.jpg", "a.jpg", "c.jpg"])
    with pytest.raises(SubmissionError, match=r"duplicated \['a.jpg'\], missing \['b.jpg'\]"):
        submit.validate_submission(dup, comp(), CLASSES)
    with pytest.raises(SubmissionError, match="not in test.csv order"):
        submit.validate_submission(good.iloc[[1, 0, 2]], comp(), CLASSES)
    with pytest.raises(SubmissionError, match="unknown label tokens"):
        submit.validate_submission(good.assign(Labels=["cat", "bird", "dog"]), comp(), CLASSES)


def test_empty_label_lists_only_when_allowed() -> None:
    pred = PRED.copy()
    pred[1] = 0
    df = submit.submission_frame(comp(), pred, CLASSES)
    with pytest.raises(SubmissionError, match="1 rows with no label.*b.jpg"):
        submit.validate_submission(df, comp(), CLASSES)
    submit.validate_submission(df, comp(allow_empty=True), CLASSES)


def test_existing_submission_is_never_overwritten(home: Path) -> None:
    path = submit.submission_path("d", "run1")
    df = submit.submission_frame(comp(), PRED, CLASSES)
    submit.write_submission(df, path)
    before = path.read_bytes()
    with pytest.raises(UserError, match="never overwritten"):
        submit.write_submission(df.assign(Labels="dog"), path)
    assert path.read_bytes() == before
    assert pd.read_csv(path, dtype=str)["Labels"].tolist() == ["cat 10", "dog", "cat dog 10"]
    assert [p.name for p in path.parent.iterdir()] == ["run1.csv"]  # no temp files left


def test_bad_submission_names_are_refused(home: Path) -> None:
    for name in ("../x", "a/b", "log", ""):
        with pytest.raises(UserError):
            submit.submission_path("d", name)


def row(name: str, cv: float) -> dict:
    return {"name": name, "time": "t", "models": "a b", "method": "optuna", "metric": "samples",
            "weights": {"a": 0.7, "b": 0.3}, "cv_mean": cv, "cv_std": 0.01, "cv_in_sample": cv + 0.01}


def test_log_keeps_every_earlier_row(home: Path) -> None:
    for i, cv in enumerate([0.81, 0.83, 0.82]):
        submit.append_log("d", row(f"s{i}", cv))
        log = submit.read_log("d")
        assert log["name"].tolist() == [f"s{k}" for k in range(i + 1)]
        if i:
            pd.testing.assert_frame_equal(log.iloc[:i], first_rows.iloc[:i])
        first_rows = log
    assert list(log.columns[: len(submit.LOG_COLUMNS)]) == submit.LOG_COLUMNS
    assert log["weights"][0] == '{"a": 0.7, "b": 0.3}' and log["lb"].tolist() == ["", "", ""]


def test_lb_records_a_score_and_show_sorts_with_the_gap(home: Path, capsys: pytest.CaptureFixture) -> None:
    for name, cv in (("s0", 0.80), ("s1", 0.85), ("s2", 0.82)):
        submit.append_log("d", row(name, cv))
    assert cli.main(["submit", "--data", "d", "--name", "s0", "--score", "0.79"]) == 0
    assert cli.main(["submit", "--data", "d", "--name", "s2", "--score", "0.84"]) == 0
    log = submit.read_log("d")
    assert log["lb"].tolist() == ["0.79", "", "0.84"]
    assert log["name"].tolist() == ["s0", "s1", "s2"]
    table = submit.log_table("d")
    assert table["name"].tolist() == ["s2", "s0", "s1"]  # scored by LB first, then by CV
    assert table["gap"][0] == pytest.approx(0.02) and np.isnan(table["gap"][2])
    capsys.readouterr()
    assert cli.main(["submit", "--data", "d", "--show"]) == 0
    assert "gap" in capsys.readouterr().out


def test_lb_for_an_unknown_submission_is_an_error(home: Path) -> None:
    submit.append_log("d", row("s0", 0.8))
    with pytest.raises(UserError, match="no submission named 'nope'"):
        submit.record_lb("d", "nope", 0.5)
    assert cli.main(["submit", "--data", "d", "--score", "0.5"]) == 2  # --score without --name


def test_git_commit_outside_a_repository_is_unknown(home: Path) -> None:
    assert submit.git_commit() == "unknown"


# ---- every leaderboard score is kept ----------------------------------------------------------


def test_every_lb_score_is_kept_with_its_utc_time(home: Path, capsys: pytest.CaptureFixture) -> None:
    """A second score for a submission is appended, never written over the first."""
    submit.append_log("d", row("s0", 0.80))
    submit.append_log("d", row("s1", 0.82))
    assert cli.main(["submit", "--data", "d", "--name", "s0", "--score", "0.81"]) == 0
    assert cli.main(["submit", "--data", "d", "--name", "s0", "--score", "0.812"]) == 0
    hist = pd.read_csv(submit.lb_path("d"), dtype=str, keep_default_na=False)
    assert hist["name"].tolist() == ["s0", "s0"] and hist["lb"].tolist() == ["0.81", "0.812"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", t) for t in hist["time"])
    assert submit.read_log("d")["lb"].tolist() == ["0.812", ""]  # the log shows the latest
    table = submit.log_table("d").set_index("name")
    assert table.loc["s0", "lb"] == 0.812 and table.loc["s0", "lb_n"] == 2
    assert table.loc["s1", "lb_n"] == 0 and table.loc["s0", "metric"] == "samples"
    capsys.readouterr()
    assert cli.main(["submit", "--data", "d", "--show"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert {"metric", "lb", "lb_n", "lb_time", "gap"} <= set(header)


def test_an_lb_already_in_an_old_log_joins_the_history(home: Path) -> None:
    submit.append_log("d", row("s0", 0.80) | {"lb": "0.79"})
    submit.record_lb("d", "s0", 0.8)
    hist = submit.read_lb("d")
    assert hist["lb"].tolist() == ["0.79", "0.8"] and hist["time"][0] == ""


def test_lb_scores_outside_the_metric_range_are_refused(home: Path, capsys: pytest.CaptureFixture) -> None:
    submit.append_log("d", row("s0", 0.80))
    with pytest.raises(UserError, match=r"samples.*\[0, 1\].*percentage.*LB=0\.812"):
        submit.record_lb("d", "s0", 81.2)
    for bad, why in (("-0.1", "[0, 1]"), ("nan", "not a number"), ("abc", "not a number"),
                     ("81,2", "decimal point")):
        assert cli.main(["submit", "--data", "d", "--name", "s0", "--score", bad]) == 2, bad
        assert why in capsys.readouterr().err, bad
    assert not submit.lb_path("d").exists() and submit.read_log("d")["lb"].tolist() == [""]


def test_make_submit_says_what_is_missing_in_make_terms(home: Path) -> None:
    """No argparse 'expected one argument' or float error for a make user who forgot LB=."""
    repo = Path(__file__).resolve().parents[1]
    submit.append_log("d", row("s0", 0.80))

    def make(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-s", "-C", str(repo), "-o", ".venv/.stamp", "submit", "DATA=d",
                               f"PY={sys.executable}", *args], capture_output=True, text=True,
                              env={**os.environ, "MMFOLD_HOME": str(home)}, timeout=120)

    for args in ([], ["NAME=s0"], ["LB=0.8"]):
        r = make(*args)
        assert r.returncode != 0, args
        assert "make submit DATA=d NAME=<submission> LB=<score>" in r.stderr, (args, r.stderr)
        assert "usage:" not in r.stderr and "argument" not in r.stderr, r.stderr
    r = make("NAME=s0", "LB=81.2")
    assert r.returncode != 0 and "percentage" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = make("NAME=s0", "LB=0.812")
    assert r.returncode == 0 and "recorded LB 0.812 for s0" in r.stdout, r.stderr
    assert submit.read_lb("d")["lb"].tolist() == ["0.812"]


# ---- the sample submission shapes the file ------------------------------------------------------


def write_sample(home: Path, text: str, name: str = "sample.csv") -> str:
    (home / "input/d").mkdir(parents=True, exist_ok=True)
    (home / "input/d" / name).write_text(text)
    return name


def test_sample_submission_sets_columns_and_row_order(home: Path) -> None:
    c = comp(sample=write_sample(home, "Id,Predicted\nc.jpg,0\na.jpg,0\nb.jpg,0\n"))
    fmt = submit.submission_format(c)
    assert fmt.columns == ["Id", "Predicted"] and fmt.ids == ["c.jpg", "a.jpg", "b.jpg"]
    df = submit.submission_frame(c, PRED, CLASSES)
    assert list(df.columns) == ["Id", "Predicted"]
    assert df.values.tolist() == [["c.jpg", "cat dog 10"], ["a.jpg", "cat 10"], ["b.jpg", "dog"]]
    submit.validate_submission(df, c, CLASSES)
    with pytest.raises(SubmissionError, match="sample submission order"):
        submit.validate_submission(df.iloc[[1, 0, 2]], c, CLASSES)
    with pytest.raises(SubmissionError, match=r"columns \['ImageID', 'Labels'\] != \['Id', 'Predicted'\]"):
        submit.validate_submission(submit.submission_frame(comp(), PRED, CLASSES), c, CLASSES)


def test_sample_submission_columns_named_as_in_the_config_keep_their_order(home: Path) -> None:
    c = comp(sample=write_sample(home, "Labels,ImageID\n"))  # header only: test.csv order
    df = submit.submission_frame(c, PRED, CLASSES)
    assert list(df.columns) == ["Labels", "ImageID"] and df["ImageID"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    submit.validate_submission(df, c, CLASSES)


@pytest.mark.parametrize("text, match", [
    (None, r"data.sample_submission: .*input/d/sample.csv not found"),
    ("Id\na.jpg\n", "1 column"),
    ("Id,A,B\na.jpg,1,2\n", "3 columns"),
    ("Id,Predicted\na.jpg,0\na.jpg,0\nb.jpg,0\n", r"duplicated.*'a.jpg'.*missing.*'c.jpg'"),
    ("Id,Predicted\na.jpg,0\nb.jpg,0\nz.jpg,0\n", r"first column 'Id'.*'z.jpg'.*'c.jpg'"),
])
def test_a_sample_submission_that_cannot_be_followed_is_refused(home: Path, text: str | None, match: str) -> None:
    name = write_sample(home, text) if text is not None else "sample.csv"
    with pytest.raises(UserError, match=match):
        submit.submission_format(comp(sample=name))


def test_a_sample_of_another_test_set_says_where_the_right_one_goes(home: Path) -> None:
    """Stage 2 (issue 23): a sample submission listing other ids is refused with the two ways
    to give the right one: beside the test file (``TEST=`` takes it), or named in ``ARGS=``."""
    c = comp(sample=write_sample(home, "Id,Predicted\na.jpg,0\nb.jpg,0\nz.jpg,0\n"))
    with pytest.raises(UserError) as e:
        submit.submission_format(c)
    msg = str(e.value)
    assert "beside its test file" in msg and "ARGS='data.sample_submission=<path>'" in msg
    assert "input/d/test.csv" in msg  # which test file it was checked against


def test_no_log_yet_names_the_blend_command_for_the_data_given(home: Path) -> None:
    """The hint is built by mmfold.hints: it names ``DATA=``, so it does not run on the demo."""
    with pytest.raises(UserError, match=r"run `make blend DATA=d`"):
        submit.read_log("d")
