"""Folds: every id once, stratified, written once, groups kept together, rare labels named."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmfold.cli import main
from mmfold.config import FoldsConfig
from mmfold.data.folds import assign_folds, fold_summary
from tests.conftest import write_competition


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_every_row_in_exactly_one_fold_and_rates_stratified() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((3000, 12)) < np.linspace(0.02, 0.5, 12)).astype(np.uint8)
    fold = assign_folds(y, FoldsConfig(n_splits=5, seed=1))
    assert fold.shape == (3000,) and set(fold) == set(range(5))
    assert np.bincount(fold).min() >= 580  # sizes balanced
    glob = y.mean(0)
    for k in range(5):  # iterstrat's own test style: each label's rate per fold near global
        assert np.abs(y[fold == k].mean(0) - glob).max() < 0.02
    _, worst, _ = fold_summary(y, fold, [str(i) for i in range(12)])
    assert worst < 0.02


def test_same_seed_same_folds_other_seed_differs() -> None:
    y = (np.random.default_rng(0).random((500, 5)) < 0.3).astype(np.uint8)
    a, b = assign_folds(y, FoldsConfig(seed=3)), assign_folds(y, FoldsConfig(seed=3))
    assert (a == b).all() and (a != assign_folds(y, FoldsConfig(seed=4))).any()


def test_groups_never_straddle_folds() -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 80, 400)
    y = (rng.random((400, 4)) < 0.3).astype(np.uint8)
    fold = assign_folds(y, FoldsConfig(n_splits=4), groups)
    assert pd.Series(fold).groupby(groups).nunique().max() == 1


def test_cli_writes_once_refuses_rewrite_and_backs_up_when_forced(tiny: Path, project: Path, capsys) -> None:
    assert main(["folds", "--data", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "worst per-label rate deviation" in out and "wrote" in out
    path = project / "folds" / "tiny.csv"
    df = pd.read_csv(path, dtype={"ImageID": str})
    assert sorted(df["ImageID"]) == sorted(f"{i}.jpg" for i in range(40)) and df["ImageID"].is_unique
    before = _sha(path)
    assert main(["folds", "--data", "tiny"]) == 2
    assert "written once" in capsys.readouterr().err
    assert _sha(path) == before
    assert main(["folds", "--data", "tiny", "--force", "folds.seed=7"]) == 0
    backups = list((project / "folds").glob("tiny.csv.*.bak"))
    assert len(backups) == 1 and _sha(backups[0]) == before
    assert (project / "folds" / "tiny.labels.json").exists()


def test_rare_label_warning_names_it(project: Path) -> None:
    data = write_competition(project, "rare", n_train=30)
    lines = (data / "train.csv").read_text().splitlines()
    lines[1] = lines[1].split(",")[0] + ",1 77," + lines[1].split(",", 2)[2]
    (data / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"label 77 \(1\) has fewer positives than 3 folds"):
        assert main(["folds", "--data", "rare"]) == 0


def test_make_style_exit_code_and_message(tiny: Path, project: Path) -> None:
    cmd = [sys.executable, "-m", "mmfold", "folds", "--data", "tiny"]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert second.returncode != 0 and "FORCE=1" in second.stderr and "Traceback" not in second.stderr


def test_misspelt_group_col_lists_the_columns(project: Path, capsys) -> None:
    data = write_competition(project, "grp", n_train=30)
    lines = (data / "train.csv").read_text().splitlines()
    head, rows = lines[0], lines[1:]
    a, b, c = head.split(",")
    (data / "train.csv").write_text("\n".join([f"{a},{b},Group,{c}"] + [
        ",".join(r.split(",", 2)[:2] + [f"g{i % 7}", r.split(",", 2)[2]]) for i, r in enumerate(rows)]) + "\n")
    assert main(["folds", "--data", "grp", "folds.group_col=group"]) == 2
    err = capsys.readouterr().err
    assert "folds.group_col='group'" in err and "'Group'" in err and "Traceback" not in err
    assert "did you mean 'Group'" in err
    assert main(["folds", "--data", "grp", "folds.group_col=Group"]) == 0
    folds = pd.read_csv(project / "folds" / "grp.csv")
    groups = [f"g{i % 7}" for i in range(30)]
    assert pd.Series(folds["fold"].to_numpy()).groupby(groups).nunique().max() == 1
