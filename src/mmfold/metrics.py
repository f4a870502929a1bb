"""Multi-label metrics on 0/1 matrices, vectorised (no per-row Python loops).

``samples`` F1 is the competition metric: F1 of each row's predicted label set against its
true set, averaged over rows. A row with neither true nor predicted labels scores 0, matching
``sklearn.metrics.f1_score(average='samples', zero_division=0)``.
"""

from __future__ import annotations

import numpy as np


def _as01(a: np.ndarray) -> np.ndarray:
    """Boolean view of a 0/1 (or bool) matrix."""
    return np.asarray(a).astype(bool, copy=False)


def samples_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean over rows of the per-row F1 (sklearn ``average='samples'``, zero_division=0)."""
    y, pred = _as01(y), _as01(pred)
    tp = (y & pred).sum(1)
    denom = y.sum(1) + pred.sum(1)
    return float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)))


def micro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """F1 over all (row, label) cells pooled."""
    y, pred = _as01(y), _as01(pred)
    tp = (y & pred).sum()
    denom = y.sum() + pred.sum()
    return float(2 * tp / denom) if denom else 0.0


def per_label_f1(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """F1 of each label column (0 where a label has no true and no predicted positives)."""
    y, pred = _as01(y), _as01(pred)
    tp = (y & pred).sum(0)
    denom = y.sum(0) + pred.sum(0)
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Unweighted mean of per-label F1."""
    return float(per_label_f1(y, pred).mean())


def subset_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Share of rows whose predicted label set is exactly right."""
    return float((_as01(y) == _as01(pred)).all(1).mean())


def hamming_loss(y: np.ndarray, pred: np.ndarray) -> float:
    """Share of (row, label) cells predicted wrong."""
    return float((_as01(y) != _as01(pred)).mean())


def label_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean over labels of each label's accuracy (1 - hamming loss, per label averaged)."""
    return float((_as01(y) == _as01(pred)).mean(0).mean())


# the metrics a competition can be scored by here: thresholds, blends and training optimise them
OPTIMISED = ("samples", "micro", "macro")

METRICS = {
    "samples": samples_f1,
    "micro": micro_f1,
    "macro": macro_f1,
    "subset_accuracy": subset_accuracy,
    "hamming_loss": hamming_loss,
    "label_accuracy": label_accuracy,
}


def metric_label(metric: str) -> str:
    """How a metric name reads in a console line or a table header (``samples-F1``)."""
    return f"{metric}-F1" if metric in ("samples", "micro", "macro") else metric


def all_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Every metric in :data:`METRICS` for one prediction."""
    return {name: fn(y, pred) for name, fn in METRICS.items()}


def binarize(prob: np.ndarray, thresholds: float | np.ndarray = 0.5, min_labels: int = 1) -> np.ndarray:
    """Threshold probabilities; rows with fewer than ``min_labels`` get their top labels.

    Competitions scored by samples-F1 punish empty rows (F1 = 0), so the default keeps the
    argmax when nothing passes.
    """
    pred = prob >= np.asarray(thresholds)
    if min_labels > 0:
        short = pred.sum(1) < min_labels
        if short.any():
            # stable: among tied probabilities the first label wins, as with argmax
            top = np.argsort(-prob[short], axis=1, kind="stable")[:, :min_labels]
            rows = np.repeat(np.nonzero(short)[0], min_labels)
            pred[rows, top.ravel()] = True
    return pred


# ----------------------------------------------------------- choosing a checkpoint (train.select_threshold)


def score_at_half(y: np.ndarray, probs: np.ndarray, metric: str) -> float:
    """The metric at threshold 0.5: right for a loss whose probabilities are calibrated (BCE)."""
    return float(METRICS[metric](y, binarize(probs, 0.5)))


def score_at_best_global(y: np.ndarray, probs: np.ndarray, metric: str) -> float:
    """The metric at the one threshold (of 0.05, 0.10 ... 0.95) that is best on these rows.

    Losses that reshape probabilities (ASL's down-weighted negatives push them up) move the
    best threshold from epoch to epoch, so the score at 0.5 can fall while the model improves;
    a single searched threshold follows the model instead. Used only to pick the checkpoint
    and stop early; the honest CV fits thresholds on other folds as always.
    """
    return max(float(METRICS[metric](y, binarize(probs, t))) for t in np.arange(0.05, 0.96, 0.05))


# how an epoch's validation predictions are scored to pick the best checkpoint and stop early
CHECKPOINT_SCORES = {"half": score_at_half, "global": score_at_best_global}
