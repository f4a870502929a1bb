"""Blenders, honest nested CV, OOF loading and the ``mmfold blend`` command end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest

from mmfold import fileio
from mmfold.config import load_config
from mmfold.data.competition import load_competition
from mmfold.artifacts import manifest
from mmfold.artifacts.manifest import data_fingerprints

from mmfold import cli, paths
from mmfold.artifacts import predictions, studies
from mmfold.artifacts.predictions import OOFSet, load_oofs
from mmfold.ensemble import blenders, progress
from mmfold.ensemble.blenders import (
    BLENDERS,
    Blender,
    GreedyBlender,
    LGBMStacker,
    MeanBlender,
    OptunaBlender,
    build_blender,
)
from mmfold.ensemble.nested import fit_blend, nested_cv
from mmfold.ensemble.transforms import TRANSFORMS, PowerTransform, RankTransform
from mmfold.config import BlendConfig
from mmfold.errors import UserError
from mmfold.metrics import samples_f1
from mmfold.ensemble.thresholds import ThresholdOptimizer
from tests.conftest import write_competition


def make_stack(n: int = 600, L: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two informative models with independent errors and one of pure noise, 5 folds."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, L)) < 0.3).astype(np.uint8)
    y[~y.any(1), 0] = 1

    def model(noise: float) -> np.ndarray:
        return 1 / (1 + np.exp(-(4 * (y - 0.5) + rng.normal(0, noise, y.shape))))

    P = np.stack([model(2.0), model(2.0), rng.random(y.shape)])
    return P, y, rng.permutation(np.arange(n) % 5)


THR = {"n_candidates": 30}


# ---- blenders ------------------------------------------------------------------------------


def test_optuna_gives_pure_noise_about_zero_weight() -> None:
    P, y, _ = make_stack()
    b = OptunaBlender(n_trials=30, threshold_params=THR, seed=0).fit(P, y)
    assert b.weights_.sum() == pytest.approx(1.0)
    assert b.weights_[2] < 0.1
    assert b.weights_[0] > 0.25 and b.weights_[1] > 0.25  # both real models are used
    assert b.predict(P).shape == y.shape


def test_optuna_beats_each_model_and_the_mean_in_sample() -> None:
    """The anchor trials guarantee the search never ends below the mean or a single model."""
    P, y, _ = make_stack(seed=1)
    b = OptunaBlender(n_trials=12, threshold_params=THR, seed=0).fit(P, y)
    best = b.study_.best_value
    for m in range(3):
        single = ThresholdOptimizer(n_rounds=1, **THR).fit(P[m], y).score_
        assert best >= single - 1e-12
    assert best >= ThresholdOptimizer(n_rounds=1, **THR).fit(P.mean(0), y).score_ - 1e-12


def test_dirichlet_weights_from_a_fixed_trial() -> None:
    """u=1 gives weight 0; u=1/e gives weight 1: the objective is that model's score."""
    P, y, _ = make_stack()
    b = OptunaBlender(threshold_params=THR)
    Q = b._prepare(P)
    trial = optuna.trial.FixedTrial({"u0": 1.0, "u1": float(np.exp(-1)), "u2": 1.0})
    alone = ThresholdOptimizer(n_rounds=1, **THR).fit(P[1], y).score_
    assert b._objective(trial, Q, y) == pytest.approx(alone)
    w, _ = b._decode({"u0": float(np.exp(-2)), "u1": float(np.exp(-1)), "u2": 1.0}, 3)
    np.testing.assert_allclose(w / w.sum(), [2 / 3, 1 / 3, 0])


class Interrupted(OptunaBlender):
    """Blender whose run is killed (Ctrl-C) when trial ``stop_at`` starts."""

    stop_at = 6

    def _objective(self, trial, Q, y):  # type: ignore[no-untyped-def]
        if trial.number == self.stop_at:
            raise KeyboardInterrupt
        return super()._objective(trial, Q, y)


