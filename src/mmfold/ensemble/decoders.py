"""Decoders: how a blend's probabilities become each row's predicted label set.

``blend.decoder`` names one of :data:`DECODERS`; every decoder is an sklearn-style estimator
(``fit(P, y)`` returns self, ``predict(P)`` a 0/1 matrix, ``score_`` its in-sample metric) and
:func:`build_decoder` is the one place ``blend.*`` turns into one, for the blend, its nested
CV and every model's honest CV alike.

- ``thresholds``: one cut-off per label (:class:`~mmfold.ensemble.thresholds.ThresholdOptimizer`),
  what every public pipeline does; any metric.
- ``expected_f1``: per row, the label set with the highest *expected* samples-F1 given the
  row's calibrated marginals. Under label independence that set is the top-k labels by
  probability for some k (Lewis 1995; Ye et al., ICML 2012), and the expected F1 of every k
  is computed exactly from the Poisson-binomial distributions of the true-label counts inside
  and outside the top k (:func:`expected_f1_by_k`). It adapts k per row: a confident row gets
  one label, an ambiguous one two or three, which no fixed per-label threshold can express.
- ``gfm``: the same with the number of true labels per row learned out of fold instead of
  implied by independence (:class:`CountAwareF1Decoder`): pays where label counts are
  structured (fashion: 95 % of rows have exactly seven tags).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np

from mmfold.config import BlendConfig
from mmfold.errors import UserError
from mmfold.machine import available_cores
from mmfold.metrics import METRICS
from mmfold.registry import Registry
from mmfold.ensemble.calibration import CALIBRATORS
from mmfold.ensemble.thresholds import ThresholdOptimizer, _check_xy, _top_k, check_post_rules

DECODERS = Registry("blend decoder")

ROW_CHUNK = 8192  # rows decoded at once: bounds the (rows, k, count) temporaries
COUNT_MARGIN = 10  # true labels counted outside the top k: k_max + this (the rest lumped)


@runtime_checkable
class Decoder(Protocol):
    """What :mod:`mmfold.ensemble.nested` and the blend's saved state need of a decoder."""

    metric: str
    min_labels: int
    max_labels: int | None
    top_k: int | None
    score_: float

    def fit(self, P: np.ndarray, y: np.ndarray) -> Self: ...

    def predict(self, P: np.ndarray) -> np.ndarray: ...


def threshold_params(cfg: BlendConfig, metric: str) -> dict[str, Any]:
    """The metric and post-rules every decoder shares (the :class:`ThresholdOptimizer`
    arguments the blenders' objectives use too), from ``blend.*`` and the competition metric."""
    return {"metric": metric, "min_labels": cfg.min_labels, "max_labels": cfg.max_labels,
            "top_k": cfg.top_k}


def build_decoder(cfg: BlendConfig, metric: str) -> Decoder:
    """An unfitted decoder for ``blend.decoder`` (a fresh one per fit: nothing is shared)."""
    return DECODERS.get(cfg.decoder)(cfg, metric)


@DECODERS.register("thresholds")
def _thresholds(cfg: BlendConfig, metric: str) -> ThresholdOptimizer:
    return ThresholdOptimizer(**threshold_params(cfg, metric))


@DECODERS.register("expected_f1")
def _expected_f1(cfg: BlendConfig, metric: str) -> ExpectedF1Decoder:
    return ExpectedF1Decoder(calibration=cfg.calibration, **threshold_params(cfg, metric))


