"""A new test set predicted from saved fold models, nothing retrained (``mmfold predict``),
a logged blend re-submitted on it (``blend --from``), and an offline bundle (``mmfold export``).

The promise users rely on: a test row gets exactly the probability the training run gave it,
whatever other rows the new test set holds; rows never seen get what the fold's model says
(checked exactly, by making them copies of the fold's validation rows, whose out-of-fold
probabilities the training run wrote); the train side is never touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmfold.config import Config, load_config
from mmfold.data.competition import load_competition
from mmfold.canonical import canonical_batches, is_filler, padded_length
from mmfold.train.infer import predict_fold
from mmfold.train.loop import train_fold
from tests.conftest import write_competition
from tests.tiny import make_tiny_bert, tiny_params

N_TRAIN, N_TEST = 36, 10
SPLIT = {"backbone": "test_efficientnet", "pretrained": False, "train_blocks": 2, "train_layers": 1}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny_bert")


def folds() -> np.ndarray:
    return np.arange(N_TRAIN) % 3


def new_test_set(data: Path, comp, valid_rows: np.ndarray, seed: int = 0) -> tuple[str, list[str]]:
    """``test2.csv``: a shuffled subset of the test rows plus new ids whose image and caption
    are copies of ``valid_rows`` of train; returns its name and the new ids (valid order)."""
    rng = np.random.default_rng(seed)
    old = comp.test.iloc[rng.permutation(len(comp.test))[: len(comp.test) * 2 // 3]]
    new_ids = [f"new_{comp.train['id'].iloc[r]}" for r in valid_rows]
    for r, nid in zip(valid_rows, new_ids):
        shutil.copy(comp.image_path(comp.train["id"].iloc[r]), data / "images" / nid)
    rows = [(i, c) for i, c in zip(old["id"], old["caption"])]
    rows += [(nid, comp.train["caption"].iloc[r]) for r, nid in zip(valid_rows, new_ids)]
    order = rng.permutation(len(rows))
    pd.DataFrame([rows[i] for i in order], columns=["ImageID", "Caption"]).to_csv(data / "test2.csv", index=False)
    return "test2.csv", new_ids


def tiny_cfg(kind: str, bert_dir: Path, **params: object) -> Config:
    cfg = load_config("tiny", None, ["train.epochs=2", "train.threads=1", "train.batch_size=8",
                                     "train.image_size=32", "train.progress=false", "train.lr=0.01",
                                     "train.tta=true", "train.ema=0.9"])
    model_kind = "hybrid" if kind == "cnn_lstm" else kind
    cfg.model.kind, cfg.model.name = model_kind, f"m_{kind}"
    cfg.model.params = {**tiny_params(kind, bert_dir), **params}
    return cfg


KINDS = [("image", {}), ("text", {}), ("lstm_text", {}), ("fusion", {}), ("hybrid", {}), ("cnn_lstm", {}),
         ("fusion", SPLIT)]


@pytest.mark.parametrize("kind, params", KINDS, ids=[k + ("_prefix" if p else "") for k, p in KINDS])
def test_a_saved_fold_predicts_a_new_test_set_exactly(project: Path, bert_dir: Path, kind: str,
                                                      params: dict) -> None:
    data = write_competition(project, n_train=N_TRAIN, n_test=N_TEST, n_labels=4)
    comp = load_competition(load_config("tiny").data, use_saved=False)
    cfg = tiny_cfg(kind, bert_dir, **params)
    rd = project / "runs" / "f0"
    out = train_fold(cfg, comp, folds(), 0, rd)
    valid = np.flatnonzero(folds() == 0)
    name, new_ids = new_test_set(data, comp, valid)
    comp2 = load_competition(load_config("tiny", None, [f"data.test_csv={name}"]).data, use_saved=False)
    cfg.data = comp2.cfg
    before = {f.name: f.stat().st_mtime_ns for f in rd.iterdir()}
    got = pd.DataFrame(predict_fold(cfg, comp2, rd), index=comp2.test["id"])
    original = pd.DataFrame(out.test, index=comp.test["id"])
    kept = [i for i in comp2.test["id"] if i in original.index]
    assert len(kept) == N_TEST * 2 // 3
    np.testing.assert_array_equal(got.loc[kept].to_numpy(), original.loc[kept].to_numpy())
    np.testing.assert_array_equal(got.loc[new_ids].to_numpy(), out.oof)  # never-seen rows: the fold's model
    assert {f.name: f.stat().st_mtime_ns for f in rd.iterdir()} == before  # nothing in the run dir moved


def test_canonical_batches_cover_every_row_once_with_fixed_size() -> None:
    lengths = np.array([3, 17, 9, 1, 24, 8, 30, 16, 2])
    batches = canonical_batches(len(lengths), 4, lengths, width=24)
    assert all(len(b) == 4 for b in batches)
    real = np.concatenate([b[~is_filler(b)] for b in batches])
    assert sorted(real.tolist()) == list(range(len(lengths)))
    for b in batches:  # one padded length per batch
        assert len(set(padded_length(lengths[b], 24).tolist())) == 1
    assert padded_length(np.array([1, 8, 9, 23, 40]), 24).tolist() == [8, 8, 16, 24, 24]


# ---------------------------------------------------------------- the commands, on the demo

DEMO_MODELS = ["demo_image", "demo_text", "demo_fusion", "tfidf_lr", "id_knn"]  # three torch kinds, two CPU members


def _train_side(project: Path) -> dict[str, tuple[int, str]]:
    """(mtime, hash) of everything training and collect wrote (not the test predictions)."""
    from mmfold.artifacts.manifest import file_hash

    files = [f for f in (project / "runs").rglob("*") if f.is_file() and not f.name.startswith(("test", "."))]
    files += [f for f in (project / "oof").rglob("*") if f.is_file() and ".test." not in f.name
              and not f.name.startswith(".")]  # lock files are touched by design
    return {str(f): (f.stat().st_mtime_ns, file_hash(f)) for f in files}


def _demo_test2(project: Path) -> Path:
    """A shuffled subset of the demo's test rows plus new rows (copies of train rows)."""
    data = project / "input" / "demo"
    test, train = pd.read_csv(data / "test.csv", dtype=str), pd.read_csv(data / "train.csv", dtype=str)
    new = train.sample(8, random_state=2)[["ImageID", "Caption"]].copy()
    for old in new["ImageID"]:
        shutil.copy(data / "images" / old, data / "images" / f"new_{old}")
    new["ImageID"] = "new_" + new["ImageID"]
    out = pd.concat([test.sample(frac=0.6, random_state=1)[["ImageID", "Caption"]], new]).sample(frac=1, random_state=3)
    out.to_csv(data / "test2.csv", index=False)
    return data / "test2.csv"