def test_interrupted_study_resumes_with_its_trials(tmp_path: Path) -> None:
    P, y, _ = make_stack(n=300)
    storage = f"sqlite:///{tmp_path / 'blend.db'}"
    with pytest.raises(KeyboardInterrupt):
        Interrupted(n_trials=10, threshold_params=THR, storage=storage).fit(P, y)
    first = OptunaBlender(n_trials=10, threshold_params=THR, storage=storage)
    study = first._study(first._prepare(P), y)
    kept = [(t.number, t.params) for t in studies.complete_trials(study)]
    assert len(kept) == 6
    first.fit(P, y)
    done = studies.complete_trials(first.study_)
    assert len(done) == 10
    assert [(t.number, t.params) for t in done[:6]] == kept
    # a finished study is reused as is; other models (other data) start a new study
    again = OptunaBlender(n_trials=10, threshold_params=THR, storage=storage).fit(P, y)
    assert again.study_.study_name == first.study_.study_name
    assert len(again.study_.trials) == len(first.study_.trials)
    np.testing.assert_allclose(again.weights_, first.weights_)
    other = OptunaBlender(n_trials=3, threshold_params=THR, storage=storage).fit(P[:2], y)
    assert other.study_.study_name != first.study_.study_name
    assert len(other.study_.trials) == 3


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask() stands in for a dead process
def test_trial_of_a_killed_run_is_marked_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGKILLed blend leaves its trial RUNNING; once its heartbeat is older than the grace
    period, the next blend on the study marks it FAIL instead of keeping a zombie forever."""
    import optuna

    monkeypatch.setattr(studies, "HEARTBEAT_S", 1)
    monkeypatch.setattr(studies, "GRACE_S", 1)
    studies.storage.cache_clear()
    P, y, _ = make_stack(n=200)
    url = f"sqlite:///{tmp_path / 'blend.db'}"
    first = OptunaBlender(n_trials=3, threshold_params=THR, storage=url).fit(P, y)
    storage = studies.storage(url)
    study = optuna.load_study(study_name=first.study_.study_name, storage=storage)
    zombie = study.ask()  # what a killed process leaves: RUNNING, heartbeat then silence
    storage.record_heartbeat(zombie._trial_id)
    time.sleep(2.5)
    again = OptunaBlender(n_trials=3, threshold_params=THR, storage=url).fit(P, y)
    states = {t.number: t.state for t in again.study_.trials}
    assert states[zombie.number] == optuna.trial.TrialState.FAIL
    assert len(studies.complete_trials(again.study_)) == 3
    studies.storage.cache_clear()


def test_greedy_selection_prefers_real_models() -> None:
    P, y, _ = make_stack()
    b = GreedyBlender(n_iter=10, threshold_params=THR).fit(P, y)
    assert b.weights_[2] <= 0.1 and b.weights_.sum() == pytest.approx(1.0)
    assert len(b.trajectory_) == 10
    np.testing.assert_allclose(b.predict(P), np.tensordot(b.weights_, P, axes=1))


def test_mean_blender_is_the_plain_average() -> None:
    P, y, _ = make_stack()
    b = MeanBlender().fit(P, y)
    np.testing.assert_allclose(b.predict(P), P.mean(0))
    np.testing.assert_allclose(b.weights_, [1 / 3] * 3)


def test_rank_transform_ranks_test_rows_against_training_rows() -> None:
    train = np.array([[[0.1], [0.2], [0.3], [0.4]]])
    t = RankTransform().fit(train)
    np.testing.assert_allclose(t(np.array([[[0.25]], ])), [[[0.5]]])
    np.testing.assert_allclose(t(np.array([[[0.05], [0.9]]])), [[[0.0], [1.0]]])


def _mix_before_issue_13(Q: np.ndarray, weights: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """How a power blend was mixed when the exponents lived in the mix, not in a transform."""
    out = np.zeros(Q.shape[1:])
    for w, e, q in zip(weights, exponents, Q):
        if w > 0:
            out += w * (q if e == 1 else np.power(q, e))
    return out


def test_power_transform_applies_each_models_exponent() -> None:
    P, _, _ = make_stack(n=50)
    t = PowerTransform([2.0, 1.0, 0.5])
    np.testing.assert_array_equal(t(P), np.stack([P[0] ** 2.0, P[1], np.power(P[2], 0.5)]))
    np.testing.assert_array_equal(PowerTransform().fit(P)(P), P)  # exponents 1 until tuned


def test_a_power_blend_is_bit_identical_to_the_old_mix() -> None:
    """The tuned exponents now sit in the transform: the study, ``oof_`` and ``predict`` give
    exactly what the old in-mix exponents gave."""
    P, y, _ = make_stack(n=300, seed=3)
    b = OptunaBlender(n_trials=15, threshold_params=THR, transform="power", seed=0).fit(P, y)
    assert isinstance(b.transform_, PowerTransform) and b.exponents_ is b.transform_.exponents_
    np.testing.assert_array_equal(b.oof_, _mix_before_issue_13(P, b.weights_, b.exponents_))
    b.transform_.exponents_ = np.array([2.0, 1.0, 0.3])
    Pt = P[:, ::7]
    np.testing.assert_array_equal(b.predict(Pt), _mix_before_issue_13(Pt, b.weights_, b.transform_.exponents_))
    params = {"u0": 0.2, "u1": 0.5, "u2": 0.9, "p0": 0.5, "p1": 1.0, "p2": 3.0}
    w, e = b._decode(params, 3)
    old = ThresholdOptimizer(n_rounds=1, **THR).fit(_mix_before_issue_13(P, w / w.sum(), e), y).score_
    assert b._objective(optuna.trial.FixedTrial(params), b._prepare(P), y) == old


def test_every_registered_transform_does_its_own_work() -> None:
    """No registered class is a mere flag (power once was the identity under another name)."""
    for name in TRANSFORMS:
        cls = TRANSFORMS.get(name)
        assert "fit" in vars(cls) and "__call__" in vars(cls), name
        assert not any(base in [TRANSFORMS.get(n) for n in TRANSFORMS] for base in cls.__mro__[1:]), name


@pytest.mark.parametrize("method", list(BLENDERS))
def test_every_registered_blender_implements_the_protocol(method: str) -> None:
    P, y, folds = make_stack(n=200, L=3)
    cls = BLENDERS.get(method)
    assert Blender in cls.__mro__
    b = cls.from_config(BlendConfig(method=method, n_trials=4), "samples", None, "t").fit(P, y, folds % 3)
    assert isinstance(b, Blender) and b.oof_.shape == y.shape and b.weights_.shape == (3,)
    assert isinstance(Memorizer().fit(P, y), Blender)  # the protocol is structural


def test_lgbm_stacker_is_out_of_fold() -> None:
    """Changing the labels of fold 0 must not change fold 0's stacked predictions."""
    P, y, folds = make_stack(n=400, L=3)
    a = LGBMStacker(n_estimators=20).fit(P, y, folds)
    y2 = y.copy()
    y2[folds == 0] = 1 - y2[folds == 0]
    b = LGBMStacker(n_estimators=20).fit(P, y2, folds)
    np.testing.assert_allclose(a.oof_[folds == 0], b.oof_[folds == 0])
    assert not np.allclose(a.oof_[folds == 1], b.oof_[folds == 1])
    assert a.weights_[2] < 0.2
    assert samples_f1(y, a.oof_ > 0.5) > 0.6


