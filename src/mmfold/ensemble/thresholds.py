"""Per-label decision thresholds, fitted by vectorised coordinate ascent.

Multi-label F1 rewards a different cut-off per label: a rare label needs a low threshold, a
label the models over-predict a high one. :class:`ThresholdOptimizer` starts from the best
single global threshold and then, label by label, moves each threshold to the candidate that
maximises the chosen F1 with every other threshold held fixed, for a few rounds.

Why it is fast: with label ``j``'s threshold free, every row is in one of two states, "j
predicted" or not, and a candidate threshold ``t`` turns on exactly the rows with
``P[:, j] >= t``. Each row's F1 (or its contribution to pooled counts) in both states is known
from per-row true-positive and prediction counts that are kept up to date, so the score of
*all* candidates of one label is one ``bincount`` plus a reversed cumulative sum: O(n + K)
per label instead of O(n * L * K). The ``min_labels=1`` fallback (argmax when nothing passes)
is modelled exactly, so the search optimises the score the submission will get.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmfold.errors import UserError
from mmfold.machine import available_cores
from mmfold.metrics import METRICS, binarize
from mmfold.registry import Registry

SORT_THREADS = 4  # threads sorting label columns (capped by the machine's cores)

# metric name -> objective class with ``global_scores`` and ``label_scorer``
THRESHOLD_METRICS = Registry("threshold metric")

# scores of every candidate of one label, given each row's candidate bin and the candidate count
Scorer = Callable[[np.ndarray, int], np.ndarray]


def _f1(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray | float) -> np.ndarray:
    """Elementwise F1 from counts; 0 where there is nothing true and nothing predicted."""
    denom = n_pred + n_true
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1e-12), 0.0)


def _cut_sums(bins: np.ndarray, weights: np.ndarray, n_cands: int) -> np.ndarray:
    """For each candidate k, the sum of ``weights`` over rows with ``bins > k``.

    ``bins[r]`` is how many candidates are <= the row's probability, so row r passes
    candidate k exactly when ``k < bins[r]``.
    """
    h = np.bincount(bins, weights=weights, minlength=n_cands + 1)
    return np.cumsum(h[::-1])[::-1][1:]


def _cut_sums_2d(bins: np.ndarray, cols: np.ndarray, weights: np.ndarray, n_cands: int,
                 n_cols: int) -> np.ndarray:
    """:func:`_cut_sums` per column: ``(n_cands, n_cols)``."""
    h = np.bincount(bins * n_cols + cols, weights=weights, minlength=(n_cands + 1) * n_cols)
    h = h.reshape(n_cands + 1, n_cols)
    return np.cumsum(h[::-1], axis=0)[::-1][1:]


@dataclass
class _Search:
    """Arrays the search keeps up to date while it moves one threshold at a time."""

    P: np.ndarray  # (n, L) probabilities
    y: np.ndarray  # (n, L) bool
    fallback: bool  # min_labels >= 1: an empty row gets its argmax
    thr: np.ndarray  # (L,) current thresholds
    pred: np.ndarray  # (n, L) bool, P >= thr (before the fallback)
    cnt: np.ndarray  # (n,) predicted labels per row
    tp: np.ndarray  # (n,) true positives per row
    top: np.ndarray  # (n,) argmax label of each row
    y_top: np.ndarray  # (n,) whether the argmax label is true
    col_np: np.ndarray  # (L,) predictions per label (before the fallback)
    col_tp: np.ndarray  # (L,) true positives per label (before the fallback)
    n_true: np.ndarray  # (n,) true labels per row (fixed)
    col_true: np.ndarray  # (L,) true rows per label (fixed)

    @classmethod
    def start(cls, P: np.ndarray, y: np.ndarray, fallback: bool, t: float) -> _Search:
        """All thresholds at ``t``; column-major copies so one label's column is contiguous."""
        P, y = np.asfortranarray(P), np.asfortranarray(y)
        top, pred = P.argmax(1), np.asfortranarray(P >= t)
        hit = pred & y
        return cls(P, y, fallback, np.full(P.shape[1], t), pred, pred.sum(1), hit.sum(1), top,
                   y[np.arange(len(y)), top].astype(float), pred.sum(0).astype(float),
                   hit.sum(0).astype(float), y.sum(1).astype(float),
                   y.sum(0).astype(float))

    def set_label(self, j: int, t: float) -> None:
        """Move label j's threshold to ``t`` and update the counts."""
        new = self.P[:, j] >= t
        diff = new.astype(np.int64) - self.pred[:, j]
        self.cnt += diff
        self.tp += diff * self.y[:, j]
        self.col_np[j] = new.sum()
        self.col_tp[j] = (new & self.y[:, j]).sum()
        self.pred[:, j] = new
        self.thr[j] = t


