"""The demo competition: deterministic bytes, a real (imbalanced, multi-label) problem."""

import hashlib
from pathlib import Path

import pandas as pd

from mmfold.data.demo import LABELS, make_demo


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    make_demo(tmp_path / "a", n_train=60, n_test=20, seed=0)
    make_demo(tmp_path / "b", n_train=60, n_test=20, seed=0)
    make_demo(tmp_path / "c", n_train=60, n_test=20, seed=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a")["train.csv"] != _digest(tmp_path / "c")["train.csv"]


def test_labels_are_multilabel_imbalanced_and_captions_partial(tmp_path: Path) -> None:
    make_demo(tmp_path, n_train=400, n_test=50, seed=0)
    train = pd.read_csv(tmp_path / "train.csv")
    test = pd.read_csv(tmp_path / "test.csv")
    assert list(test.columns) == ["ImageID", "Caption"] and len(test) == 50
    labels = train["Labels"].str.split()
    assert labels.map(len).between(1, 4).all() and labels.map(len).max() == 4
    counts = labels.explode().value_counts()
    assert set(counts.index) == set(LABELS) and counts.max() > 4 * counts.min()
    # text-only labels are usually written, image-only textures almost never
    night = train[labels.map(lambda ls: "night" in ls)]
    assert night["Caption"].str.contains("night|dark|evening|moon").mean() > 0.7
    dotted = train[labels.map(lambda ls: "dotted" in ls)]
    assert not dotted["Caption"].str.contains("dot").any()
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 450