def test_lgbm_cooccurrence_features() -> None:
    P, y, folds = make_stack(n=300, L=3)
    s = LGBMStacker(n_estimators=10, cooccurrence=True).fit(P, y, folds)
    assert s._x(P, 0).shape == (300, 3 + 3)
    assert s.predict(P).shape == y.shape


# ---- nested CV -----------------------------------------------------------------------------


class Memorizer:
    """A 'blender' that memorises the labels of every row it was fitted on (by the row's
    probabilities) and predicts them perfectly; rows it never saw get zeros."""

    def fit(self, P, y, folds=None):  # type: ignore[no-untyped-def]
        self.seen_ = {P[:, i].tobytes(): y[i] for i in range(P.shape[1])}
        self.oof_ = self.predict(P)
        self.weights_ = np.ones(len(P)) / len(P)
        return self

    def predict(self, P):  # type: ignore[no-untyped-def]
        zero = np.zeros(P.shape[2])
        return np.stack([self.seen_.get(P[:, i].tobytes(), zero) for i in range(P.shape[1])]).astype(float)


def test_nested_cv_never_scores_a_fold_it_fitted_on() -> None:
    P, y, folds = make_stack()
    honest = nested_cv(P, y, folds, lambda k: Memorizer(), ThresholdOptimizer)
    leaky = Memorizer().fit(P, y)
    assert samples_f1(y, ThresholdOptimizer().fit(leaky.oof_, y).predict(leaky.oof_)) == 1.0
    assert honest.mean < 0.6  # a leak would give 1.0


def test_nested_cv_predictions_ignore_the_scored_folds_labels() -> None:
    """Flip fold 2's labels: fold 2's honest probabilities and 0/1 predictions stay put."""
    P, y, folds = make_stack(n=400)
    make = lambda k: OptunaBlender(n_trials=5, threshold_params=THR)  # noqa: E731
    a = nested_cv(P, y, folds, make, ThresholdOptimizer)
    y2 = y.copy()
    y2[folds == 2] = 1 - y2[folds == 2]
    b = nested_cv(P, y2, folds, make, ThresholdOptimizer)
    np.testing.assert_allclose(a.prob[folds == 2], b.prob[folds == 2])
    np.testing.assert_array_equal(a.pred[folds == 2], b.pred[folds == 2])
    assert len(a.per_fold) == 5 and a.std >= 0


@pytest.mark.parametrize("method", list(BLENDERS))
def test_every_registered_method_blends_honestly(method: str) -> None:
    P, y, folds = make_stack(n=300, L=3)
    folds = folds % 3  # 3 folds keep the nested stacker fits few
    oofs = OOFSet(["a", "b", "noise"], ["x", "y", "z"], [str(i) for i in range(300)], folds, P)
    fit = fit_blend(oofs, y, BlendConfig(method=method, n_trials=5), "samples")
    assert fit.best_single[0] in ("a", "b") and fit.singles["noise"].mean < fit.honest.mean
    assert fit.honest.mean > fit.singles["a"].mean - 0.05 and fit.in_sample >= fit.honest.mean - 0.05
    assert fit.blender.predict(P).shape == y.shape and fit.thresholds.thresholds_.shape == (3,)
    assert fit.blender.weights_.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("method, decoder", [("optuna", "expected_f1"), ("optuna", "gfm"), ("lgbm", "thresholds"),
                                             ("lgbm_all", "thresholds"), ("lgbm_all", "gfm"),
                                             ("logistic", "thresholds"), ("logistic", "gfm")])