@dataclass
class _Move:
    """Each row's counts with label j off and on, the fallback included."""

    tp_off: np.ndarray
    np_off: np.ndarray
    tp_on: np.ndarray
    np_on: np.ndarray
    orphan: np.ndarray  # rows with no other label passing: the fallback fires when j is off


def _move(s: _Search, j: int) -> _Move:
    """Row states for label j; an orphan row predicts its argmax when j is off."""
    pj, yj = s.pred[:, j], s.y[:, j]
    cnt0 = s.cnt - pj
    tp0 = s.tp - (pj & yj)
    orphan = (cnt0 == 0) if s.fallback else np.zeros(len(cnt0), bool)
    return _Move(np.where(orphan, s.y_top, tp0), np.where(orphan, 1, cnt0),
                 tp0 + yj, cnt0 + 1.0, orphan)


def _global_bins(P: np.ndarray, cols: list[_Column], cands: np.ndarray, fallback: bool
                 ) -> np.ndarray:
    """Candidate bins of every cell; argmax cells always pass under the fallback.

    With one threshold for all labels, a non-empty row always contains its argmax, and an empty
    row gets it from the fallback, so "argmax always on" is exact. Bins come from the sorted
    columns (O(n + K) per label), not from ``searchsorted`` over every cell.
    """
    bins = np.empty(P.shape, np.int64)
    for j, col in enumerate(cols):
        bins[:, j] = col.bins(cands)
    if fallback:
        bins[np.arange(len(P)), P.argmax(1)] = len(cands)
    return bins


def _column_counts(bins: np.ndarray, y: np.ndarray, n_cands: int) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate and label: true positives and predictions, both ``(K, L)``."""
    L = y.shape[1]
    cols = np.broadcast_to(np.arange(L), bins.shape).ravel()
    b = bins.ravel()
    n_pred = _cut_sums_2d(b, cols, np.ones(b.size), n_cands, L)
    tp = _cut_sums_2d(b, cols, y.ravel().astype(float), n_cands, L)
    return tp, n_pred


def _row_f1_sums(bins: np.ndarray, y: np.ndarray, n_cands: int) -> np.ndarray:
    """Sum over rows of each row's F1, for every global candidate."""
    n, L = y.shape
    idx = (np.arange(n)[:, None] * (n_cands + 1) + bins).ravel()
    size = n * (n_cands + 1)
    # cells passing candidate k = all cells minus those in bins 0..k
    hist = np.bincount(idx, minlength=size).reshape(n, -1)
    n_pred = L - np.cumsum(hist, axis=1)[:, :-1]
    hist = np.bincount(idx, weights=y.ravel(), minlength=size).reshape(n, -1)
    n_true = y.sum(1)[:, None]
    tp = n_true - np.cumsum(hist, axis=1)[:, :-1]
    return _f1(tp, n_pred, n_true).sum(0)


@THRESHOLD_METRICS.register("samples")
class _SamplesObjective:
    """Mean per-row F1: the competition metric."""

    @staticmethod
    def global_scores(bins: np.ndarray, y: np.ndarray, n_cands: int) -> np.ndarray:
        """Score of every global candidate via per-row histograms, in chunks of rows so the
        ``(rows, K+1)`` tables stay small."""
        total = np.zeros(n_cands)
        for start in range(0, len(y), 20_000):
            total += _row_f1_sums(bins[start : start + 20_000], y[start : start + 20_000], n_cands)
        return total / len(y)

    @staticmethod
    def label_scorer(s: _Search, j: int) -> Scorer:
        """Candidate scores of label j: base F1 plus the gains of the rows turned on."""
        m = _move(s, j)
        f_off = _f1(m.tp_off, m.np_off, s.n_true)
        gain = _f1(m.tp_on, m.np_on, s.n_true) - f_off
        base, n = f_off.sum(), len(f_off)
        return lambda bins, k: (base + _cut_sums(bins, gain, k)) / n


