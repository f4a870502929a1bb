"""Stage 2 with its own sample submission (issue 23, item 8).

``make blend FROM=b1 TEST=stage2/test.csv`` failed on the first stage's
``sample_submission.csv`` (it lists the old ids). The sample submission beside the given test
file is taken instead; several candidates are a message naming the setting that picks one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import write_competition
from mmfold import paths
from mmfold.cli import main


@pytest.fixture
def blended(project: Path) -> Path:
    """The tiny competition with an ``Id,Predicted`` sample submission, one member, blend b1."""
    data = write_competition(project)
    test = pd.read_csv(data / "test.csv", dtype=str)
    pd.DataFrame({"Id": test["ImageID"][::-1], "Predicted": "1"}).to_csv(data / "sample_submission.csv", index=False)
    yml = project / "configs" / "data" / "tiny.yaml"
    doc = yaml.safe_load(yml.read_text())
    doc["data"]["sample_submission"] = "sample_submission.csv"
    yml.write_text(yaml.safe_dump(doc))
    assert main(["folds", "--data", "tiny"]) == 0
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr"]) == 0
    assert main(["blend", "--data", "tiny", "--models", "tfidf_lr", "--name", "b1", "blend.n_trials=2"]) == 0
    return data


def _stage2(data: Path) -> tuple[Path, list[str]]:
    """``stage2/test.csv``: half the old test rows and three new ones, with its own sample."""
    test, train = pd.read_csv(data / "test.csv", dtype=str), pd.read_csv(data / "train.csv", dtype=str)
    new = train.head(3)[["ImageID", "Caption"]].assign(ImageID=lambda d: "s2_" + d["ImageID"])
    for i in train.head(3)["ImageID"]:
        shutil.copy(data / "images" / i, data / "images" / f"s2_{i}")
    rows = pd.concat([test.head(5)[["ImageID", "Caption"]], new])
    (data / "stage2").mkdir()
    rows.to_csv(data / "stage2" / "test.csv", index=False)
    order = rows["ImageID"].tolist()[::-1]
    pd.DataFrame({"Id": order, "Predicted": "1"}).to_csv(data / "stage2" / "sample_submission.csv", index=False)
    return data / "stage2" / "test.csv", order


def test_stage_two_takes_the_sample_submission_beside_its_test_file(blended: Path, capsys) -> None:
    test2, order = _stage2(blended)
    assert main(["predict", "--data", "tiny", "--test", str(test2)]) == 0
    assert main(["blend", "--data", "tiny", "--from", "b1", "--test", str(test2), "--name", "b1s2"]) == 0
    sub = pd.read_csv(paths.submissions_dir("tiny") / "b1s2.csv", dtype=str)
    assert list(sub.columns) == ["Id", "Predicted"] and sub["Id"].tolist() == order
    assert "the sample submission for test.csv is" in capsys.readouterr().out


def test_two_candidate_samples_name_the_setting(blended: Path, capsys) -> None:
    test2, _ = _stage2(blended)
    shutil.copy(test2.with_name("sample_submission.csv"), test2.with_name("sample_submission_v2.csv"))
    assert main(["predict", "--data", "tiny", "--test", str(test2)]) == 2
    err = capsys.readouterr().err
    assert "several sample submissions" in err and "data.sample_submission=" in err
    chosen = test2.with_name("sample_submission_v2.csv")
    assert main(["predict", "--data", "tiny", "--test", str(test2), f"data.sample_submission={chosen}"]) == 0
