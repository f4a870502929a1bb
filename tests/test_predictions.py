"""The prediction-file contract (``mmfold.artifacts.predictions``) and the stages that read it.

One writer, one validated read: a fold file, a collected OOF or a test file that does not fit
the data (other label columns, ids or folds; NaN, inf or values outside [0, 1]) is refused by
name at every stage that reads it: collect, blend, sweep, report and ablate.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mmfold import paths
from mmfold.artifacts import predictions
from mmfold.artifacts.predictions import InvalidPredictions, MissingPredictions, PredictionError
from mmfold.cli import main
from mmfold.config import load_config
from mmfold.data.competition import load_competition, load_folds
from tests.conftest import write_competition

CLASSES = ["cat", "dog", "10"]
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mmfold"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """12 train ids in 3 folds, 4 test ids, fold files of model ``m`` written by the writer."""
    monkeypatch.setenv("MMFOLD_HOME", str(tmp_path))
    ids, test_ids = [f"im{i}" for i in range(12)], [f"t{i}" for i in range(4)]
    folds = np.arange(12) % 3
    rng = np.random.default_rng(0)
    oof, test = rng.random((12, 3)), rng.random((3, 4, 3))
    for k in range(3):
        rd, rows = paths.run_dir("d", "m", k), np.flatnonzero(folds == k)
        predictions.write_fold_oof(rd, [ids[i] for i in rows[::-1]], oof[rows[::-1]], CLASSES, k, f"m fold {k}")
        predictions.write_fold_test(rd, test_ids, test[k], CLASSES, f"m fold {k} test")
    return SimpleNamespace(ids=ids, test_ids=test_ids, folds=folds, oof=oof, test=test)


def fold0(h: SimpleNamespace) -> Path:
    return predictions.fold_file(paths.run_dir("d", "m", 0), "oof")


# ---- writer --------------------------------------------------------------------------------


def test_the_writer_keeps_the_documented_layout(home: SimpleNamespace) -> None:
    df = pd.read_parquet(fold0(home))
    assert list(df.columns) == ["id", "fold", *CLASSES]
    assert df["fold"].dtype == np.int64 and all(df[c].dtype == np.float32 for c in CLASSES)
    test = pd.read_parquet(predictions.fold_file(paths.run_dir("d", "m", 0), "test"))
    assert list(test.columns) == ["id", *CLASSES] and test["id"].tolist() == home.test_ids


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1.5, -0.1])
def test_the_writer_refuses_what_is_not_a_probability(tmp_path: Path, bad: float) -> None:
    probs = np.full((2, 3), 0.5)
    probs[1, 2] = bad
    with pytest.raises(InvalidPredictions, match="finite and in \\[0, 1\\]"):
        predictions.write_fold_oof(tmp_path, ["a", "b"], probs, CLASSES, 0, "m fold 0 OOF")
    with pytest.raises(RuntimeError, match=r"m fold 0 OOF: shape \(2, 3\), expected \(3, 3\)"):
        predictions.write_fold_oof(tmp_path, ["a", "b", "c"], np.full((2, 3), 0.5), CLASSES, 0, "m fold 0 OOF")
    assert not list(tmp_path.iterdir())  # nothing written


# ---- the one validated read ----------------------------------------------------------------


def test_fold_files_are_read_back_in_train_order(home: SimpleNamespace) -> None:
    got = predictions.read_fold_oofs("d", "m", home.ids, CLASSES, home.folds)
    np.testing.assert_array_equal(got, home.oof.astype(np.float32))
    some = predictions.read_fold_oofs("d", "m", home.ids, CLASSES, home.folds, folds=[2, 0])
    np.testing.assert_array_equal(some, home.oof.astype(np.float32)[home.folds != 1])
    mean = predictions.mean_fold_tests("d", "m", home.test_ids, CLASSES, _test_files(3))
    np.testing.assert_array_equal(mean, np.mean(home.test.astype(np.float32).astype(np.float64), axis=0))


def _test_files(n: int) -> list[Path]:
    return [predictions.fold_file(paths.run_dir("d", "m", k), "test") for k in range(n)]


def _corrupt(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    df = pd.read_parquet(path)
    change(df)
    df.to_parquet(path, index=False)


@pytest.mark.parametrize("change, message", [
    (lambda df: df.rename(columns={"dog": "wolf"}, inplace=True), r"missing \['dog'\], unexpected \['wolf'\]"),
    (lambda df: df.drop(columns="fold", inplace=True), r"missing \['fold'\]"),
    (lambda df: df.loc.__setitem__((1, "id"), df.loc[0, "id"]), r"duplicated ids, first: 'im"),
    (lambda df: df.loc.__setitem__((1, "id"), "im1"), r"1 missing \(first: 'im\d+'\), 1 unexpected \(first: 'im1'\).*FOLD=0"),
    (lambda df: df.loc.__setitem__((1, "fold"), 2), r"folds differ from .*d\.csv for 1 ids"),
    (lambda df: df.loc.__setitem__((1, "cat"), np.nan), r"1 NaN/inf probabilities"),
    (lambda df: df.loc.__setitem__((1, "cat"), 3.0), r"outside \[0, 1\].*logits"),
])
def test_a_bad_fold_file_is_refused_by_name(home: SimpleNamespace, change, message: str) -> None:  # type: ignore[no-untyped-def]
    _corrupt(fold0(home), change)
    with pytest.raises(PredictionError, match=rf"m fold 0 \(.*fold0.*oof\.parquet\).*{message}"):
        predictions.read_fold_oofs("d", "m", home.ids, CLASSES, home.folds)


def test_a_bad_or_missing_test_file_is_refused(home: SimpleNamespace) -> None:
    test1 = predictions.fold_file(paths.run_dir("d", "m", 1), "test")
    _corrupt(test1, lambda df: df.drop(index=3, inplace=True))
    with pytest.raises(PredictionError, match=r"m fold 1 .*ids do not match the test set: 1 missing \(first: 't3'\)"):
        predictions.mean_fold_tests("d", "m", home.test_ids, CLASSES, _test_files(3))
    test1.unlink()
    assert predictions.mean_fold_tests("d", "m", home.test_ids, CLASSES, _test_files(3)) is None
    with pytest.raises(MissingPredictions, match=r"model 'x'.*not found; collected models: \[\]"):
        predictions.read_test("d", "x", home.test_ids, CLASSES)


def test_no_stage_reads_or_writes_a_parquet_file_by_hand() -> None:
    """Every parquet read is predictions.py's (fileio's atomic writer is the one write)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("read_parquet", "to_parquet", "write_parquet"):
                found.append(f"{path.relative_to(PACKAGE)}:{node.attr}")
    assert sorted(found) == ["artifacts/predictions.py:read_parquet", "artifacts/predictions.py:write_parquet",
                             "artifacts/predictions.py:write_parquet", "fileio.py:to_parquet"]