def test_every_lever_of_the_blend_ignores_the_scored_folds_labels(method: str, decoder: str) -> None:
    """Leak detector for the decoder and stacker levers: flip fold 2's labels and fold 2's
    honest probabilities and decisions do not move."""
    from mmfold.ensemble.decoders import build_decoder

    P, y, folds = make_stack(n=300, L=3)
    folds = folds % 3
    cfg = BlendConfig(method=method, decoder=decoder, n_trials=4)
    runs = []
    for labels in (y, np.where(folds[:, None] == 2, 1 - y, y)):
        runs.append(nested_cv(P, labels, folds, lambda k: build_blender(cfg, "samples"),
                              lambda: build_decoder(cfg, "samples")))
    np.testing.assert_allclose(runs[0].prob[folds == 2], runs[1].prob[folds == 2])
    np.testing.assert_array_equal(runs[0].pred[folds == 2], runs[1].pred[folds == 2])


def test_the_logistic_stacker_weighs_each_model_where_it_knows_the_label() -> None:
    """Two specialists: model 0 knows labels 0-2, model 1 only label 3 (the season a row-id
    vote knows), each noise elsewhere. One global weight per model must trade one against the
    other; a weight per label takes both, honestly (nested CV) and by a clear margin."""
    rng = np.random.default_rng(1)
    n, L = 900, 4
    y = (rng.random((n, L)) < 0.4).astype(np.uint8)
    y[~y.any(1), 0] = 1
    sharp = lambda: 1 / (1 + np.exp(-(6 * (y - 0.5) + rng.normal(0, 1.0, y.shape))))  # noqa: E731
    P = np.stack([sharp(), sharp()])
    P[0, :, 3] = rng.random(n)
    P[1, :, :3] = rng.random((n, 3))
    folds = np.arange(n) % 3
    scores = {}
    for method in ("optuna", "logistic"):
        cfg = BlendConfig(method=method, n_trials=20)
        scores[method] = nested_cv(P, y, folds, lambda k, c=cfg: build_blender(c, "samples"),
                                   lambda: ThresholdOptimizer(**THR)).mean
    assert scores["logistic"] > scores["optuna"] + 0.03
    stacker = build_blender(BlendConfig(method="logistic"), "samples").fit(P, y, folds)
    assert stacker.models_[3].coef_[0, 1] > 5 * abs(stacker.models_[3].coef_[0, 0])  # label 3: model 1
    assert stacker.models_[0].coef_[0, 0] > 5 * abs(stacker.models_[0].coef_[0, 1])  # label 0: model 0


def test_bad_blend_settings_are_refused() -> None:
    with pytest.raises(UserError, match="unknown blend method 'magic'"):
        build_blender(BlendConfig(method="magic"), "samples")
    with pytest.raises(UserError, match="power"):
        build_blender(BlendConfig(method="mean", transform="power"), "samples")
    with pytest.raises(UserError, match="unknown blend transform"):
        build_blender(BlendConfig(transform="log"), "samples")
    for ignored in ({"transform": "rank"}, {"cooccurrence": True}):  # a stacker over logits would ignore them
        with pytest.raises(UserError, match="blend.method=logistic reads each model's logit"):
            build_blender(BlendConfig(method="logistic", **ignored), "samples")
    P, y, _ = make_stack(n=60, L=3)
    with pytest.raises(UserError, match="blend.method=logistic trains out-of-fold"):
        build_blender(BlendConfig(method="logistic"), "samples").fit(P, y, np.zeros(60, int))


# ---- loading OOF files ---------------------------------------------------------------------


CLASSES = ["cat", "dog", "10"]


def fake_comp(n: int = 12, n_test: int = 4) -> SimpleNamespace:
    ids = [f"im{i}" for i in range(n)]
    test = pd.DataFrame({"id": [f"t{i}" for i in range(n_test)]})
    return SimpleNamespace(train=pd.DataFrame({"id": ids}), test=test, classes=CLASSES)


def write_oof(data: str, model: str, ids: list[str], folds: np.ndarray, seed: int = 0,
              test_ids: list[str] | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"id": ids, "fold": folds})
    for c in CLASSES:
        df[c] = rng.random(len(ids)).astype(np.float32)
    paths.oof_dir(data).mkdir(parents=True, exist_ok=True)
    df.to_parquet(paths.oof_file(data, model), index=False)
    if test_ids is not None:
        t = pd.DataFrame({"id": test_ids, **{c: rng.random(len(test_ids)) for c in CLASSES}})
        t.to_parquet(paths.test_pred_file(data, model), index=False)
    return df