class ExpectedF1Decoder:
    """Per row, the top-k label set maximising expected samples-F1 (sklearn-style).

    Args:
        metric: Must be ``samples``: the decoder maximises the expectation of that metric.
        calibration: A :data:`~mmfold.ensemble.calibration.CALIBRATORS` name, fitted per label
            on the rows given to :meth:`fit` (out-of-fold probabilities).
        min_labels: Every row gets at least this many labels (k is searched from here).
        max_labels: At most this many labels per row (k is searched up to here).
        top_k: If set, exactly ``top_k`` labels per row (the calibrated top k).
        k_max: Largest k searched; default: one more than the most labels any training row has.

    Attributes:
        calibrator_: The fitted calibrator.
        k_max_: The largest label-set size considered.
        score_: In-sample samples-F1 of :meth:`predict` on the training rows.
    """

    def __init__(self, metric: str = "samples", calibration: str = "platt", min_labels: int = 1,
                 max_labels: int | None = None, top_k: int | None = None,
                 k_max: int | None = None) -> None:
        self.metric = metric
        self.calibration = calibration
        self.min_labels = min_labels
        self.max_labels = max_labels
        self.top_k = top_k
        self.k_max = k_max

    def fit(self, P: np.ndarray, y: np.ndarray) -> ExpectedF1Decoder:
        """Calibrate per label on ``(P, y)`` and fix the range of k."""
        P, y = _check_xy(P, y)
        if self.metric != "samples":
            raise UserError(f"blend.decoder=expected_f1 maximises samples-F1, but the metric is "
                            f"{self.metric}; use blend.decoder=thresholds")
        check_post_rules(self.min_labels, self.max_labels, self.top_k)
        self.calibrator_ = CALIBRATORS.get(self.calibration)().fit(P, y)
        k_max = self.k_max or int(y.sum(1).max()) + 1
        self.k_max_ = int(min(P.shape[1], k_max, self.max_labels or k_max))
        self._fit_decision(self.calibrator_.transform(P), y)
        self.score_ = self.score(P, y)
        return self

    def _fit_decision(self, q: np.ndarray, y: np.ndarray) -> None:
        """Anything else the decision learns from the calibrated rows (nothing here)."""

    def predict(self, P: np.ndarray) -> np.ndarray:
        """0/1 matrix: each row's calibrated top k, k maximising its expected F1."""
        P, _ = _check_xy(P)
        q = self.calibrator_.transform(P)
        if self.top_k:
            return _top_k(q, self.top_k).astype(np.uint8)
        out = np.zeros(q.shape, np.uint8)
        k_min = min(max(self.min_labels, 1), q.shape[1])
        k_max = max(self.k_max_, k_min)

        def chunk(lo: int) -> None:
            out[lo : lo + ROW_CHUNK] = _decode(q[lo : lo + ROW_CHUNK], k_min, k_max, self._f1_by_k)

        # chunks are independent and NumPy releases the GIL in the array updates
        with ThreadPoolExecutor(max_workers=available_cores()) as pool:
            list(pool.map(chunk, range(0, len(q), ROW_CHUNK)))
        return out

    def score(self, P: np.ndarray, y: np.ndarray) -> float:
        """Samples-F1 of :meth:`predict` against ``y``."""
        return float(METRICS[self.metric](y, self.predict(P)))

    def _f1_by_k(self, qs: np.ndarray, k_max: int) -> np.ndarray:
        """Expected F1 of each top-k set of sorted probabilities (independent labels)."""
        return expected_f1_by_k(qs, k_max)


