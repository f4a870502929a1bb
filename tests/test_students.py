"""Student members (distillation, pseudo-labelling): the student of fold k learns from nothing
that saw fold k's labels, its targets are what the docs say, and it behaves like any member
(out-of-fold once per id, a new test set predicted from its saved model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mmfold import paths
from mmfold.cli import main
from mmfold.config import load_config
from mmfold.data.competition import load_competition, load_folds
from mmfold.errors import UserError
from mmfold.train import students

TEACHER = {"model": {"kind": "tfidf_linear", "params": {"min_df": 1}}}
BASE = {"model": {"kind": "tfidf_linear", "params": {"min_df": 1, "head": "mlp",
                                                      "head_params": {"epochs": 3, "hidden": 8}}}}


def _write(project: Path, name: str, body: dict) -> None:
    (project / "configs" / "models" / f"{name}.yaml").write_text(yaml.safe_dump(body))


def _student(project: Path, name: str = "stud", **params) -> None:
    _write(project, name, {"model": {"kind": "student", "params": {"base": "t_base", "teachers": ["t_lr"], **params}}})


@pytest.fixture
def taught(tiny: Path, project: Path) -> Path:
    """The tiny competition with folds, a trained logistic teacher, and the student's base."""
    _write(project, "t_lr", TEACHER)
    _write(project, "t_base", BASE)
    assert main(["folds", "--data", "tiny"]) == 0
    assert main(["train", "--data", "tiny", "--model", "t_lr"]) == 0
    return project


def _setup(project: Path, name: str = "stud"):
    cfg = load_config("tiny", name)
    comp = load_competition(cfg.data)
    return cfg, comp, load_folds(comp)


