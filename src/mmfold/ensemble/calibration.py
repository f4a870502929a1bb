"""Per-label probability calibration, fitted on out-of-fold probabilities.

Expected-F1 decoding (:mod:`mmfold.ensemble.decoders`) reads a row's probabilities as the
chances that its labels are true, so they must be calibrated: a blend of rank-transformed or
power-transformed members, or a member that over-predicts one label, is not. Each calibrator
is fitted per label on the rows it is given (the blender's ``oof_`` inside one nested-CV fold)
and is monotone, so per label it never reorders rows; it only makes the numbers comparable
across labels and meaningful as probabilities.

Fitted state is plain arrays (no sklearn objects), so a blend's saved state stays small and
needs no extra trusted types.
"""

from __future__ import annotations

import numpy as np

from mmfold.registry import Registry

CALIBRATORS = Registry("calibration")

EPS = 1e-6  # probabilities are clipped to [EPS, 1 - EPS] before the logit


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


@CALIBRATORS.register("none")
class IdentityCalibrator:
    """No calibration: for members that are already calibrated (the baseline to beat)."""

    def fit(self, P: np.ndarray, y: np.ndarray) -> IdentityCalibrator:
        self.n_labels_ = P.shape[1]
        return self

    def transform(self, P: np.ndarray) -> np.ndarray:
        return np.asarray(P, np.float64)


@CALIBRATORS.register("platt")
class PlattCalibrator:
    """Per label ``q = sigmoid(a * logit(p) + b)`` (Platt scaling on the logit).

    Fitted by Newton's method on all labels at once (two parameters per label, a 2x2 solve
    each), with Platt's smoothed targets ``(n+ + 1) / (n+ + 2)`` and ``1 / (n- + 2)`` so a label
    that is never (or always) true, or perfectly separated, still has finite parameters. The
    rows are first summarised per label into ``n_bins`` logit bins (count, positives, mean
    logit): one ``bincount`` over the matrix, after which each Newton step costs
    O(labels x bins) instead of O(rows x labels). Per-label sklearn logistic regressions took
    ~100x longer at 200,000 x 200.

    Args:
        n_bins: Logit bins per label (width ~0.01 over [-14, 14]: far below any signal).
        n_iter: Newton steps at most (each halves its step until the loss does not increase).

    Attributes:
        a_, b_: ``(L,)`` slope and intercept per label.
    """

    def __init__(self, n_bins: int = 2048, n_iter: int = 50) -> None:
        self.n_bins = n_bins
        self.n_iter = n_iter

    def fit(self, P: np.ndarray, y: np.ndarray) -> PlattCalibrator:
        P, y = np.asarray(P, np.float64), np.asarray(y).astype(bool)
        n_pos = y.sum(0)
        z, cnt, pos = _logit_bins(_logit(P), y, self.n_bins)
        t_pos = (n_pos + 1.0) / (n_pos + 2.0)
        t_neg = 1.0 / (len(y) - n_pos + 2.0)
        # targets per bin: positives at t_pos, negatives at t_neg, as one weighted target
        t = np.where(cnt > 0, (pos * t_pos[:, None] + (cnt - pos) * t_neg[:, None]) / np.maximum(cnt, 1), 0.0)
        self.a_, self.b_ = _newton(z, t, cnt, self.n_iter)
        return self

    def transform(self, P: np.ndarray) -> np.ndarray:
        return _sigmoid(self.a_ * _logit(np.asarray(P, np.float64)) + self.b_)


def _logit_bins(z: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(L, n_bins)`` mean logit, row count and positives per bin of each label's logits."""
    n, L = z.shape
    lo, hi = _logit(np.array(0.0)), _logit(np.array(1.0))
    b = np.clip(((z - lo) / (hi - lo) * n_bins).astype(np.int64), 0, n_bins - 1)
    idx = (b + np.arange(L) * n_bins).ravel()
    size = L * n_bins
    cnt = np.bincount(idx, minlength=size).reshape(L, n_bins).astype(np.float64)
    pos = np.bincount(idx, weights=y.ravel().astype(np.float64), minlength=size).reshape(L, n_bins)
    zsum = np.bincount(idx, weights=z.ravel(), minlength=size).reshape(L, n_bins)
    return np.where(cnt > 0, zsum / np.maximum(cnt, 1), 0.0), cnt, pos


def _nll(z: np.ndarray, t: np.ndarray, w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Weighted cross-entropy per label of ``sigmoid(a z + b)`` against targets ``t``."""
    s = a[:, None] * z + b[:, None]
    return (w * (np.logaddexp(0.0, s) - t * s)).sum(1)


def _newton(z: np.ndarray, t: np.ndarray, w: np.ndarray, n_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Newton's method with step halving, every label at once (``(L, bins)`` arrays)."""
    a, b = np.ones(len(z)), np.zeros(len(z))
    loss = _nll(z, t, w, a, b)
    for _ in range(n_iter):
        s = _sigmoid(a[:, None] * z + b[:, None])
        r, h = w * (s - t), w * s * (1.0 - s) + 1e-12
        ga, gb = (r * z).sum(1), r.sum(1)
        haa, hab, hbb = (h * z * z).sum(1) + 1e-9, (h * z).sum(1), h.sum(1) + 1e-9
        det = haa * hbb - hab * hab
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        step = np.ones_like(a)
        for _ in range(30):  # halve the step of the labels whose loss went up
            new = _nll(z, t, w, a - step * da, b - step * db)
            worse = new > loss + 1e-12 * (1.0 + np.abs(loss))
            if not worse.any():
                break
            step = np.where(worse, step / 2.0, step)
        a, b, loss = a - step * da, b - step * db, np.minimum(new, loss)
        if max(np.abs(step * da).max(initial=0.0), np.abs(step * db).max(initial=0.0)) < 1e-7:
            break
    return a, b


@CALIBRATORS.register("isotonic")
class IsotonicCalibrator:
    """Per-label isotonic regression (sklearn's), stored as its knots and applied by
    interpolation: free-form monotone maps for blends whose distortion is not a sigmoid.

    Attributes:
        x_, y_: one array of knots per label (``X_thresholds_``, ``y_thresholds_``).
    """

    def fit(self, P: np.ndarray, y: np.ndarray) -> IsotonicCalibrator:
        from sklearn.isotonic import IsotonicRegression

        P, y = np.asarray(P, np.float64), np.asarray(y, np.float64)
        self.x_, self.y_ = [], []
        for j in range(P.shape[1]):
            iso = IsotonicRegression(y_min=EPS, y_max=1.0 - EPS, out_of_bounds="clip").fit(P[:, j], y[:, j])
            self.x_.append(np.asarray(iso.X_thresholds_, np.float64))
            self.y_.append(np.asarray(iso.y_thresholds_, np.float64))
        return self

    def transform(self, P: np.ndarray) -> np.ndarray:
        P = np.asarray(P, np.float64)
        return np.stack([np.interp(P[:, j], x, v) for j, (x, v) in enumerate(zip(self.x_, self.y_))],
                        axis=1)
