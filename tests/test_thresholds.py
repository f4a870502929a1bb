"""Per-label thresholds: known answers, exactness against brute force, post-rules, the benchmark's
correctness (its timings are reported by ``make bench``, not asserted: see tests/test_bench.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mmfold.errors import UserError
from mmfold.metrics import METRICS, binarize
from mmfold.ensemble.thresholds import (
    THRESHOLD_METRICS,
    ThresholdOptimizer,
    _columns,
    _global_bins,
    _Search,
)
from mmfold.bench.thresholds import benchmark, synthetic

METRIC_NAMES = ["samples", "micro", "macro"]


def small_problem(seed: int, n: int = 9, L: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Tiny noisy problem with ties (rounded probabilities) for brute-force comparisons."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, L)) < 0.4).astype(np.uint8)
    P = np.round(np.clip(0.3 * y + 0.7 * rng.random((n, L)), 0, 1), 2)
    return P, y


def score_of(P: np.ndarray, y: np.ndarray, thr: np.ndarray, metric: str, min_labels: int) -> float:
    """Reference: binarize with the library's rule and score with the library's metric."""
    return METRICS[metric](y, binarize(P, thr, min_labels))


def test_separable_labels_get_their_cut_points() -> None:
    """Positives above 0.3 / 0.6 / 0.15 and negatives below: thresholds land on those cuts."""
    rng = np.random.default_rng(0)
    cuts = np.array([0.3, 0.6, 0.15])
    y = (rng.random((3000, 3)) < 0.3).astype(np.uint8)
    y[~y.any(1), 0] = 1
    u = rng.random(y.shape)
    P = np.where(y == 1, cuts + u * (1 - cuts), u * cuts)
    opt = ThresholdOptimizer().fit(P, y)
    np.testing.assert_allclose(opt.thresholds_, cuts, atol=0.01)
    assert opt.score_ == pytest.approx(1.0)


def test_noisy_label_threshold_near_its_optimum() -> None:
    """A lone label whose F1-optimal cut is 0.3 (found by a fine scan) gets ~0.3."""
    rng = np.random.default_rng(1)
    n = 20000
    y = (rng.random((n, 1)) < 0.25).astype(np.uint8)
    P = np.clip(np.where(y == 1, rng.normal(0.45, 0.1, y.shape), rng.normal(0.15, 0.1, y.shape)), 0, 1)
    grid = np.linspace(0.01, 0.99, 981)
    scan = [METRICS["micro"](y, P >= t) for t in grid]
    best = grid[int(np.argmax(scan))]
    opt = ThresholdOptimizer(metric="micro", min_labels=0).fit(P, y)
    assert opt.thresholds_[0] == pytest.approx(best, abs=0.01)
    assert opt.score_ >= max(scan) - 1e-9


@pytest.mark.parametrize("metric", METRIC_NAMES)
@pytest.mark.parametrize("min_labels", [0, 1])
def test_vectorised_candidate_scores_equal_brute_force(metric: str, min_labels: int) -> None:
    """The bincount/cumsum scores of every candidate equal a full recomputation with metrics."""
    objective = THRESHOLD_METRICS.get(metric)
    for seed in range(5):
        P, y = small_problem(seed, n=12, L=4)
        rng = np.random.default_rng(seed)
        thr = rng.choice(P.ravel(), size=4)
        s = _Search.start(P, y.astype(bool), min_labels >= 1, 0.5)
        for j in range(4):
            s.set_label(j, thr[j])
        for j in range(4):
            cands = np.unique(np.append(P[:, j], 2.0))
            got = objective.label_scorer(s, j)(np.searchsorted(cands, P[:, j], side="right"), len(cands))
            want = [score_of(P, y, np.where(np.arange(4) == j, c, thr), metric, min_labels) for c in cands]
            np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("metric", METRIC_NAMES)
@pytest.mark.parametrize("min_labels", [0, 1])
def test_global_scores_equal_brute_force(metric: str, min_labels: int) -> None:
    """One threshold for every label: vectorised scores equal recomputation."""
    P, y = small_problem(3, n=15, L=4)
    cands = np.unique(P)
    bins = _global_bins(P, _columns(P, y.astype(bool)), cands, min_labels >= 1)
    got = THRESHOLD_METRICS.get(metric).global_scores(bins, y.astype(bool), len(cands))
    want = [score_of(P, y, np.full(4, c), metric, min_labels) for c in cands]
    np.testing.assert_allclose(got, want, atol=1e-12)


def brute_force_best(P: np.ndarray, y: np.ndarray, metric: str, min_labels: int) -> float:
    """Exhaustive search over every combination of per-label thresholds."""
    options = [np.append(np.unique(P[:, j]), np.inf) for j in range(P.shape[1])]
    return max(score_of(P, y, np.array(t), metric, min_labels) for t in itertools.product(*options))


@pytest.mark.parametrize("metric", METRIC_NAMES)
def test_fit_matches_exhaustive_search(metric: str) -> None:
    """Without the fallback coupling labels, the search finds the global optimum."""
    for seed in range(8):
        P, y = small_problem(seed)
        opt = ThresholdOptimizer(metric=metric, min_labels=0, n_rounds=10).fit(P, y)
        assert opt.score_ == pytest.approx(brute_force_best(P, y, metric, 0), abs=1e-12), seed


@pytest.mark.parametrize("metric", METRIC_NAMES)
def test_fit_is_coordinatewise_optimal_with_fallback(metric: str) -> None:
    """With min_labels=1, no single label's threshold can be moved to score higher, and the
    result is never above the exhaustive optimum (which would mean a scoring bug)."""
    for seed in range(6):
        P, y = small_problem(seed)
        opt = ThresholdOptimizer(metric=metric, min_labels=1, n_rounds=10).fit(P, y)
        assert opt.score_ <= brute_force_best(P, y, metric, 1) + 1e-12
        for j in range(P.shape[1]):
            for c in np.append(np.unique(P[:, j]), np.inf):
                thr = opt.thresholds_.copy()
                thr[j] = c
                assert score_of(P, y, thr, metric, 1) <= opt.score_ + 1e-12


@pytest.mark.parametrize("metric", METRIC_NAMES)
@pytest.mark.parametrize("min_labels", [0, 1])
def test_search_score_is_the_score_of_predict(metric: str, min_labels: int) -> None:
    """The incremental bookkeeping ends where a fresh evaluation of predict() does, and the
    search beats the single global threshold and 0.5."""
    P, y = synthetic(3000, 15, seed=2)
    opt = ThresholdOptimizer(metric=metric, min_labels=min_labels).fit(P, y)
    assert opt.search_score_ == pytest.approx(opt.score_, abs=1e-9)
    assert opt.score_ == pytest.approx(METRICS[metric](y, opt.predict(P)), abs=1e-12)
    assert opt.score_ > score_of(P, y, np.full(15, opt.global_threshold_), metric, min_labels)
    assert opt.score_ > score_of(P, y, np.full(15, 0.5), metric, min_labels)


def test_ties_and_many_labels_are_scored_like_binarize() -> None:
    """Rounded probabilities (many ties, incl. within a row) and L > 16, where a non-stable
    sort could pick another argmax than the search assumes."""
    rng = np.random.default_rng(4)
    y = (rng.random((1000, 40)) < 0.1).astype(np.uint8)
    P = np.round(rng.random(y.shape) * 0.3 + 0.1 * y, 1)  # many rows whose maximum is tied
    for metric in METRIC_NAMES:
        opt = ThresholdOptimizer(metric=metric, min_labels=1).fit(P, y)
        assert opt.search_score_ == pytest.approx(opt.score_, abs=1e-12)
    # the fallback label the search models (argmax: first of tied maxima) is the one applied
    fallback = binarize(P, 2.0, min_labels=1)
    np.testing.assert_array_equal(fallback.argmax(1), P.argmax(1))
    assert (fallback.sum(1) == 1).all()


def fitted(thresholds: list[float], **kw: int) -> ThresholdOptimizer:
    """An optimizer with given thresholds (predict needs only ``thresholds_``)."""
    opt = ThresholdOptimizer(**kw)
    opt.thresholds_ = np.asarray(thresholds)
    return opt


P_RULES = np.array([[0.9, 0.8, 0.7, 0.1],
                    [0.2, 0.3, 0.1, 0.05],
                    [0.6, 0.1, 0.55, 0.9]])


def test_min_labels_takes_the_argmax_when_nothing_passes() -> None:
    pred = fitted([0.5] * 4).predict(P_RULES)
    np.testing.assert_array_equal(pred[1], [0, 1, 0, 0])
    assert fitted([0.5] * 4, min_labels=0).predict(P_RULES)[1].sum() == 0
    two = fitted([0.5] * 4, min_labels=2).predict(P_RULES)
    np.testing.assert_array_equal(two[1], [1, 1, 0, 0])


def test_max_labels_keeps_the_most_probable_passing_labels() -> None:
    pred = fitted([0.5] * 4, max_labels=2).predict(P_RULES)
    np.testing.assert_array_equal(pred, [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 1]])


def test_top_k_outputs_exactly_k_labels() -> None:
    pred = fitted([0.99] * 4, top_k=3).predict(P_RULES)
    np.testing.assert_array_equal(pred.sum(1), [3, 3, 3])
    np.testing.assert_array_equal(pred[2], [1, 0, 1, 1])


def test_post_rules_hold_after_fit() -> None:
    P, y = synthetic(2000, 10, seed=3)
    pred = ThresholdOptimizer(min_labels=2, max_labels=3).fit(P, y).predict(P)
    assert pred.sum(1).min() >= 2 and pred.sum(1).max() <= 3


def test_contradictory_rules_and_unknown_metric_are_refused() -> None:
    P, y = synthetic(100, 4)
    with pytest.raises(UserError, match="max_labels"):
        ThresholdOptimizer(min_labels=2, max_labels=1).fit(P, y)
    with pytest.raises(UserError, match="threshold metric"):
        ThresholdOptimizer(metric="accuracy").fit(P, y)


def test_benchmark_quick_is_no_worse_than_the_sklearn_loop() -> None:
    """The bench section's correctness: same run, own baseline, both F1s. How much faster it
    is depends on the machine's load, so the ratio is measured and reported by ``make bench``
    (``speedup`` against ``speedup_target``), never asserted here."""
    r = benchmark(quick=True, baseline_labels=2)
    assert r["replica_agrees_with_sklearn"]  # the replica giving the all-label baseline F1
    assert r["ours_f1"] >= r["baseline_f1"] - 1e-9
    assert r["baseline_time_extrapolated"] and r["baseline_labels_timed"] == 2
    assert r["baseline_seconds"] == pytest.approx(3 * r["baseline_seconds_measured"], rel=1e-2)


def test_column_bins_equal_searchsorted_with_ties() -> None:
    """The sorted-column shortcut counts candidates <= each cell exactly, ties included."""
    P, y = small_problem(5, n=200, L=6)  # rounded: many ties
    cols = _columns(P, y.astype(bool))
    cands = np.unique(np.concatenate([P[::7, 0], [-1.0, 0.5, 2.0]]))
    for j, col in enumerate(cols):
        np.testing.assert_array_equal(col.bins(cands), np.searchsorted(cands, P[:, j], side="right"))
        np.testing.assert_array_equal(col.values, np.sort(P[:, j]))