@pytest.fixture
def oof_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    monkeypatch.setenv("MMFOLD_HOME", str(tmp_path))
    comp = fake_comp()
    folds = np.arange(12) % 3
    ids = comp.train["id"].tolist()
    return SimpleNamespace(comp=comp, folds=folds, ids=ids, test_ids=comp.test["id"].tolist())


def test_load_oofs_aligns_rows_to_train_order(oof_home: SimpleNamespace) -> None:
    o = oof_home
    order = np.random.default_rng(0).permutation(12)
    df = write_oof("d", "a", [o.ids[i] for i in order], o.folds[order], test_ids=o.test_ids[::-1])
    write_oof("d", "b", o.ids, o.folds, seed=1, test_ids=o.test_ids)
    got = load_oofs("d", ["a", "b"], o.comp, o.folds, check_stale=False)
    want = df.set_index("id").loc[o.ids, CLASSES].to_numpy()
    np.testing.assert_allclose(got.P[0], want)
    assert got.P.shape == (2, 12, 3) and got.test.shape == (2, 4, 3)
    assert got.test_ids == o.test_ids
    assert predictions.available_models("d") == ["a", "b"]


def test_load_oofs_refuses_mismatched_ids(oof_home: SimpleNamespace) -> None:
    o = oof_home
    write_oof("d", "a", o.ids, o.folds)
    write_oof("d", "b", o.ids[:-2] + ["zz1", "zz2"], o.folds)
    with pytest.raises(UserError, match=r"model 'b'.*2 missing \(first: 'im10', 'im11'\).*'zz1'"):
        load_oofs("d", ["a", "b"], o.comp, o.folds, with_test=False, check_stale=False)


def test_load_oofs_refuses_other_folds(oof_home: SimpleNamespace) -> None:
    o = oof_home
    bad = o.folds.copy()
    bad[[4, 7]] = (bad[[4, 7]] + 1) % 3
    write_oof("d", "a", o.ids, bad)
    with pytest.raises(UserError, match=r"model 'a'.*folds differ.*2 ids.*'im4', 'im7'"):
        load_oofs("d", ["a"], o.comp, o.folds, with_test=False, check_stale=False)


def test_load_oofs_refuses_other_label_columns(oof_home: SimpleNamespace) -> None:
    o = oof_home
    df = write_oof("d", "a", o.ids, o.folds).rename(columns={"dog": "wolf"})
    df.to_parquet(paths.oof_file("d", "a"), index=False)
    with pytest.raises(UserError, match=r"model 'a'.*missing \['dog'\], unexpected \['wolf'\]"):
        load_oofs("d", ["a"], o.comp, o.folds, with_test=False, check_stale=False)


def test_load_oofs_refuses_duplicates_and_names_missing_models(oof_home: SimpleNamespace) -> None:
    o = oof_home
    write_oof("d", "a", o.ids[:-1] + [o.ids[0]], o.folds)
    with pytest.raises(UserError, match=r"duplicated ids.*'im0'"):
        load_oofs("d", ["a"], o.comp, o.folds, with_test=False, check_stale=False)
    with pytest.raises(UserError, match=r"model 'nope'.*collected models: \['a'\]"):
        load_oofs("d", ["nope"], o.comp, o.folds, with_test=False, check_stale=False)


def test_load_oofs_checks_test_files(oof_home: SimpleNamespace) -> None:
    o = oof_home
    write_oof("d", "a", o.ids, o.folds, test_ids=o.test_ids[:-1])
    with pytest.raises(UserError, match=r"model 'a'.*test.parquet.*1 missing \(first: 't3'\)"):
        load_oofs("d", ["a"], o.comp, o.folds, check_stale=False)


# ---- mmfold blend end to end ----------------------------------------------------------------


def tiny_blend_project(project: Path, n_train: int = 90, n_test: int = 20) -> tuple[list[str], np.ndarray]:
    """A tiny competition with folds and two models' OOF + test predictions on disk."""
    write_competition(project, name="tiny", n_train=n_train, n_test=n_test, n_labels=4, images=False)
    train = pd.read_csv(project / "input/tiny/train.csv", dtype=str)
    test = pd.read_csv(project / "input/tiny/test.csv", dtype=str)
    classes = ["1", "2", "3", "4"]
    y = np.array([[c in ls.split() for c in classes] for ls in train["Labels"]], dtype=float)
    folds = np.arange(n_train) % 3
    (project / "folds").mkdir(exist_ok=True)
    pd.DataFrame({"ImageID": train["ImageID"], "fold": folds}).to_csv(paths.folds_file("tiny"), index=False)
    paths.labels_file("tiny").write_text(json.dumps({"classes": classes}))
    rng = np.random.default_rng(0)
    for m, noise in (("good", 0.25), ("weak", 0.45)):
        oof = np.clip(0.5 * y + 0.25 + rng.normal(0, noise, y.shape), 0, 1)
        df = pd.DataFrame({"id": train["ImageID"], "fold": folds, **dict(zip(classes, oof.T))})
        paths.oof_dir("tiny").mkdir(parents=True, exist_ok=True)
        df.to_parquet(paths.oof_file("tiny", m), index=False)
        tp = pd.DataFrame({"id": test["ImageID"], **{c: rng.random(n_test) for c in classes}})
        tp.to_parquet(paths.test_pred_file("tiny", m), index=False)
    comp = load_competition(load_config("tiny").data)
    for m in ("good", "weak"):  # the manifest `collect` writes: hashes of the inputs
        fileio.write_json(paths.oof_meta_file("tiny", m), {"hashes": {**data_fingerprints(comp),
                                                                       "test": manifest.testset_key(comp)}})
    return test["ImageID"].tolist(), folds