@THRESHOLD_METRICS.register("micro")
class _MicroObjective:
    """F1 of all (row, label) cells pooled."""

    @staticmethod
    def global_scores(bins: np.ndarray, y: np.ndarray, n_cands: int) -> np.ndarray:
        """Pooled counts per candidate."""
        tp, n_pred = _column_counts(bins, y, n_cands)
        return _f1(tp.sum(1), n_pred.sum(1), float(y.sum()))

    @staticmethod
    def label_scorer(s: _Search, j: int) -> Scorer:
        """Pooled counts change by each turned-on row's delta."""
        m, n_true = _move(s, j), s.n_true.sum()
        d_tp, d_np = m.tp_on - m.tp_off, m.np_on - m.np_off
        tp0, np0 = m.tp_off.sum(), m.np_off.sum()
        return lambda bins, k: _f1(tp0 + _cut_sums(bins, d_tp, k),
                                   np0 + _cut_sums(bins, d_np, k), n_true)


@THRESHOLD_METRICS.register("macro")
class _MacroObjective:
    """Unweighted mean of per-label F1."""

    @staticmethod
    def global_scores(bins: np.ndarray, y: np.ndarray, n_cands: int) -> np.ndarray:
        """Per-label counts per candidate, averaged over labels."""
        tp, n_pred = _column_counts(bins, y, n_cands)
        return _f1(tp, n_pred, y.sum(0)[None, :].astype(float)).mean(1)

    @staticmethod
    def label_scorer(s: _Search, j: int) -> Scorer:
        """Column j gains the turned-on rows; an orphan's fallback column loses them."""
        m, (n, L) = _move(s, j), s.y.shape
        col_np, col_tp = _off_columns(s, j, m)
        same = m.orphan & (s.top == j)  # fallback already predicts j: turning j on changes nothing
        other = m.orphan & ~same
        rows = np.concatenate([np.arange(n), np.nonzero(other)[0]])
        cols = np.concatenate([np.full(n, j), s.top[other]])
        w_np = np.concatenate([(~same).astype(float), -np.ones(other.sum())])
        w_tp = np.concatenate([s.y[:, j] * ~same, -s.y_top[other]])
        col_true = s.col_true[None, :]

        def scores(bins: np.ndarray, k: int) -> np.ndarray:
            b = bins[rows]
            d_np, d_tp = _cut_sums_2d(b, cols, w_np, k, L), _cut_sums_2d(b, cols, w_tp, k, L)
            return _f1(col_tp + d_tp, col_np + d_np, col_true).mean(1)

        return scores


def _off_columns(s: _Search, j: int, m: _Move) -> tuple[np.ndarray, np.ndarray]:
    """Per-label prediction and true-positive counts with label j off, fallback included."""
    L = s.y.shape[1]
    col_np, col_tp = s.col_np.copy(), s.col_tp.copy()
    col_np[j] = col_tp[j] = 0.0
    col_np += np.bincount(s.top[m.orphan], minlength=L)
    col_tp += np.bincount(s.top[m.orphan], weights=s.y_top[m.orphan], minlength=L)
    return col_np, col_tp


