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
from mmfold.train.canonical import canonical_batches, is_filler, padded_length
from mmfold.train.infer import predict_fold
from mmfold.train.loop import train_fold
from tests.conftest import write_competition
from tests.tiny import make_tiny_bert, tiny_params

N_TRAIN, N_TEST = 36, 10
SPLIT = {"backbone": "test_efficientnet", "train_blocks": 2, "train_layers": 1}


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