def test_stale_models_are_never_blended(project: Path, capsys: pytest.CaptureFixture) -> None:
    tiny_blend_project(project)
    folds = pd.read_csv(paths.folds_file("tiny"), dtype={"ImageID": str})
    folds["fold"] = (folds["fold"] + 1) % 3  # folds re-made after the models were trained
    folds.to_csv(paths.folds_file("tiny"), index=False)
    assert cli.main(["blend", "--data", "tiny", "--models", "good", "blend.method=mean"]) == 2
    err = capsys.readouterr().err
    assert "folds" in err and "good" in err
    assert not (project / "submissions" / "tiny").exists() or not list((project / "submissions" / "tiny").glob("*.csv"))


def test_blend_command_writes_submission_log_and_report(project: Path, capsys: pytest.CaptureFixture) -> None:
    test_ids, _ = tiny_blend_project(project)
    assert cli.main(["blend", "--data", "tiny", "--name", "first", "blend.n_trials=6"]) == 0
    out = capsys.readouterr().out
    assert "honest CV" in out and "(good)" in out and "submission   " in out
    sub = pd.read_csv(project / "submissions/tiny/first.csv", dtype=str)
    assert list(sub.columns) == ["ImageID", "Labels"] and sub["ImageID"].tolist() == test_ids
    assert all(set(ls.split()) <= {"1", "2", "3", "4"} and ls for ls in sub["Labels"])
    report = json.loads((project / "reports/tiny/blend_first.json").read_text())
    assert set(report["models_cv"]) == {"good", "weak"} and report["study"]["trials"] == 6
    assert set(report["per_label"]) == {"1", "2", "3", "4"}
    assert (project / "reports/tiny/blend_first.md").read_text().startswith("# Blend `first`")
    log = pd.read_csv(project / "submissions/tiny/log.csv", dtype=str, keep_default_na=False)
    assert log["name"].tolist() == ["first"] and log["lb"].tolist() == [""]
    assert float(log["cv_mean"][0]) == pytest.approx(report["cv"]["mean"], abs=1e-6)
    assert log["commit"][0] == "unknown"

    before = (project / "submissions/tiny/first.csv").read_bytes()
    assert cli.main(["blend", "--data", "tiny", "--name", "first", "blend.n_trials=6"]) == 2
    assert (project / "submissions/tiny/first.csv").read_bytes() == before

    assert cli.main(["blend", "--data", "tiny", "--name", "second", "--models", "good", "weak",
                     "blend.method=mean"]) == 0
    log2 = pd.read_csv(project / "submissions/tiny/log.csv", dtype=str, keep_default_na=False)
    assert log2["name"].tolist() == ["first", "second"]
    pd.testing.assert_series_equal(log2.iloc[0], log.iloc[0])

    assert cli.main(["submit", "--data", "tiny", "--name", "first", "--score", "0.5"]) == 0
    assert "gap" in capsys.readouterr().out


def test_an_expected_f1_blend_is_logged_reported_and_resubmitted(project: Path) -> None:
    tiny_blend_project(project)
    args = ["blend", "--data", "tiny", "--name", "ef1", "blend.n_trials=4", "blend.decoder=expected_f1",
            "blend.calibration=isotonic"]
    assert cli.main(args) == 0
    report = json.loads((project / "reports/tiny/blend_ef1.json").read_text())
    assert report["decoder"] == "expected_f1" and report["global_threshold"] is None
    assert all(v["threshold"] is None for v in report["per_label"].values())
    assert "| per row |" in (project / "reports/tiny/blend_ef1.md").read_text()
    log = pd.read_csv(project / "submissions/tiny/log.csv", dtype=str, keep_default_na=False)
    assert log["decoder"].tolist() == ["expected_f1"] and log["calibration"].tolist() == ["isotonic"]
    assert cli.main(["blend", "--data", "tiny", "--from", "ef1", "--name", "ef1-again"]) == 0
    first = (project / "submissions/tiny/ef1.csv").read_bytes()
    assert (project / "submissions/tiny/ef1-again.csv").read_bytes() == first
    assert cli.main(["report", "--data", "tiny"]) == 0