def _run_bundle(bundle: Path, test: Path, out: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MMFOLD_HOME"}
    r = subprocess.run([sys.executable, str(bundle / "predict.py"), "--test", str(test), "--out", str(out)],
                       cwd=out.parent, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert str(bundle / "mmfold") in subprocess.run(  # the bundle's own copy of the package ran
        [sys.executable, "-c", "import mmfold; print(mmfold.__file__)"], cwd=bundle, env=env,
        capture_output=True, text=True).stdout


def test_predict_resubmit_and_export_on_the_demo(project: Path, demo_template: Path,
                                                 tmp_path_factory: pytest.TempPathFactory,
                                                 capsys: pytest.CaptureFixture) -> None:
    from mmfold import paths
    from mmfold.cli import main
    from tests.conftest import install_demo

    install_demo(project, demo_template)
    assert main(["train", "--model", ",".join(DEMO_MODELS), "train.epochs=1", "train.progress=false"]) == 0
    assert main(["blend", "--name", "b", "--models", *DEMO_MODELS, "blend.n_trials=4"]) == 0
    trained = _train_side(project)
    test2 = _demo_test2(project)

    assert main(["blend", "--name", "stale", "--test", str(test2)]) == 2  # members predicted another test set
    assert "make predict" in capsys.readouterr().err
    ghost = paths.oof_file("demo", "ghost")  # a collected old experiment whose folds are gone
    ghost.write_bytes(paths.oof_file("demo", "tfidf_lr").read_bytes())
    assert main(["predict", "--test", str(test2)]) == 0
    assert "skipped ghost" in capsys.readouterr().err  # by default: skipped, the rest predicted
    assert main(["predict", "--test", str(test2), "--model", "ghost"]) == 2  # named: refused
    ghost.unlink()
    assert _train_side(project) == trained  # OOF, done.json, checkpoints: untouched
    for m in DEMO_MODELS:
        for k in range(5):
            rd = paths.run_dir("demo", m, k)
            old = pd.read_parquet(rd / "test.parquet").set_index("id")
            (new_file,) = rd.glob("test-*.parquet")
            new = pd.read_parquet(new_file).set_index("id")
            both = new.index.intersection(old.index)
            assert len(both) == 18 and len(new) == 26
            pd.testing.assert_frame_equal(new.loc[both], old.loc[both])  # exactly the training run's
    assert main(["blend", "--from", "b", "--test", str(test2), "--name", "b2"]) == 0
    log = pd.read_csv(paths.submissions_dir("demo") / "log.csv", dtype=str, keep_default_na=False)
    row = log.set_index("name").loc["b2"]
    assert row["from"] == "b" and row["cv_mean"] == log.set_index("name").loc["b", "cv_mean"]

    assert main(["export", "--name", "b", "--out", str(project / "bundle")]) == 0
    assert "MB" in capsys.readouterr().out
    fresh = tmp_path_factory.mktemp("elsewhere")
    bundle = Path(shutil.move(str(project / "bundle"), fresh / "bundle"))
    _run_bundle(bundle, project / "input" / "demo" / "test.csv", fresh / "sub.csv")
    assert (fresh / "sub.csv").read_bytes() == (paths.submissions_dir("demo") / "b.csv").read_bytes()
    _run_bundle(bundle, test2, fresh / "sub2.csv")
    assert (fresh / "sub2.csv").read_bytes() == (paths.submissions_dir("demo") / "b2.csv").read_bytes()

    member = paths.run_dir("demo", "tfidf_lr", 2) / "member.skops"  # a fold that cannot predict
    member.rename(member.with_suffix(".away"))
    assert main(["export", "--name", "b", "--out", str(project / "bundle2")]) == 2
    assert "retrain" in capsys.readouterr().err and not (project / "bundle2").exists()  # refused up front
    member.with_suffix(".away").rename(member)

    train_csv = project / "input" / "demo" / "train.csv"
    train_csv.write_text(train_csv.read_text().replace("a ", "an ", 1))
    assert main(["predict", "--test", str(test2)]) == 2
    assert "the train file changed" in capsys.readouterr().err
    assert _train_side(project) == trained


def test_bench_predict_on_the_demo_leaves_the_project_alone(project: Path, demo_template: Path) -> None:
    """``bench-predict`` blends, predicts a reversed test set, exports and runs the bundle in
    a scratch project: rows as trained, bundle identical, the user's files untouched."""
    import json

    from mmfold.cli import main
    from tests.conftest import install_demo

    install_demo(project, demo_template)
    models = ["tfidf_lr", "demo_text"]
    assert main(["train", "--model", ",".join(models), "train.epochs=1", "train.progress=false"]) == 0
    snapshot = lambda: {str(f): f.stat().st_mtime_ns for f in project.rglob("*")  # noqa: E731
                        if f.is_file() and "bench" not in f.parts}
    before = snapshot()
    assert main(["bench-predict", "--data", "demo", "--models", *models, "--trials", "3"]) == 0
    doc = json.loads((project / "reports" / "bench" / "predict.json").read_text())
    assert [r["model"] for r in doc["models"]] == models and doc["test_rows"] > 0
    assert doc["every_row_as_trained"] and doc["bundle_submission_identical"]
    assert all(r["retrain_s"] > 0 and r["predict_s"] > 0 for r in doc["models"])
    assert snapshot() == before  # not a file of the user's project written, touched or added


def test_fingerprints_from_before_the_train_test_split_still_check_the_train_side() -> None:
    """Old artifacts saved ``data`` = train hash + test hash: an unchanged train file is not
    reported as changed after an upgrade, a changed one still is."""
    from mmfold.artifacts.manifest import stale

    current = {"folds": "f", "labels": "l", "train": "a" * 16}
    assert stale({"folds": "f", "labels": "l", "data": "a" * 16 + "b" * 16}, current) == []
    assert stale({"folds": "f", "labels": "l", "data": "c" * 16 + "b" * 16}, current) == ["train"]
    assert stale({"folds": "f", "labels": "l"}, current) == ["train"]
