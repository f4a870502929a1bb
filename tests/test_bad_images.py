"""Bad images and empty captions in a user's own data: every bad image in one error, nothing
written by ``predict`` when the test set has one, empty captions warned.

The promises users rely on (README, "bad images"): one fix-and-rerun suffices, because the
error names every missing, empty or undecodable file at once; and a test set with a bad image
changes no model's test predictions, so the members of a blend never point at different test
sets.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest

from mmfold.cli import main
from mmfold.config import load_config
from mmfold.data.competition import load_competition

DEMO = Path("input") / "demo"


def _copy_demo(project: Path, template: Path) -> Path:
    """The small demo's data in ``project`` (no folds yet); returns its data folder."""
    shutil.copytree(template / "input", project / "input")
    return project / DEMO


def _truncate(path: Path) -> None:
    """Keep the first half of an image: its header still parses, its pixels do not decode."""
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _ids(data: Path, split: str) -> list[str]:
    return pd.read_csv(data / f"{split}.csv", dtype=str)["ImageID"].tolist()


# ------------------------------------------------------------------ folds: all bad images at once


def test_folds_lists_a_missing_and_a_truncated_image_in_one_error(
        project: Path, demo_template: Path, capsys: pytest.CaptureFixture) -> None:
    data = _copy_demo(project, demo_template)
    gone, cut, junk = _ids(data, "train")[:3]
    (data / "images" / gone).unlink()
    _truncate(data / "images" / cut)
    (data / "images" / junk).write_bytes(b"not an image at all")
    assert main(["folds"]) == 2
    err = capsys.readouterr().err
    assert "3 " in err and all(f"images/{name} (" in err for name in (gone, cut, junk)), err
    assert "missing" in err and "truncated" in err
    assert not (project / "folds" / "demo.csv").exists()


def test_folds_drops_and_lists_a_missing_and_a_truncated_image(project: Path, demo_template: Path) -> None:
    data = _copy_demo(project, demo_template)
    gone, cut = _ids(data, "train")[:2]
    (data / "images" / gone).unlink()
    _truncate(data / "images" / cut)
    with pytest.warns(UserWarning, match=r"dropped 2 train row\(s\)") as caught:
        assert main(["folds", "data.drop_bad_images=true"]) == 0
    dropped = next(str(w.message) for w in caught if "dropped" in str(w.message))
    assert f"images/{gone} (missing" in dropped and f"images/{cut} (" in dropped
    kept = pd.read_csv(project / "folds" / "demo.csv", dtype=str)["ImageID"]
    assert len(kept) == 148 and not {gone, cut} & set(kept)


# ------------------------------------------------------------ predict: validate first, write nothing


def _test_outputs(project: Path) -> dict[str, tuple[int, bytes]]:
    """(mtime, bytes) of every test prediction a model has: collected and per fold."""
    files = list((project / "oof" / "demo").glob("*test*")) + list((project / "runs").rglob("test*.parquet"))
    return {str(f): (f.stat().st_mtime_ns, f.read_bytes()) for f in files}


def test_predict_with_a_bad_test_image_writes_nothing_for_any_model(
        project: Path, demo_template: Path, capsys: pytest.CaptureFixture) -> None:
    data = _copy_demo(project, demo_template)
    assert main(["folds", "folds.n_splits=2"]) == 0
    models = "tfidf_lr,demo_image"  # a text-only member first: it reads no image
    assert main(["train", "--model", models, "train.epochs=1", "train.progress=false"]) == 0
    before = _test_outputs(project)
    assert any(".test." in f for f in before)
    cut, junk = _ids(data, "test")[:2]
    _truncate(data / "images" / cut)  # a re-issued test set: new bytes, so every fold predicts it
    (data / "images" / junk).write_bytes(b"not an image at all")
    capsys.readouterr()
    assert main(["predict", "--model", models]) == 2
    err = capsys.readouterr().err
    assert "2 bad test image(s)" in err and f"images/{cut} (" in err and f"images/{junk} (" in err, err
    assert "truncated" in err and "nothing was predicted or written" in err
    assert _test_outputs(project) == before  # no model's test file rewritten or added


# ---------------------------------------------------------------------- empty captions: warned


def test_empty_captions_are_warned_with_their_count_and_rows(tiny: Path) -> None:
    train = tiny / "train.csv"
    lines = train.read_text().splitlines()
    for row in (1, 4, 7):  # empty, spaces only, a lone quoted empty string
        ident, labels, _ = lines[row].split(",", 2)
        lines[row] = f"{ident},{labels}," + {1: "", 4: "   ", 7: '""'}[row]
    train.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"3 empty caption") as caught:
        load_competition(load_config("tiny").data, use_saved=False)
    msg = next(str(w.message) for w in caught if "empty caption" in str(w.message))
    assert "row 1 (id '0.jpg')" in msg and "row 4 (id '3.jpg')" in msg and "row 7 (id '6.jpg')" in msg
    assert "train.csv" in msg and "Caption" in msg


def test_full_captions_and_image_only_data_warn_nothing(tiny: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_competition(load_config("tiny").data, use_saved=False)
        load_competition(load_config("tiny", None, ["data.caption_col=null"]).data, use_saved=False)