def _global_candidates(P: np.ndarray, n_candidates: int) -> np.ndarray:
    """Quantiles of all probabilities (data values), plus one above the maximum (predict none)."""
    flat = P.ravel()
    sample = flat[:: max(1, flat.size // 200_000)]  # quantiles of a strided sample: plenty
    q = np.quantile(sample, np.linspace(0.0, 1.0, n_candidates), method="inverted_cdf")
    return np.unique(np.append(q, np.nextafter(P.max(), np.inf)))


def _quantiles(sorted_values: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` evenly spaced order statistics (all values when there are fewer)."""
    n = len(sorted_values)
    if n == 0:
        return sorted_values
    return sorted_values[np.linspace(0, n - 1, min(n, k)).round().astype(np.int64)]


def _label_candidates(col: np.ndarray, pos: np.ndarray, k: int, current: float) -> np.ndarray:
    """Label j's candidates: quantiles of its probabilities and of its positives' probabilities
    (a rare label's best cut lies in the tail, where plain quantiles are sparse), "predict
    none", and the current threshold, which makes each step monotone: a threshold only moves
    when the score strictly improves."""
    extra = [np.nextafter(col[-1], np.inf), current]
    return np.unique(np.concatenate([_quantiles(col, k), _quantiles(pos, k), extra]))


def _refine_candidates(col: np.ndarray, cands: np.ndarray, k: int, n: int, current: float
                       ) -> np.ndarray:
    """Up to ``n`` data values between the neighbours of the best coarse candidate ``k``."""
    lo = np.searchsorted(col, cands[max(k - 1, 0)], side="right")
    hi = np.searchsorted(col, cands[min(k + 1, len(cands) - 1)], side="left")
    return np.unique(np.concatenate([_quantiles(col[lo:hi], n), [cands[k], current]]))


def _relax(col_sorted: np.ndarray, t: float) -> float:
    """Lower ``t`` halfway to the next smaller training value: the same rows pass, but a test
    probability just under the smallest passing training value is not cut off by a hair."""
    i = int(np.searchsorted(col_sorted, t, side="left"))
    if i == 0:
        return float(t)
    prev = float(col_sorted[i - 1])
    mid = (prev + float(t)) / 2.0
    return mid if prev < mid < t else float(t)


@dataclass
class _Column:
    """One label's probabilities sorted, each row's rank in that order, and the positives'."""

    values: np.ndarray  # sorted probabilities
    rank: np.ndarray  # rank[r] = position of row r in ``values``
    pos: np.ndarray  # sorted probabilities of the rows where the label is true

    def bins(self, cands: np.ndarray) -> np.ndarray:
        """Per row, how many candidates are <= its probability.

        Same as ``searchsorted(cands, P[:, j], "right")`` but from K searches in the sorted
        column and one gather, not n searches: the dominant cost of the whole fit otherwise.
        """
        n = len(self.values)
        first = np.searchsorted(self.values, cands, side="left")  # first row >= each candidate
        return np.cumsum(np.bincount(first, minlength=n + 1)[:n])[self.rank]


def _columns(P: np.ndarray, y: np.ndarray) -> list[_Column]:
    """Sort every label's column once per fit, labels spread over a few threads.

    The sorts are most of a fit's time at scale (200,000 rows x 200 labels); NumPy releases
    the GIL while sorting and gathering, so threads use every core without copying ``P``.
    Ranks are int32 (half the memory of argsort's int64; rows < 2**31).
    """
    n, L = P.shape
    PT = np.ascontiguousarray(P.T)  # one contiguous row per label: sorts far faster
    values, rank = np.empty_like(PT), np.empty((L, n), np.int32)
    row_ids = np.arange(n, dtype=np.int32)

    def sort_label(j: int) -> None:
        order = np.argsort(PT[j])  # ties may come in any order: bins() does not care
        values[j] = PT[j, order]
        rank[j, order] = row_ids

    with ThreadPoolExecutor(max_workers=min(SORT_THREADS, available_cores())) as pool:
        list(pool.map(sort_label, range(L)))
    return [_Column(values[j], rank[j], np.sort(PT[j][y[:, j]])) for j in range(L)]


def _best(s: _Search, j: int, col: _Column, cands: np.ndarray, scorer: Scorer
          ) -> tuple[int, float, float]:
    """Index and score of label j's best candidate, and the score of its current threshold."""
    scores = scorer(col.bins(cands), len(cands))
    k = int(np.argmax(scores))
    return k, float(scores[k]), float(scores[np.searchsorted(cands, s.thr[j])])


def _top_k(P: np.ndarray, k: int) -> np.ndarray:
    """Exactly ``k`` labels per row: the most probable ones."""
    k = min(k, P.shape[1])
    idx = np.argpartition(-P, k - 1, axis=1)[:, :k]
    out = np.zeros(P.shape, bool)
    np.put_along_axis(out, idx, True, axis=1)
    return out


def _cap(P: np.ndarray, pred: np.ndarray, max_labels: int) -> np.ndarray:
    """Keep at most ``max_labels`` passing labels per row, the most probable ones."""
    over = pred.sum(1) > max_labels
    if over.any():
        masked = np.where(pred[over], P[over], -np.inf)
        pred = pred.copy()
        pred[over] = _top_k(masked, max_labels) & pred[over]
    return pred


def check_post_rules(min_labels: int, max_labels: int | None, top_k: int | None) -> None:
    """Refuse contradictory ``blend.*`` post-rules (every decoder applies them)."""
    if max_labels is not None and max_labels < max(min_labels, 1):
        raise UserError(f"max_labels={max_labels} is below min_labels={min_labels}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")


def _check_xy(P: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """2-D float probabilities (and a matching 0/1 matrix), finite."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or not np.isfinite(P).all():
        raise ValueError(f"expected a finite 2-D probability matrix, got shape {P.shape}")
    if y is None:
        return P, None
    y = np.asarray(y).astype(bool)
    if y.shape != P.shape:
        raise ValueError(f"labels {y.shape} and probabilities {P.shape} differ in shape")
    return P, y


class ThresholdOptimizer:
    """Per-label thresholds that maximise samples-, micro- or macro-F1 (sklearn-style).

    Args:
        metric: ``samples`` (the competition metric), ``micro`` or ``macro``.
        min_labels: Rows with fewer passing labels get their most probable ones. The search
            models the ``min_labels=1`` fallback exactly; larger values are applied only in
            :meth:`predict` (the search then assumes 1).
        max_labels: At most this many labels per row (the most probable passing ones); a
            post-rule applied in :meth:`predict`, not searched over.
        top_k: If set, :meth:`predict` ignores thresholds and outputs exactly ``top_k`` labels
            per row (competitions and classifiers that report a fixed top-k).
        n_candidates: Thresholds tried per label (quantiles of that label's probabilities).
        n_rounds: Maximum passes of coordinate ascent over all labels; stops early when a
            pass no longer improves the score.

    Attributes:
        thresholds_: ``(L,)`` fitted thresholds.
        global_threshold_: The best single threshold the search started from.
        search_score_: The in-sample metric the search reached (before max_labels/top_k).
        score_: The in-sample metric of :meth:`predict` on the training data.
        n_rounds_: Passes actually run.
    """

    def __init__(self, metric: str = "samples", min_labels: int = 1, max_labels: int | None = None,
                 top_k: int | None = None, n_candidates: int = 100, n_rounds: int = 3) -> None:
        self.metric = metric
        self.min_labels = min_labels
        self.max_labels = max_labels
        self.top_k = top_k
        self.n_candidates = n_candidates
        self.n_rounds = n_rounds

    def fit(self, P: np.ndarray, y: np.ndarray) -> ThresholdOptimizer:
        """Search thresholds on probabilities ``P`` ``(n, L)`` against 0/1 labels ``y``."""
        P, y = _check_xy(P, y)
        self._check_params()
        objective = THRESHOLD_METRICS.get(self.metric)
        cols = _columns(P, y)
        s, score = self._global_start(P, y, cols, objective)
        self.global_threshold_ = float(s.thr[0])
        self.n_rounds_ = 0
        for _ in range(self.n_rounds):
            before = score
            for j in range(P.shape[1]):
                score = self._step(s, j, cols[j], objective)
            self.n_rounds_ += 1
            if score <= before + 1e-12:
                break
        self.thresholds_ = s.thr.copy()
        self.search_score_ = float(score)
        self.score_ = self.score(P, y)
        return self

    def _check_params(self) -> None:
        """Reject contradictory post-rules before spending time on a search."""
        check_post_rules(self.min_labels, self.max_labels, self.top_k)

    def _global_start(self, P: np.ndarray, y: np.ndarray, cols: list[_Column], objective: Any
                      ) -> tuple[_Search, float]:
        """The best single threshold for all labels: the ascent's starting point."""
        fallback = self.min_labels >= 1
        cands = _global_candidates(P, self.n_candidates)
        scores = objective.global_scores(_global_bins(P, cols, cands, fallback), y, len(cands))
        k = int(np.argmax(scores))
        return _Search.start(P, y, fallback, float(cands[k])), float(scores[k])

    def _step(self, s: _Search, j: int, col: _Column, objective: Any) -> float:
        """Move label j's threshold to its best candidate (coarse, then refined around the
        winner); returns the new score."""
        scorer = objective.label_scorer(s, j)
        cands = _label_candidates(col.values, col.pos, self.n_candidates, s.thr[j])
        k, _, _ = _best(s, j, col, cands, scorer)
        fine = _refine_candidates(col.values, cands, k, self.n_candidates, s.thr[j])
        k, best, current = _best(s, j, col, fine, scorer)
        if best > current + 1e-12:
            s.set_label(j, _relax(col.values, float(fine[k])))
            return best
        return current

    def predict(self, P: np.ndarray) -> np.ndarray:
        """0/1 matrix: thresholds, then ``min_labels``, then ``max_labels`` (or ``top_k``)."""
        P, _ = _check_xy(P)
        if self.top_k:
            return _top_k(P, self.top_k).astype(np.uint8)
        pred = binarize(P, self.thresholds_, self.min_labels)
        if self.max_labels:
            pred = _cap(P, pred, self.max_labels)
        return pred.astype(np.uint8)

    def score(self, P: np.ndarray, y: np.ndarray) -> float:
        """The configured metric of :meth:`predict` against ``y``."""
        return float(METRICS[self.metric](y, self.predict(P)))