def test_no_teacher_fit_behind_fold_k_saw_fold_k(taught: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leak detector: every teacher refit feeding the student of fold k was fitted on rows
    outside fold k (and outside the fold of the rows it labels)."""
    _student(taught, distill=0.5)
    cfg, comp, folds = _setup(taught)
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real = students.fit_member_fold

    def spy(tcfg, c, fit_rows, scored, *a, **k):
        seen.append((np.asarray(fit_rows), np.asarray(scored)))
        return real(tcfg, c, fit_rows, scored, *a, **k)

    monkeypatch.setattr(students, "fit_member_fold", spy)
    for k in np.unique(folds):
        seen.clear()
        students.training_targets(cfg, comp, folds, int(k))
        for fit_rows, scored in seen:  # fresh fits, or the cache written by a fit of the pair
            assert not np.isin(fit_rows, np.flatnonzero(folds == k)).any()
            assert k in set(folds[scored])  # a pair fit (j, k) scores fold j for this student
    cached = sorted((taught / "runs" / "tiny" / "stud" / "inner").glob("t_lr-*.npz"))
    assert len(cached) == 3  # K(K-1)/2 pairs for K=3, each fitted once
    for f in cached:
        a, b = map(int, f.stem.split("-")[-2:])
        with np.load(f) as z:
            assert set(np.unique(folds[z["fit_rows"]])).isdisjoint({a, b})
            assert set(np.unique(folds[z["rows"]])) == {a, b}


def test_distilled_targets_mix_labels_and_inner_teacher_probabilities(taught: Path) -> None:
    _student(taught, distill=0.25)
    cfg, comp, folds = _setup(taught)
    t = students.training_targets(cfg, comp, folds, 1)
    inner = students.inner_teacher_probs(cfg, comp, ["t_lr"], folds, 1)
    y = comp.y()[folds != 1]
    np.testing.assert_allclose(t.train, 0.75 * y + 0.25 * inner[folds != 1])
    assert t.test is None and not np.allclose(inner[folds != 1], y)


def test_pseudo_labels_of_fold_k_come_from_the_teachers_fold_k_models(taught: Path) -> None:
    _student(taught, distill=0.0, pseudo=True)
    cfg, comp, folds = _setup(taught)
    for k in range(3):
        want = pd.read_parquet(paths.run_dir("tiny", "t_lr", k) / "test.parquet").set_index("id")
        got = students.training_targets(cfg, comp, folds, k)
        np.testing.assert_allclose(got.test, want.loc[comp.ids("test"), list(comp.classes)].to_numpy())
        np.testing.assert_array_equal(got.train, comp.y()[folds != k])


def test_a_student_trains_predicts_once_per_id_and_predicts_a_new_test_set(taught: Path) -> None:
    _student(taught, distill=0.5, pseudo=True)
    assert main(["train", "--data", "tiny", "--model", "stud"]) == 0
    oof = pd.read_parquet(paths.oof_file("tiny", "stud"))
    comp = load_competition(load_config("tiny").data)
    assert sorted(oof["id"]) == sorted(comp.ids("train"))
    trained = pd.read_parquet(paths.oof_dir("tiny") / "stud.test.parquet").set_index("id")
    pd.read_csv(taught / "input" / "tiny" / "test.csv").iloc[::-1].to_csv(taught / "new.csv", index=False)
    assert main(["predict", "--data", "tiny", "--model", "stud", "--test", str(taught / "new.csv")]) == 0
    new = pd.read_parquet(paths.oof_dir("tiny") / "stud.test.parquet").set_index("id")
    pd.testing.assert_frame_equal(new.loc[trained.index], trained)


def test_students_that_cannot_be_taught_are_refused(taught: Path, capsys: pytest.CaptureFixture) -> None:
    _write(taught, "t_lr_base", TEACHER)
    _student(taught, "s1", base="t_lr_base")  # a logistic head needs 0/1 labels
    assert main(["train", "--data", "tiny", "--model", "s1"]) != 0
    assert "needs head: mlp" in capsys.readouterr().err
    _write(taught, "t_torch", {"model": {"kind": "text", "params": {}}})
    _student(taught, "s2", teachers=["t_torch"])
    cfg, comp, folds = _setup(taught, "s2")
    with pytest.raises(UserError, match="only CPU members"):
        students.training_targets(cfg, comp, folds, 0)
    _student(taught, "s3", teachers=["nobody_trained"], distill=0.0, pseudo=True)
    _write(taught, "nobody_trained", TEACHER)
    cfg, comp, folds = _setup(taught, "s3")
    with pytest.raises(UserError, match="train it first"):
        students.training_targets(cfg, comp, folds, 0)
    assert not paths.run_dir("tiny", "s1", 0).exists() or not (paths.run_dir("tiny", "s1", 0) / "done.json").exists()


def test_torch_pseudo_teachers_and_two_fold_distillation_are_refused(taught: Path) -> None:
    _write(taught, "t_torch", {"model": {"kind": "text", "params": {}}})
    _student(taught, "s4", teachers=["t_lr"], pseudo_teachers=["t_torch"], distill=0.0, pseudo=True)
    cfg, comp, folds = _setup(taught, "s4")
    with pytest.raises(UserError, match="chosen by its fold's labels"):
        students.training_targets(cfg, comp, folds, 0)
    _student(taught, "s5", distill=0.5)
    cfg, comp, folds = _setup(taught, "s5")
    with pytest.raises(UserError, match="needs 3 folds or more"):
        students.training_targets(cfg, comp, np.where(folds == 2, 1, folds), 0)


def test_a_student_goes_stale_when_a_teacher_is_retrained_or_its_base_edited(
        taught: Path, capsys: pytest.CaptureFixture) -> None:
    """The student learned from t_lr's fold files and t_base's settings: retraining the
    teacher or editing the base makes it stale for blend and collect, named, until it is
    retrained; retraining the student alone is the fix."""
    _student(taught, distill=0.5, pseudo=True)
    assert main(["train", "--data", "tiny", "--model", "stud"]) == 0
    blend = ["blend", "--data", "tiny", "--models", "stud", "t_lr", "blend.n_trials=2"]
    assert main([*blend, "--name", "fresh"]) == 0
    assert main(["train", "--data", "tiny", "--model", "t_lr", "--force"]) == 0  # a retrained teacher
    capsys.readouterr()
    assert main([*blend, "--name", "after_teacher"]) == 2
    assert "model 'stud' is stale: t_lr (its base or teachers)" in capsys.readouterr().err
    assert main(["collect", "--data", "tiny", "--model", "stud"]) != 0
    assert "model 'stud' is stale: t_lr" in capsys.readouterr().err  # collect refuses it too
    assert main(["train", "--data", "tiny", "--model", "stud", "--force"]) == 0
    assert main([*blend, "--name", "retrained"]) == 0
    _write(taught, "t_base", {"model": {**BASE["model"], "params": {**BASE["model"]["params"],
                                                                     "head_params": {"epochs": 3, "hidden": 16}}}})
    capsys.readouterr()
    assert main([*blend, "--name", "after_base"]) == 2
    assert "model 'stud' is stale: t_base (its base or teachers)" in capsys.readouterr().err


def test_a_student_trained_fold_by_fold_is_checked_fold_by_fold(taught: Path, capsys: pytest.CaptureFixture) -> None:
    """Fold k learns from its pseudo-teacher's fold k only: training teacher and student one
    fold at a time collects; retraining one teacher fold makes the student stale; the
    teacher's backups or its deleted YAML are not changes to what the student learned from."""
    import shutil

    _student(taught, distill=0.0, pseudo=True)
    for k in range(3):
        assert main(["train", "--data", "tiny", "--model", "t_lr", "--fold", str(k), "--force"]) == 0
        assert main(["train", "--data", "tiny", "--model", "stud", "--fold", str(k)]) == 0
    blend = ["blend", "--data", "tiny", "--models", "stud", "blend.n_trials=2"]
    assert main([*blend, "--name", "a"]) == 0  # collected after its last fold, blendable
    for backup in (taught / "runs" / "tiny" / "t_lr").glob("fold*.bak-*"):
        shutil.rmtree(backup)
    (taught / "configs" / "models" / "t_lr.yaml").unlink()
    assert main([*blend, "--name", "b"]) == 0
    _write(taught, "t_lr", TEACHER)
    assert main(["train", "--data", "tiny", "--model", "t_lr", "--fold", "1", "--force"]) == 0
    capsys.readouterr()
    assert main([*blend, "--name", "c"]) == 2
    assert "model 'stud' is stale: t_lr (its base or teachers)" in capsys.readouterr().err
    assert main(["train", "--data", "tiny", "--model", "stud", "--fold", "1", "--force"]) == 0
    assert main([*blend, "--name", "d"]) == 0
