"""Decoders (``blend.decoder``): expected-F1 decoding is exact under independence, keeps the
post-rules, beats per-label thresholds where theory says it must, is fitted without the fold
it decides, and survives a save/load of the blend state."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from mmfold.config import BlendConfig
from mmfold.ensemble.blenders import build_blender
from mmfold.ensemble.calibration import CALIBRATORS, PlattCalibrator
from mmfold.ensemble.decoders import (CountAwareF1Decoder, ExpectedF1Decoder, _add_label, _suffix_counts,
                                     build_decoder, count_aware_f1_by_k, expected_f1_by_k)
from mmfold.ensemble.nested import nested_cv, nested_cv_decoders
from mmfold.ensemble.state import load_state, save_state
from mmfold.ensemble.thresholds import ThresholdOptimizer
from mmfold.errors import UserError
from mmfold.metrics import samples_f1


def _brute_expected_f1(q: np.ndarray, k: int) -> float:
    """E[F1] of predicting the first k labels, by enumerating every label vector."""
    total = 0.0
    for bits in itertools.product([0, 1], repeat=len(q)):
        ys = np.array(bits)
        prob = float(np.prod(np.where(ys, q, 1 - q)))
        total += prob * 2 * ys[:k].sum() / (k + ys.sum())
    return total


def test_expected_f1_by_k_is_exact_under_independence() -> None:
    rng = np.random.default_rng(0)
    qs = -np.sort(-rng.random((6, 7)), axis=1)
    qs[0] = [0.99, 0.98, 0.97, 0.9, 0.5, 0.2, 0.01]  # many likely labels: the count cap is hit
    f = expected_f1_by_k(qs, 7)
    for r, k in itertools.product(range(len(qs)), range(1, 8)):
        assert f[r, k - 1] == pytest.approx(_brute_expected_f1(qs[r], k), abs=1e-12)


def test_the_count_cap_lumps_only_a_small_tail() -> None:
    rng = np.random.default_rng(1)
    qs = -np.sort(-rng.random((4, 12)) * 0.4, axis=1)
    exact = np.array([[_brute_expected_f1(q, k) for k in (1, 2)] for q in qs])
    np.testing.assert_allclose(expected_f1_by_k(qs, 2, margin=3), exact, atol=2e-3)


def _independent(n: int, L: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose labels really are independent Bernoulli draws from known marginals; row
    confidence varies, so the best set size varies by row."""
    rng = np.random.default_rng(seed)
    P = rng.beta(0.3, 1.2, (n, L)) * rng.uniform(0.3, 1.0, (n, 1))
    return P, (rng.random((n, L)) < P).astype(np.uint8)


def test_with_true_marginals_it_beats_per_label_thresholds_out_of_sample() -> None:
    P, y = _independent(20_000, 12, 0)
    fit, te = slice(0, 10_000), slice(10_000, None)
    thresholds = ThresholdOptimizer().fit(P[fit], y[fit]).score(P[te], y[te])
    decoder = ExpectedF1Decoder(calibration="none").fit(P[fit], y[fit]).score(P[te], y[te])
    assert decoder > thresholds + 0.005


def test_predictions_are_each_rows_calibrated_top_k_and_keep_the_post_rules() -> None:
    P, y = _independent(3_000, 10, 1)
    d = ExpectedF1Decoder(calibration="platt").fit(P, y)
    pred, q = d.predict(P), d.calibrator_.transform(P)
    k = pred.sum(1)
    assert k.min() >= 1 and len(np.unique(k)) > 1  # k chosen per row
    for r in range(0, 3_000, 97):  # the chosen labels are the k most probable ones
        chosen, rest = q[r, pred[r] == 1], q[r, pred[r] == 0]
        assert len(rest) == 0 or chosen.min() >= rest.max()
    assert ExpectedF1Decoder(max_labels=2).fit(P, y).predict(P).sum(1).max() <= 2
    assert ExpectedF1Decoder(min_labels=3).fit(P, y).predict(P).sum(1).min() >= 3
    assert set(ExpectedF1Decoder(top_k=4).fit(P, y).predict(P).sum(1)) == {4}


def test_bad_settings_are_refused() -> None:
    P, y = _independent(200, 4, 2)
    with pytest.raises(UserError, match="maximises samples-F1"):
        ExpectedF1Decoder(metric="micro").fit(P, y)
    with pytest.raises(UserError, match="below min_labels"):
        ExpectedF1Decoder(min_labels=3, max_labels=2).fit(P, y)
    with pytest.raises(UserError, match="unknown blend decoder 'nope'"):
        build_decoder(BlendConfig(decoder="nope"), "samples")
    with pytest.raises(UserError, match="unknown calibration 'nope'"):
        ExpectedF1Decoder(calibration="nope").fit(P, y)


@pytest.mark.parametrize("name", ["platt", "isotonic"])
def test_calibrators_fix_a_distorted_member(name: str) -> None:
    P, y = _independent(20_000, 6, 3)
    distorted = P**3  # monotone: same ranking, badly calibrated
    q = CALIBRATORS.get(name)().fit(distorted, y).transform(distorted)
    brier = lambda p: float(((p - y) ** 2).mean())  # noqa: E731
    assert brier(q) < brier(distorted) - 0.005
    assert abs(brier(q) - brier(P)) < 0.002


def test_platt_handles_labels_that_never_or_always_occur() -> None:
    P, y = _independent(500, 3, 4)
    y[:, 0], y[:, 1] = 0, 1
    q = PlattCalibrator().fit(P, y).transform(P)
    assert np.isfinite(q).all() and q[:, 0].max() < 0.05 and q[:, 1].min() > 0.95