def _decode(q: np.ndarray, k_min: int, k_max: int,
            f1_by_k: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """Top-k sets of one chunk of rows, k the expected-F1 maximiser in ``[k_min, k_max]``."""
    order = np.argsort(-q, axis=1, kind="stable")
    qs = np.take_along_axis(q, order, axis=1)
    f = f1_by_k(qs, k_max)
    k = k_min + np.argmax(f[:, k_min - 1 :], axis=1)  # first (smallest) k on ties
    keep = np.arange(q.shape[1])[None, :] < k[:, None]
    out = np.zeros(q.shape, np.uint8)
    np.put_along_axis(out, order, keep.astype(np.uint8), axis=1)
    return out


def expected_f1_by_k(qs: np.ndarray, k_max: int, margin: int = COUNT_MARGIN) -> np.ndarray:
    """``(rows, k_max)``: expected samples-F1 of predicting the top k, k = 1..k_max.

    ``qs`` holds each row's probabilities sorted in decreasing order, read as independent
    Bernoulli marginals. With ``A`` the true labels inside the top k (at most k) and ``B``
    those outside, F1 = 2A / (k + A + B), so E[F1] = sum over (a, b) of
    P(A=a) P(B=b) 2a / (k + a + b): two Poisson-binomial distributions, built by the usual
    one-label-at-a-time convolution, A from the top and B from the bottom of the order. B is
    counted exactly up to ``k_max + margin`` and the rare rest lumped into that last count,
    which is what keeps a row O(L * (k_max + margin)) instead of O(L^2). Distributions are
    laid out ``(count, rows)`` so every update runs over contiguous memory.
    """
    n, L = qs.shape
    q = np.ascontiguousarray(qs.T)  # (L, n): one contiguous row per sorted position
    cap = min(L, k_max + margin)
    B_at = _suffix_counts(q, k_max, cap)  # B_at[k]: distribution of B for the top-k set
    A = np.zeros((k_max + 1, n))
    A[0] = 1.0
    f = np.empty((n, k_max))
    for k in range(1, k_max + 1):
        _add_label(A[: k + 1], q[k - 1])
        f[:, k - 1] = np.einsum("an,an->n", _f1_weights(k, cap).T @ A[: k + 1], B_at[k])
    return f


def _add_label(D: np.ndarray, p: np.ndarray, lump: bool = False) -> None:
    """In place: count distribution ``D`` ``(counts, rows)`` after one more Bernoulli(p)
    label; the last count stays put when ``lump`` (it stands for "that many or more")."""
    d = D[:-1] - D[1:]  # new[c] = old[c] + p (old[c-1] - old[c])
    if lump:
        d[-1] += D[-1]
    d *= p
    D[1:] += d
    D[0] -= p * D[0]


def _f1_weights(k: int, cap: int) -> np.ndarray:
    """``(k + 1, cap + 1)``: F1 = 2a / (k + a + b) for a true labels in and b out of the set."""
    a = np.arange(k + 1)[:, None]
    b = np.arange(cap + 1)[None, :]
    return 2.0 * a / (k + a + b)


def _suffix_counts(q: np.ndarray, k_max: int, cap: int) -> dict[int, np.ndarray]:
    """Distribution ``(cap + 1, rows)`` of true labels among sorted positions k..L-1, for each
    k in 1..k_max, counted 0..cap with everything above ``cap`` lumped into ``cap``."""
    L, n = q.shape
    B = np.zeros((cap + 1, n))
    B[0] = 1.0
    out: dict[int, np.ndarray] = {}
    if L <= k_max:
        out[L] = B.copy()
    for pos in range(L - 1, 0, -1):  # after this step B covers positions pos..L-1
        _add_label(B, q[pos], lump=True)
        if pos <= k_max:
            out[pos] = B.copy()
    return out


# ------------------------------------------------------------------------------- count-aware


@DECODERS.register("gfm")
def _gfm(cfg: BlendConfig, metric: str) -> CountAwareF1Decoder:
    return CountAwareF1Decoder(calibration=cfg.calibration, **threshold_params(cfg, metric))


class CountAwareF1Decoder(ExpectedF1Decoder):
    """Expected-F1 decoding with the number of true labels per row learned, not assumed.

    The General F-Measure Maximizer (Dembczynski et al., NeurIPS 2011) needs, per row,
    ``P(y_i = 1, |y| = s)``. Here it is ``q_i P(N_-i = s - 1)`` (calibrated marginals, the
    other labels' count under independence) reweighted per ``s`` so that the count follows a
    multinomial model of ``|y|`` fitted on the same out-of-fold rows (features: the row's
    sorted calibrated probabilities and their sum). With that model replaced by the
    independence count it is exactly :class:`ExpectedF1Decoder`. Candidate sets are the
    top-k by marginal, as there.

    Attributes (besides the parent's):
        count_coef_, count_intercept_: the count model's softmax parameters.
        count_classes_: the counts it predicts (0..cap, the last one "cap or more").
    """

    def _fit_decision(self, q: np.ndarray, y: np.ndarray) -> None:
        """The count model, on the calibrated training rows."""
        from sklearn.linear_model import LogisticRegression

        cap = min(q.shape[1], self.k_max_ + COUNT_MARGIN)
        counts = np.minimum(y.sum(1), cap)
        X = self._count_features(q)
        self.count_cap_ = int(cap)
        self.count_classes_ = np.unique(counts).astype(np.int64)
        if len(self.count_classes_) == 1:  # every row has the same count: a constant model
            self.count_coef_, self.count_intercept_ = np.zeros((1, X.shape[1])), np.zeros(1)
            return
        lr = LogisticRegression(C=1.0, max_iter=1000).fit(X, counts)
        self.count_coef_, self.count_intercept_ = np.asarray(lr.coef_), np.asarray(lr.intercept_)
        if len(self.count_classes_) == 2:  # sklearn's binary form: one row for class 1
            self.count_coef_ = np.vstack([np.zeros_like(self.count_coef_), self.count_coef_])
            self.count_intercept_ = np.concatenate([[0.0], self.count_intercept_])

    def _count_features(self, q: np.ndarray) -> np.ndarray:
        """A row's sorted calibrated probabilities (the top ``k_max + 2``) and their sum."""
        m = min(q.shape[1], self.k_max_ + 2)
        top = -np.partition(-q, m - 1, axis=1)[:, :m]
        return np.hstack([-np.sort(-top, axis=1), q.sum(1, keepdims=True)])

    def count_proba(self, q: np.ndarray) -> np.ndarray:
        """``(rows, cap + 1)``: the learned distribution of each row's number of true labels."""
        z = self._count_features(q) @ self.count_coef_.T + self.count_intercept_
        z = np.exp(z - z.max(1, keepdims=True))
        out = np.zeros((len(q), self.count_cap_ + 1))
        out[:, self.count_classes_] = z / z.sum(1, keepdims=True)
        return out

    def _f1_by_k(self, qs: np.ndarray, k_max: int) -> np.ndarray:
        return count_aware_f1_by_k(qs, k_max, self.count_proba(qs), self.count_cap_)


def count_aware_f1_by_k(qs: np.ndarray, k_max: int, count_p: np.ndarray, cap: int) -> np.ndarray:
    """``(rows, k_max)``: E[F1] of each top-k set when ``|y|`` follows ``count_p``.

    E[F1(top k)] = sum over s of 2 / (k + s) * sum over i < k of P(y_i = 1, N = s), and
    P(y_i = 1, N = s) = q_i P(N_-i = s - 1) * count_p[s] / P_indep(N = s): the label's share
    of count s under independence, times the learned probability of count s. ``P(N_-i)``
    comes from the count distributions before and after position i (prefix and suffix
    dynamic programmes, counts above ``cap`` lumped into ``cap``).
    """
    n, L = qs.shape
    q = np.ascontiguousarray(qs.T)
    B_at = _suffix_counts(q, k_max, cap)  # positions k..L-1
    full = B_at[1].copy()
    _add_label(full, q[0], lump=True)  # P_indep(N = s), all labels
    ratio = np.ascontiguousarray(count_p.T) / np.maximum(full, 1e-300)
    F = np.zeros((cap + 1, n))
    F[0] = 1.0  # count distribution of positions < i
    joint = np.zeros((cap + 1, n))  # running sum over i < k of P(y_i = 1, N = s)
    f = np.empty((n, k_max))
    s = np.arange(cap + 1)[:, None]
    for k in range(1, k_max + 1):
        i = k - 1
        loo = _convolve_capped(F, B_at[k])  # P(N_-i = t)
        joint[1:] += q[i] * loo[:-1]
        joint[cap] += q[i] * loo[cap]  # "cap or more" stays there with label i true
        f[:, k - 1] = (2.0 / (k + np.maximum(s, 1)) * joint * ratio).sum(0)
        _add_label(F, q[i], lump=True)
    return f


def _convolve_capped(F: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Distribution of the sum of two independent counts ``(cap + 1, rows)``, the top count
    holding "cap or more"."""
    cap = len(F) - 1
    out = np.zeros_like(F)
    for u in range(cap + 1):
        out[u:] += F[u] * G[: cap + 1 - u]
        out[cap] += F[u] * G[cap + 1 - u :].sum(0)
    return out
