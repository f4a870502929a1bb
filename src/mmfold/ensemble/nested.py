"""Scoring a blend honestly: nested cross-validation, and the fit ``mmfold blend`` reports.

:func:`nested_cv` is what the submissions log reports: for each fold k, blender and thresholds
are fitted on the other folds only and scored on fold k. :func:`fit_blend` runs it for the
blend and for each model alone, then fits the blend on all OOF rows for the submission.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmfold.artifacts.predictions import OOFSet
from mmfold.config import BlendConfig
from mmfold.metrics import METRICS
from mmfold.ensemble.blenders import Blender, SingleModel, WeightedBlender, check_stack, build_blender
from mmfold.ensemble.progress import Progress
from mmfold.ensemble.decoders import Decoder, build_decoder
from mmfold.ensemble.scoring import FoldScores


@dataclass
class NestedCV(FoldScores):
    """Honest scores: fold k predicted by a blender and thresholds fitted without fold k."""

    per_fold: list[float]
    prob: np.ndarray  # (n, L) blended probabilities, each row from fits that never saw it
    pred: np.ndarray  # (n, L) 0/1 after those fits' thresholds

    def summary(self) -> dict[str, Any]:
        """JSON-able mean, std and per-fold scores."""
        return {"mean": self.mean, "std": self.std, "per_fold": [float(s) for s in self.per_fold]}


def nested_cv(P: np.ndarray, y: np.ndarray, folds: np.ndarray,
              make_blender: Callable[[int], Blender], make_thresholds: Callable[[], Decoder],
              metric: str = "samples", progress: Progress | None = None) -> NestedCV:
    """Score a blend recipe on folds it was never fitted on.

    For each fold k: a new blender is fitted on the other folds' OOF (``folds`` passed along,
    so a stacker trains out-of-fold inside them), the decoder (thresholds, or a calibration for
    expected-F1 decoding) on that blender's ``oof_``, and both are applied to fold k. Fitting
    anything on fold k would flatter the score.

    Args:
        P: ``(M, n, L)`` OOF probabilities.
        y: ``(n, L)`` 0/1 labels.
        folds: Fold of every row.
        make_blender: ``fold -> unfitted blender``.
        make_thresholds: ``() -> unfitted decoder`` (``blend.decoder``: thresholds, expected-F1).
        metric: A :data:`mmfold.metrics.METRICS` name to score each fold.
        progress: Prints ``nested CV fold i/K`` as each fold starts (silent when None).
    """
    return nested_cv_decoders(P, y, folds, make_blender, {"": make_thresholds}, metric, progress)[""]


def nested_cv_decoders(P: np.ndarray, y: np.ndarray, folds: np.ndarray,
                       make_blender: Callable[[int], Blender],
                       decoders: dict[str, Callable[[], Decoder]], metric: str = "samples",
                       progress: Progress | None = None) -> dict[str, NestedCV]:
    """:func:`nested_cv` of one blend recipe under several decoders, fitting each fold's
    blender once: every decoder decides the same honest probabilities, so their scores differ
    by the decoder alone (how ``mmfold levers`` compares thresholds with expected-F1)."""
    P, y, folds = check_stack(P), np.asarray(y), np.asarray(folds)
    prob = np.zeros(P.shape[1:])
    pred = {name: np.zeros(P.shape[1:], np.uint8) for name in decoders}
    scores: dict[str, list[float]] = {name: [] for name in decoders}
    ks = np.unique(folds)
    for i, k in enumerate(ks):
        if progress is not None:
            progress.stage(f"nested CV fold {i + 1}/{len(ks)} (fitted on the other {len(ks) - 1})")
        tr, te = folds != k, folds == k
        blender = make_blender(int(k)).fit(P[:, tr], y[tr], folds[tr])
        prob[te] = blender.predict(P[:, te])
        for name, make in decoders.items():
            pred[name][te] = make().fit(blender.oof_, y[tr]).predict(prob[te])
            scores[name].append(float(METRICS[metric](y[te], pred[name][te])))
    return {name: NestedCV(scores[name], prob, pred[name]) for name in decoders}


@dataclass
class BlendFit:
    """Everything ``mmfold blend`` reports: the final fits and the honest scores."""

    models: list[str]
    blender: Blender  # fitted on all OOF: used for the test submission
    thresholds: Decoder  # blend.decoder, fitted on all of the blender's oof_
    honest: NestedCV
    in_sample: float  # weights and thresholds fitted and scored on the same rows
    singles: dict[str, NestedCV] = field(default_factory=dict)
    note: str = ""  # what the fit skipped and why (e.g. no weight search for one model)

    @property
    def best_single(self) -> tuple[str, NestedCV]:
        """The model with the best honest CV alone."""
        name = max(self.singles, key=lambda m: self.singles[m].mean)
        return name, self.singles[name]


def fit_blend(oofs: OOFSet, y: np.ndarray, cfg: BlendConfig, metric: str,
              storage: str | None = None, study_name: str = "blend",
              progress: Progress | None = None) -> BlendFit:
    """Nested CV of the blend and of each model alone, then the final fit on all OOF.

    With one model there is no weight to search: weighted methods give it weight 1.0 without
    a study (``note`` says so); the lgbm stacker still recalibrates it.
    """
    P, folds = oofs.P, oofs.folds
    progress = progress or Progress()
    def make_thresholds() -> Decoder:
        return build_decoder(cfg, metric)


    def make_blender(label: str) -> Blender:
        return build_blender(cfg, metric, storage, f"{study_name}-{label}", progress)

    honest = nested_cv(P, y, folds, lambda k: make_blender(f"fold{k}"), make_thresholds, metric,
                       progress)
    progress.stage(f"final fit on all {len(np.unique(folds))} folds")
    blender = make_blender("all").fit(P, y, folds)
    thresholds = make_thresholds().fit(blender.oof_, y)
    progress.stage(f"each model alone ({len(oofs.models)} models)")
    singles = {m: nested_cv(P[i : i + 1], y, folds, lambda k: SingleModel(0), make_thresholds,
                            metric) for i, m in enumerate(oofs.models)}
    note = ""
    if len(oofs.models) == 1 and isinstance(blender, WeightedBlender):
        note = f"one model ({oofs.models[0]}): weight 1.0, no weight search"
    return BlendFit(oofs.models, blender, thresholds, honest, thresholds.score_, singles, note)
