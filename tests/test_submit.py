"""Submission validation and writing, the submissions log and ``mmfold lb``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mmfold import cli, submit
from mmfold.config import DataConfig
from mmfold.errors import UserError
from mmfold.submit import SubmissionError

CLASSES = ["cat", "dog", "10"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MMFOLD_HOME", str(tmp_path))
    return tmp_path


def comp(allow_empty: bool = False, sep: str = " ") -> SimpleNamespace:
    cfg = DataConfig(name="d", id_col="ImageID", label_col="Labels", label_sep=sep,
                     allow_empty_labels=allow_empty)
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
    return {"name": name, "time": "t", "models": "a b", "method": "optuna",
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
    assert cli.main(["lb", "--data", "d", "--name", "s0", "--score", "0.79"]) == 0
    assert cli.main(["lb", "--data", "d", "--name", "s2", "--score", "0.84"]) == 0
    log = submit.read_log("d")
    assert log["lb"].tolist() == ["0.79", "", "0.84"]
    assert log["name"].tolist() == ["s0", "s1", "s2"]
    table = submit.log_table("d")
    assert table["name"].tolist() == ["s2", "s0", "s1"]  # scored by LB first, then by CV
    assert table["gap"][0] == pytest.approx(0.02) and np.isnan(table["gap"][2])
    capsys.readouterr()
    assert cli.main(["lb", "--data", "d", "--show"]) == 0
    assert "gap" in capsys.readouterr().out


def test_lb_for_an_unknown_submission_is_an_error(home: Path) -> None:
    submit.append_log("d", row("s0", 0.8))
    with pytest.raises(UserError, match="no submission named 'nope'"):
        submit.record_lb("d", "nope", 0.5)
    assert cli.main(["lb", "--data", "d", "--score", "0.5"]) == 2  # --score without --name


def test_git_commit_outside_a_repository_is_unknown(home: Path) -> None:
    assert submit.git_commit() == "unknown"