# ---- every stage reads through it -----------------------------------------------------------


@pytest.fixture
def trained(project: Path) -> SimpleNamespace:
    """The tiny competition, tfidf_lr trained on its 3 folds and collected."""
    write_competition(project)
    assert main(["folds", "--data", "tiny"]) == 0
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr"]) == 0
    cfg = load_config("tiny", "tfidf_lr")
    comp = load_competition(cfg.data)
    return SimpleNamespace(cfg=cfg, comp=comp, folds=load_folds(comp))


def test_collect_refuses_a_fold_file_with_nan(trained: SimpleNamespace, capsys: pytest.CaptureFixture) -> None:
    before = paths.oof_file("tiny", "tfidf_lr").read_bytes()
    _corrupt(predictions.fold_file(paths.run_dir("tiny", "tfidf_lr", 1), "oof"),
             lambda df: df.loc.__setitem__((0, "2"), np.nan))
    capsys.readouterr()
    assert main(["collect", "--data", "tiny", "--model", "tfidf_lr"]) == 2
    err = capsys.readouterr().err
    assert "tfidf_lr fold 1" in err and "NaN" in err
    assert paths.oof_file("tiny", "tfidf_lr").read_bytes() == before  # the good OOF is kept


def test_the_report_refuses_a_collected_oof_with_other_folds(trained: SimpleNamespace,
                                                             capsys: pytest.CaptureFixture) -> None:
    _corrupt(paths.oof_file("tiny", "tfidf_lr"), lambda df: df.__setitem__("fold", (df["fold"] + 1) % 3))
    capsys.readouterr()
    assert main(["report", "--data", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "model 'tfidf_lr'" in err and "folds differ" in err


def test_the_sweep_reads_fold_files_through_the_contract(trained: SimpleNamespace) -> None:
    from mmfold.studies.sweep import fold_probs, honest_score

    probs = fold_probs(trained.cfg, trained.comp, trained.folds, [0, 2])
    want = pd.read_parquet(paths.oof_file("tiny", "tfidf_lr"))[trained.comp.classes].to_numpy(np.float64)
    np.testing.assert_array_equal(probs, want[np.isin(trained.folds, [0, 2])])
    _corrupt(predictions.fold_file(paths.run_dir("tiny", "tfidf_lr", 2), "oof"),
             lambda df: df.rename(columns={"1": "one"}, inplace=True))
    with pytest.raises(PredictionError, match=r"tfidf_lr fold 2 .*missing \['1'\], unexpected \['one'\]"):
        honest_score(trained.cfg, trained.comp, trained.folds, [0, 2])


def test_ablate_notes_a_collected_model_it_cannot_read(trained: SimpleNamespace) -> None:
    from mmfold.studies.ablate import Ablation, Variant, _run
    from mmfold.studies.sweep import Competitions

    comps = Competitions()
    ab = Ablation("tiny", "tfidf_lr", trained.cfg, [0, 1, 2], [], comps, trained.folds,
                  rows=np.arange(len(trained.folds)))
    ab.base_prob = predictions.read_oof("tiny", "tfidf_lr", trained.comp.ids("train"), trained.comp.classes,
                                        trained.folds)
    ok = _run(ab, Variant("again", computed="model", options={"model": "tfidf_lr"}))
    assert ok.scores is not None and not ok.note.startswith("failed")
    _corrupt(paths.oof_file("tiny", "tfidf_lr"), lambda df: df.loc.__setitem__((0, "1"), 2.0))
    bad = _run(ab, Variant("again", computed="model", options={"model": "tfidf_lr"}))
    assert bad.scores is None and "failed" in bad.note and "outside [0, 1]" in bad.note