def test_blend_command_continues_the_stored_study(project: Path) -> None:
    tiny_blend_project(project)
    args = ["blend", "--data", "tiny", "blend.n_trials=4", "--name"]
    assert cli.main(args + ["a"]) == 0
    assert cli.main(args + ["b"]) == 0
    a = json.loads((project / "reports/tiny/blend_a.json").read_text())
    b = json.loads((project / "reports/tiny/blend_b.json").read_text())
    assert a["study"] == b["study"] and a["weights"] == b["weights"] and a["cv"] == b["cv"]
    studies = optuna.get_all_study_names(f"sqlite:///{paths.oof_dir('tiny') / 'blend.db'}")
    assert len(studies) == 3 + 1  # one per outer fold + the final fit, reused by the rerun


# ---- one model: nothing to search -----------------------------------------------------------


@pytest.mark.parametrize("method", ["optuna", "greedy", "mean"])
def test_a_single_model_is_blended_without_any_search(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One model has one weight, 1.0: a 100-trial study over it is minutes of nothing."""
    def no_search(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a weight search ran for a single model")

    monkeypatch.setattr(optuna, "create_study", no_search)
    monkeypatch.setattr(blenders, "_score_after_thresholds", no_search)
    P, y, folds = make_stack(n=300, L=3)
    oofs = OOFSet(["a"], ["x", "y", "z"], [str(i) for i in range(300)], folds % 3, P[:1])
    fit = fit_blend(oofs, y, BlendConfig(method=method, n_trials=100), "samples")
    assert fit.blender.weights_.tolist() == [1.0]
    assert "one model" in fit.note
    assert fit.honest.mean == pytest.approx(fit.singles["a"].mean)


def test_blend_command_says_a_single_model_was_not_searched(project: Path, capsys: pytest.CaptureFixture) -> None:
    tiny_blend_project(project)
    assert cli.main(["blend", "--data", "tiny", "--name", "one", "--models", "good"]) == 0
    out = capsys.readouterr().out
    assert "one model" in out
    report = json.loads((project / "reports/tiny/blend_one.json").read_text())
    assert report["weights"] == {"good": 1.0} and "one model" in report["note"] and "study" not in report
    assert "one model" in (project / "reports/tiny/blend_one.md").read_text()
    log = pd.read_csv(project / "submissions/tiny/log.csv", dtype=str, keep_default_na=False)
    assert "one model" in log["note"][0]


# ---- the log records every setting that changes a submission ---------------------------------


OLD_LOG_COLUMNS = ["name", "time", "models", "method", "metric", "weights", "cv_mean", "cv_std",
                   "cv_in_sample", "best_single", "best_single_cv", "commit", "lb"]


def test_log_records_every_setting_that_changes_the_submission(project: Path) -> None:
    """Two blends differing only in a post-rule are two different rows; an old log still loads."""
    tiny_blend_project(project)
    old = pd.DataFrame([dict.fromkeys(OLD_LOG_COLUMNS, "") | {"name": "old", "cv_mean": "0.5", "lb": "0.6"}])
    log_file = project / "submissions/tiny/log.csv"
    log_file.parent.mkdir(parents=True)
    old.to_csv(log_file, index=False)
    base = ["blend", "--data", "tiny", "--models", "good", "weak", "blend.method=mean"]
    assert cli.main(base + ["--name", "k2", "blend.top_k=2"]) == 0
    assert cli.main(base + ["--name", "max3", "blend.max_labels=3", "blend.transform=rank"]) == 0
    log = pd.read_csv(log_file, dtype=str, keep_default_na=False)
    assert list(log.columns[: len(OLD_LOG_COLUMNS)]) == OLD_LOG_COLUMNS  # new columns appended
    settings = ["transform", "n_trials", "seed", "cooccurrence", "min_labels", "max_labels", "top_k",
                "thresholds", "exponents"]
    for c in settings:
        assert c in log.columns, c
        assert log.loc[0, c] == "", c  # the old row: blank, not invented
    k2, max3 = log.iloc[1], log.iloc[2]
    assert (k2["top_k"], k2["max_labels"], k2["transform"]) == ("2", "", "none")
    assert (max3["top_k"], max3["max_labels"], max3["transform"]) == ("", "3", "rank")
    assert k2["min_labels"] == "1" and k2["seed"] == "42" and k2["cooccurrence"] == "False"
    assert k2["thresholds"] and k2["thresholds"] != max3["thresholds"]
    assert "reports/tiny/blend_k2.json" in k2["thresholds_file"]
    assert cli.main(["submit", "--data", "tiny", "--show"]) == 0


# ---- Ctrl-C ------------------------------------------------------------------------------------


def _complete_trials(db: Path, fold: str) -> list[tuple[int, str]]:
    """(number, params) of the COMPLETE trials of the study of one outer fold, read from SQLite."""
    import sqlite3

    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            rows = conn.execute(
                "SELECT t.number, group_concat(p.param_name || '=' || p.param_value, ',') "
                "FROM trials t JOIN studies s ON t.study_id = s.study_id "
                "LEFT JOIN trial_params p ON p.trial_id = t.trial_id "
                "WHERE s.study_name LIKE ? AND t.state = 'COMPLETE' GROUP BY t.trial_id ORDER BY t.number",
                (f"%-{fold}-%",)).fetchall()
    except sqlite3.OperationalError:  # the schema is still being created
        return []
    return [(int(n), str(p)) for n, p in rows]


def test_ctrl_c_in_blend_is_clean_and_a_rerun_resumes(project: Path) -> None:
    """SIGINT mid-study: no traceback, exit 130, finished trials kept, the rerun continues them.

    Enough rows that a trial's time is mostly the objective (where Optuna would log a
    KeyboardInterrupt with its traceback), not Optuna's own bookkeeping.
    """
    import os
    import signal
    import subprocess
    import sys

    tiny_blend_project(project, n_train=12000, n_test=50)
    db = paths.oof_dir("tiny") / "blend.db"
    cmd = [sys.executable, "-m", "mmfold", "blend", "--data", "tiny", "--name", "x"]
    env = {**os.environ, "MMFOLD_HOME": str(project)}
    proc = subprocess.Popen(cmd + ["blend.n_trials=5000"], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while len(_complete_trials(db, "fold0")) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "interrupted" in err, err
    assert len(err.splitlines()) < 20, err
    kept = _complete_trials(db, "fold0")
    assert len(kept) >= 5
    assert not (project / "submissions/tiny/x.csv").exists()
    n = len(kept) + 3
    assert cli.main(["blend", "--data", "tiny", "--name", "x", f"blend.n_trials={n}"]) == 0
    resumed = _complete_trials(db, "fold0")
    assert len(resumed) == n and resumed[: len(kept)] == kept


# ---- progress ----------------------------------------------------------------------------------


def test_blend_prints_progress_to_stderr(project: Path, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_blend_project(project)
    assert cli.main(["blend", "--data", "tiny", "--name", "a", "blend.n_trials=6"]) == 0
    err = capsys.readouterr().err
    for stage in ("loading 2 models", "nested CV fold 1/3", "nested CV fold 3/3", "final fit",
                  "each model alone"):
        assert stage in err, (stage, err)
    assert len(err.splitlines()) < 15, err  # a line per stage, trials only every few seconds
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)
    assert cli.main(["blend", "--data", "tiny", "--name", "b", "blend.n_trials=9",
                     "blend.seed=7"]) == 0
    err = capsys.readouterr().err
    assert "trial 9/9" in err and "best " in err, err


# ---- sample submission -----------------------------------------------------------------------


def test_submission_follows_the_sample_submission(project: Path) -> None:
    """``Id,Predicted`` in the sample's row order, whatever the data config calls its columns."""
    test_ids, _ = tiny_blend_project(project)
    order = test_ids[::-1]
    sample = project / "input/tiny/sample_submission.csv"
    pd.DataFrame({"Id": order, "Predicted": "1"}).to_csv(sample, index=False)
    args = ["blend", "--data", "tiny", "--models", "good", "weak", "blend.method=mean",
            "data.sample_submission=sample_submission.csv", "--name"]
    assert cli.main(args + ["s"]) == 0
    sub = pd.read_csv(project / "submissions/tiny/s.csv", dtype=str)
    assert list(sub.columns) == ["Id", "Predicted"] and sub["Id"].tolist() == order
    plain = ["blend", "--data", "tiny", "--models", "good", "weak", "blend.method=mean", "--name", "p"]
    assert cli.main(plain) == 0
    ref = pd.read_csv(project / "submissions/tiny/p.csv", dtype=str).set_index("ImageID")["Labels"]
    assert sub.set_index("Id")["Predicted"].to_dict() == ref.to_dict()  # same predictions


def test_a_bad_sample_submission_fails_before_fitting(project: Path, capsys: pytest.CaptureFixture) -> None:
    test_ids, _ = tiny_blend_project(project)
    args = ["blend", "--data", "tiny", "blend.method=mean", "data.sample_submission=sample.csv", "--name"]
    assert cli.main(args + ["a"]) == 2
    err = capsys.readouterr().err
    assert "sample.csv" in err and "not found" in err
    sample = project / "input/tiny/sample.csv"
    pd.DataFrame({"Id": test_ids, "a": "1", "b": "2"}).to_csv(sample, index=False)
    assert cli.main(args + ["b"]) == 2
    assert "3 columns" in capsys.readouterr().err
    pd.DataFrame({"Id": test_ids[:-1] + ["nope.jpg"], "Predicted": "1"}).to_csv(sample, index=False)
    assert cli.main(args + ["c"]) == 2
    err = capsys.readouterr().err
    assert "nope.jpg" in err and repr(test_ids[-1]) in err
    assert not list((project / "submissions").glob("tiny/*.csv"))
