"""Honest CV of one model's out-of-fold probabilities: the one place that protocol lives.

A model's CV with tuned thresholds is only honest if the thresholds that decide fold k's rows
were fitted without fold k. Every stage that reports a model's tuned CV (collect's json, the
report, ablations, sweeps) calls :func:`honest_cv` with the same ``blend.*`` threshold
settings and the competition metric, so the numbers agree with the blend's own nested CV.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmfold.config import BlendConfig
from mmfold.metrics import METRICS, binarize
from mmfold.ensemble.decoders import build_decoder, threshold_params  # noqa: F401 (re-exported)


class FoldScores:
    """Mean and spread of a ``per_fold`` list of scores (mixed into the CV results)."""

    per_fold: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_fold))

    @property
    def std(self) -> float:
        return float(np.std(self.per_fold))


@dataclass
class HonestCV(FoldScores):
    """Per-fold scores and the 0/1 predictions they came from (each row decided out of fold)."""

    per_fold: list[float]
    pred: np.ndarray  # (n, L) 0/1


def honest_cv(probs: np.ndarray, y: np.ndarray, folds: np.ndarray, cfg: BlendConfig,
              metric: str) -> HonestCV:
    """The ``blend.decoder`` (thresholds by default) fitted on the other folds, applied to
    fold k, scored by ``metric``.

    With a single fold there are no other folds to fit on: the fold's rows are split into two
    seeded halves and each half is decided by thresholds fitted on the other (still honest,
    noisier). Used by sweeps that train a subset of folds.

    Args:
        probs: ``(n, L)`` out-of-fold probabilities.
        y: ``(n, L)`` 0/1 labels.
        folds: Fold of every row (any integers).
        cfg: The ``blend.*`` settings (post-rules shape the thresholds).
        metric: A :data:`mmfold.metrics.METRICS` name.
    """
    probs, y, folds = np.asarray(probs, np.float64), np.asarray(y), np.asarray(folds)
    groups = folds if len(np.unique(folds)) > 1 else _halves(len(folds), cfg.seed)
    pred = np.zeros(y.shape, dtype=np.uint8)
    for k in np.unique(groups):
        fit, te = groups != k, groups == k
        pred[te] = build_decoder(cfg, metric).fit(probs[fit], y[fit]).predict(probs[te])
    scored = folds if len(np.unique(folds)) > 1 else np.zeros(len(folds), int)
    per_fold = [float(METRICS[metric](y[scored == k], pred[scored == k])) for k in np.unique(scored)]
    return HonestCV(per_fold, pred)


def at_half(probs: np.ndarray, y: np.ndarray, folds: np.ndarray, cfg: BlendConfig,
            metric: str) -> HonestCV:
    """The same scores at threshold 0.5 (with the ``blend.min_labels`` fallback): no fitting."""
    pred = binarize(np.asarray(probs), 0.5, cfg.min_labels).astype(np.uint8)
    folds = np.asarray(folds)
    per_fold = [float(METRICS[metric](y[folds == k], pred[folds == k])) for k in np.unique(folds)]
    return HonestCV(per_fold, pred)


def _halves(n: int, seed: int) -> np.ndarray:
    """Two seeded random halves of ``n`` rows (0/1 group per row)."""
    groups = np.zeros(n, dtype=np.int64)
    groups[np.random.default_rng(seed).permutation(n)[: n // 2]] = 1
    return groups