class _Spy:
    """An expected-F1 decoder that records the rows (by their first probability) it was fitted on."""

    seen: list[set[float]] = []

    def __init__(self) -> None:
        self.inner = ExpectedF1Decoder()

    def fit(self, P: np.ndarray, y: np.ndarray) -> _Spy:
        _Spy.seen.append(set(P[:, 0].round(12)))
        self.inner.fit(P, y)
        return self

    def predict(self, P: np.ndarray) -> np.ndarray:
        return self.inner.predict(P)


def test_each_fold_is_decoded_by_a_decoder_fitted_without_it() -> None:
    P, y = _independent(600, 5, 5)
    folds = np.arange(600) % 3
    _Spy.seen = []
    nested_cv(P[None], y, folds, lambda k: build_blender(BlendConfig(method="mean"), "samples"), _Spy)
    for k, seen in zip(range(3), _Spy.seen):
        assert seen.isdisjoint(set(P[folds == k, 0].round(12)))


@pytest.mark.parametrize("decoder", [ExpectedF1Decoder, CountAwareF1Decoder])
def test_a_fold_with_its_own_calibration_gains_nothing_from_it(decoder: type) -> None:
    """Leak detector: in fold 0 the member's probabilities mean the opposite of what they mean
    elsewhere. A calibration fitted on fold 0 would learn that and score far higher; the
    honest CV of fold 0 must be what a calibration fitted on the other folds gives."""
    P, y = _independent(6_000, 6, 6)
    folds = np.arange(6_000) % 3
    P[folds == 0] = 1.0 - P[folds == 0]
    cv = nested_cv(P[None], y, folds, lambda k: build_blender(BlendConfig(method="mean"), "samples"),
                   decoder)
    te = folds == 0
    leaky = decoder().fit(P[te], y[te]).score(P[te], y[te])
    honest = decoder().fit(P[~te], y[~te]).score(P[te], y[te])
    assert cv.per_fold[0] == pytest.approx(honest) and leaky > honest + 0.1


def test_decoders_share_one_blend_fit_per_fold() -> None:
    P, y = _independent(900, 5, 7)
    folds = np.arange(900) % 3
    stack = np.stack([P, np.clip(P + 0.1, 0, 1)])
    mean = lambda k: build_blender(BlendConfig(method="mean"), "samples")  # noqa: E731
    both = nested_cv_decoders(stack, y, folds, mean, {"t": ThresholdOptimizer, "e": ExpectedF1Decoder})
    alone = nested_cv(stack, y, folds, mean, ExpectedF1Decoder)
    assert both["e"].per_fold == alone.per_fold
    np.testing.assert_array_equal(both["e"].pred, alone.pred)
    assert both["t"].mean == pytest.approx(samples_f1(y, both["t"].pred), abs=0.01)


def test_count_aware_with_the_independence_count_is_expected_f1() -> None:
    rng = np.random.default_rng(9)
    qs = -np.sort(-rng.random((7, 9)), axis=1)
    q = np.ascontiguousarray(qs.T)
    indep = _suffix_counts(q, 5, 9)[1].copy()
    _add_label(indep, q[0], lump=True)
    np.testing.assert_allclose(count_aware_f1_by_k(qs, 5, indep.T, 9), expected_f1_by_k(qs, 5, margin=9), atol=1e-12)


def test_a_learned_count_fixes_rows_whose_marginals_do_not_know_it() -> None:
    """Every row has exactly three true labels among eight, with marginals that say nothing
    about the count: the count model learns "three", and decoding with it scores higher out of
    sample than expected-F1 under independence, which spreads the count over 0..8."""
    rng = np.random.default_rng(10)
    n, L = 8_000, 8
    y = np.zeros((n, L), np.uint8)
    for r in range(n):
        y[r, rng.choice(L, 3, replace=False)] = 1
    P = np.clip(0.375 + 0.35 * (y - 0.375) + rng.normal(0, 0.2, (n, L)), 0.01, 0.99)
    fit, te = slice(0, 4_000), slice(4_000, None)
    gfm = CountAwareF1Decoder().fit(P[fit], y[fit])
    ef1 = ExpectedF1Decoder().fit(P[fit], y[fit])
    counts = gfm.count_proba(gfm.calibrator_.transform(P[te]))
    assert counts[:, 3].min() == pytest.approx(1.0)
    assert gfm.score(P[te], y[te]) > ef1.score(P[te], y[te]) + 0.005


@pytest.mark.parametrize("calibration", ["platt", "isotonic", "none"])
def test_a_saved_expected_f1_blend_decides_as_the_fitted_one(project: Path, calibration: str) -> None:
    P, y = _independent(400, 5, 8)
    stack, test = np.stack([P, P**2]), np.stack([P[:50] ** 0.5, P[:50]])
    cfg = BlendConfig(method="optuna", n_trials=4, decoder="gfm" if calibration == "none" else "expected_f1",
                      calibration=calibration)
    blender = build_blender(cfg, "samples").fit(stack, y, np.arange(400) % 3)
    decoder = build_decoder(cfg, "samples").fit(blender.oof_, y)
    save_state("tiny", "ef1", {"name": "ef1", "models": ["a", "b"]}, blender, decoder)
    state = load_state("tiny", "ef1")
    np.testing.assert_array_equal(state.predict(test), decoder.predict(blender.predict(test)))
