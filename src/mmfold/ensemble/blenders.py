"""Blenders: estimators that combine several models' out-of-fold probabilities into one.

Every blender implements :class:`Blender`: it is fitted on a stack of probabilities ``P`` of
shape ``(n_models, n_rows, n_labels)``; ``fit(P, y, folds)`` returns self and sets ``weights_``
(one per model, summing to 1) and ``oof_`` (its predictions for the rows it was fitted on, as
honest as the method allows: the blend itself for weighted means, the stacker's out-of-fold
predictions for LightGBM); ``predict(P)`` returns blended probabilities ``(n_rows, n_labels)``.
Thresholds are fitted on ``oof_`` by :class:`mmfold.ensemble.thresholds.ThresholdOptimizer`.

``blend.method`` names one of :data:`BLENDERS`; each registered class also has
``from_config(cfg, metric, storage, study_name, progress)``, which :func:`build_blender` calls.
How a blend is scored honestly is :mod:`mmfold.ensemble.nested`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np

from mmfold.artifacts import studies
from mmfold.config import BlendConfig
from mmfold.errors import UserError
from mmfold.registry import Registry
from mmfold.ensemble.progress import Progress
from mmfold.ensemble.scoring import threshold_params
from mmfold.ensemble.thresholds import ThresholdOptimizer
from mmfold.ensemble.transforms import TRANSFORMS, PowerTransform

BLENDERS = Registry("blend method")
ALL_LABELS_FEATURES = 64  # features each tree of the all-label stacker samples


@runtime_checkable
class Blender(Protocol):
    """What every blender is (and what :func:`mmfold.ensemble.nested.nested_cv` needs).

    Attributes (set by :meth:`fit`):
        weights_: ``(n_models,)`` each model's share, summing to 1.
        oof_: ``(n_rows, n_labels)`` predictions for the rows it was fitted on, as honest as
            the method allows; the thresholds are fitted on them.
    """

    weights_: np.ndarray
    oof_: np.ndarray

    def fit(self, P: np.ndarray, y: np.ndarray, folds: np.ndarray | None = None) -> Self:
        """Fit on ``P`` ``(n_models, n_rows, n_labels)`` and 0/1 labels ``y``; ``folds`` lets
        a stacker train out-of-fold."""
        ...

    def predict(self, P: np.ndarray) -> np.ndarray:
        """Blended probabilities ``(n_rows, n_labels)`` of another stack of the same models."""
        ...


def _score_after_thresholds(prob: np.ndarray, y: np.ndarray, thr: dict[str, Any]) -> float:
    """The objective of every blender: the metric after fitting per-label thresholds."""
    return ThresholdOptimizer(**thr).fit(prob, y).score_


def check_stack(P: np.ndarray) -> np.ndarray:
    """A float stack ``(M, n, L)`` (finiteness is checked when files are loaded)."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 3:
        raise ValueError(f"expected probabilities of shape (models, rows, labels), got {P.shape}")
    return P


# ---------------------------------------------------------------------------------------------
# weighted means of transformed probabilities


class WeightedBlender(Blender):
    """Shared machinery: ``predict`` is the weighted mean of transformed probabilities."""

    transform: str = "none"

    def _prepare(self, P: np.ndarray) -> np.ndarray:
        """Fit the transform on the training stack and return the transformed stack."""
        P = check_stack(P)
        self.transform_ = TRANSFORMS.get(self.transform)().fit(P)
        return self.transform_(P)

    def _finish(self, Q: np.ndarray, weights: np.ndarray) -> None:
        """Store normalised weights and the in-sample blend of the transformed ``Q`` as ``oof_``."""
        self.weights_ = np.asarray(weights, float) / np.sum(weights)
        self.oof_ = _mix(Q, self.weights_)

    def predict(self, P: np.ndarray) -> np.ndarray:
        """Blended probabilities ``(n, L)``."""
        return _mix(self.transform_(check_stack(P)), self.weights_)

    @property
    def exponents_(self) -> np.ndarray:
        """Each model's power exponent: the power transform's, else 1 (no power)."""
        exponents = getattr(self.transform_, "exponents_", None)
        return np.ones(len(self.weights_)) if exponents is None else exponents


def _mix(Q: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean over models of ``Q[m]`` (models of weight 0 are skipped)."""
    out = np.zeros(Q.shape[1:])
    for w, q in zip(weights, Q):
        if w > 0:
            out += w * q
    return out


# ---------------------------------------------------------------------------------------------
# the registered blenders


@BLENDERS.register("mean")
class MeanBlender(WeightedBlender):
    """Equal weights: the baseline every tuned blend must beat honestly."""

    def __init__(self, transform: str = "none") -> None:
        self.transform = transform

    @classmethod
    def from_config(cls, cfg: BlendConfig, metric: str, storage: str | None, study_name: str,
                    progress: Progress | None = None) -> MeanBlender:
        """From ``blend.*`` (storage, study name and progress are unused)."""
        return cls(transform=cfg.transform)

    def fit(self, P: np.ndarray, y: np.ndarray, folds: np.ndarray | None = None) -> MeanBlender:
        """Nothing is tuned; ``y`` and ``folds`` are accepted for a uniform interface."""
        Q = self._prepare(P)
        self._finish(Q, np.ones(len(Q)))
        return self


@BLENDERS.register("greedy")
class GreedyBlender(WeightedBlender):
    """Caruana ensemble selection with replacement (as AutoGluon's weighted ensemble).

    Start empty; each step adds the model (repeats allowed) whose inclusion gives the best
    score after thresholds; weights are how often each model was picked, at the best step.

    Args:
        n_iter: Selection steps.
        threshold_params: :class:`ThresholdOptimizer` arguments for the objective.
        transform: A :data:`TRANSFORMS` name.
    """

    def __init__(self, n_iter: int = 25, threshold_params: dict[str, Any] | None = None,
                 transform: str = "none") -> None:
        self.n_iter = n_iter
        self.threshold_params = threshold_params
        self.transform = transform

    @classmethod
    def from_config(cls, cfg: BlendConfig, metric: str, storage: str | None, study_name: str,
                    progress: Progress | None = None) -> GreedyBlender:
        """From ``blend.*``."""
        return cls(threshold_params=threshold_params(cfg, metric), transform=cfg.transform)

    def fit(self, P: np.ndarray, y: np.ndarray, folds: np.ndarray | None = None) -> GreedyBlender:
        """Run the selection; ``trajectory_`` holds the score after each step."""
        Q = self._prepare(P)
        self.trajectory_ = []
        if len(Q) == 1:  # one model: weight 1.0, nothing to select
            self._finish(Q, np.ones(1))
            return self
        thr = {"n_rounds": 1, **(self.threshold_params or {})}
        counts, total = np.zeros(len(Q)), np.zeros(Q.shape[1:])
        best_counts, self.trajectory_ = counts, []
        for step in range(self.n_iter):
            scores = [_score_after_thresholds((total + q) / (step + 1), y, thr) for q in Q]
            m = int(np.argmax(scores))
            counts, total = counts + np.eye(len(Q))[m], total + Q[m]
            if not self.trajectory_ or scores[m] > max(self.trajectory_):
                best_counts = counts
            self.trajectory_.append(float(scores[m]))
        self._finish(Q, best_counts)
        return self


@BLENDERS.register("optuna")
class OptunaBlender(WeightedBlender):
    """Weights (and optional per-model power exponents) tuned by seeded TPE.

    Weights use the Dirichlet trick: ``w_m = -log(u_m)`` with ``u_m ~ U(0, 1)``, normalised,
    which samples the simplex uniformly, unlike normalising raw uniforms; ``u_m = 1`` gives a
    model exactly zero weight. The objective is the metric after per-label thresholds. The
    first trials are the equal-weight blend and each model alone, so the search never ends
    below those.

    The study is stored in ``storage`` (an SQLite URL) under a name that includes a fingerprint
    of the data, so fitting again on the same OOF continues the study (trials are topped up to
    ``n_trials``: an interrupted fit resumes, a finished one costs nothing), and a different
    set of models or changed OOF starts a new one.

    Args:
        n_trials: Completed trials the study should hold.
        threshold_params: :class:`ThresholdOptimizer` arguments for the objective.
        transform: A :data:`TRANSFORMS` name; ``power`` also tunes an exponent per model.
        seed: TPE seed (offset by the trials already done, so a resumed study explores anew).
        storage: Optuna storage URL; None keeps the study in memory.
        study_name: Readable prefix of the study name.
        progress: Where trial progress is printed (silent when None).

    Attributes:
        weights_, exponents_, oof_: as for every blender.
        study_: The Optuna study (absent for a single model, where no study is run).
    """

    def __init__(self, n_trials: int = 100, threshold_params: dict[str, Any] | None = None,
                 transform: str = "none", seed: int = 42, storage: str | None = None,
                 study_name: str = "blend", progress: Progress | None = None) -> None:
        self.n_trials = n_trials
        self.threshold_params = threshold_params
        self.transform = transform
        self.seed = seed
        self.storage = storage
        self.study_name = study_name
        self.progress = progress

    @classmethod
    def from_config(cls, cfg: BlendConfig, metric: str, storage: str | None, study_name: str,
                    progress: Progress | None = None) -> OptunaBlender:
        """From ``blend.*``, with the study stored in ``storage`` under ``study_name``."""
        return cls(cfg.n_trials, threshold_params(cfg, metric), cfg.transform, cfg.seed, storage,
                   study_name, progress)

    def fit(self, P: np.ndarray, y: np.ndarray, folds: np.ndarray | None = None) -> OptunaBlender:
        """Create or continue the study, then take the best trial's weights.

        A single model gets weight 1.0 without a study: its one weight normalises to 1 whatever
        a trial picks, and a power exponent is monotone, so per-label thresholds undo it.

        Raises:
            KeyboardInterrupt: after Ctrl-C, once the running trial is stored (see
                :func:`_stop_on_interrupt`).
        """
        Q = self._prepare(P)
        if len(Q) == 1:
            self._finish(Q, np.ones(1))
            return self
        study = self._study(Q, y)
        done = len(studies.complete_trials(study))
        if done < self.n_trials:
            study.sampler = _sampler(self.seed + done)
            self._optimize(study, Q, y, self.n_trials - done)
        self.study_ = study
        weights, exponents = self._decode(study.best_trial.params, len(Q))
        if isinstance(self.transform_, PowerTransform):
            self.transform_.exponents_ = exponents  # Q was P: exponents 1 until now
            Q = self.transform_(Q)
        self._finish(Q, weights)
        return self

    def _optimize(self, study: Any, Q: np.ndarray, y: np.ndarray, n: int) -> None:
        """Run ``n`` more trials with progress lines; a Ctrl-C stops after the running trial."""
        import optuna

        progress = self.progress or Progress()
        with _stop_on_interrupt() as interrupted:
            def objective(trial: Any) -> float:
                try:
                    return self._objective(trial, Q, y)
                except KeyboardInterrupt:  # a second Ctrl-C: end this trial quietly
                    interrupted.set()
                    raise optuna.TrialPruned("interrupted") from None

            def stop(study: Any, trial: Any) -> None:
                if interrupted.is_set():
                    study.stop()

            study.optimize(objective, n_trials=n,
                           callbacks=[progress.trial_callback(self.n_trials), stop])
        if interrupted.is_set():
            raise KeyboardInterrupt

    def _study(self, Q: np.ndarray, y: np.ndarray) -> Any:
        """Load or create the study; a new one gets the equal and single-model trials first."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        name = f"{self.study_name}-{self._fingerprint(Q, y)}"
        storage = studies.storage(self.storage) if self.storage else None
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                    sampler=_sampler(self.seed), load_if_exists=True)
        if storage is not None:
            studies.fail_stale_trials(study)  # trials of a killed run
        if not study.trials:
            for point in _anchor_points(len(Q)):
                study.enqueue_trial({**point, **self._unit_exponents(len(Q))})
        return study

    def _fingerprint(self, Q: np.ndarray, y: np.ndarray) -> str:
        """Hash of the data and of everything that changes the objective."""
        h = hashlib.sha256(np.ascontiguousarray(Q, np.float32).tobytes())
        h.update(np.ascontiguousarray(y, np.uint8).tobytes())
        h.update(repr((Q.shape, self.transform, sorted((self.threshold_params or {}).items())))
                 .encode())
        return h.hexdigest()[:12]

    def _unit_exponents(self, M: int) -> dict[str, float]:
        """Exponent 1 for every model (only when exponents are tuned)."""
        return {f"p{m}": 1.0 for m in range(M)} if self.transform == "power" else {}

    def _objective(self, trial: Any, Q: np.ndarray, y: np.ndarray) -> float:
        """Metric after thresholds of the trial's blend."""
        M = len(Q)
        for m in range(M):
            trial.suggest_float(f"u{m}", 1e-9, 1.0)
            if self.transform == "power":
                trial.suggest_float(f"p{m}", 0.25, 4.0, log=True)
        weights, exponents = self._decode(trial.params, M)
        if weights.sum() == 0:  # every u at 1: no model chosen
            return 0.0
        thr = {"n_rounds": 1, **(self.threshold_params or {})}
        if self.transform == "power":  # Q is P: the trial's exponents are applied here
            Q = PowerTransform(exponents)(Q)
        return _score_after_thresholds(_mix(Q, weights / weights.sum()), y, thr)

    def _decode(self, params: dict[str, float], M: int) -> tuple[np.ndarray, np.ndarray]:
        """Trial parameters -> (unnormalised weights, exponents)."""
        weights = np.array([-np.log(params[f"u{m}"]) for m in range(M)])
        exps = np.array([params.get(f"p{m}", 1.0) for m in range(M)])
        return weights, exps


@contextlib.contextmanager
def _stop_on_interrupt() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C during a study into "stop after the running trial".

    Why: Optuna logs an exception raised inside a trial with its whole traceback (~60 lines)
    before re-raising it, and one raised while it records a trial in SQLite can leave that
    trial half-written. So the first SIGINT only sets the yielded event; the caller stops the
    study once the running trial is stored and raises KeyboardInterrupt outside Optuna, which
    the CLI prints as one line. A second SIGINT raises at once. Only the main thread can own
    signal handlers, and an ignored SIGINT stays ignored; then nothing is changed.
    """
    event = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield event
        return

    def handler(signum: int, frame: Any) -> None:
        if event.is_set():
            raise KeyboardInterrupt
        event.set()
        os.write(2, b"blend: Ctrl-C: stopping after the running trial (Ctrl-C again to stop now)\n")

    signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


def _sampler(seed: int) -> Any:
    """Seeded TPE: the same OOF and seed give the same study."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


def _anchor_points(M: int) -> list[dict[str, float]]:
    """Equal weights, then each model alone (u=1 -> weight 0, u=1/e -> weight 1)."""
    equal = {f"u{m}": float(np.exp(-1.0)) for m in range(M)}
    singles = [{f"u{m}": float(np.exp(-1.0)) if m == k else 1.0 for m in range(M)}
               for k in range(M)] if M > 1 else []
    return [equal] + singles


class PerLabelStacker(Blender):
    """Shared machinery of the stackers: one classifier per label over features of the models'
    probabilities, trained out-of-fold on ``folds`` (``oof_`` holds, for each row, the
    prediction of stackers that never saw it: what the decoder is fitted on); ``predict`` uses
    stackers refitted on all rows. A subclass says what label j's features are (``_x``), how
    one label's classifier is fitted (``_fit_label``) and how each model's share is read off
    the fitted classifiers (``_gain_shares``).

    Attributes:
        weights_: Each model's share (a readable importance, summing to 1).
        oof_: ``(n, L)`` out-of-fold stacked probabilities.
        models_: One fitted classifier (or a constant) per label.
    """

    name = ""  # its blend.method, for messages

    def fit(self, P: np.ndarray, y: np.ndarray, folds: np.ndarray | None = None) -> Self:
        """Out-of-fold stackers for ``oof_``, then one per label on every row."""
        P, y = check_stack(P), np.asarray(y)
        if folds is None or len(np.unique(folds)) < 2:
            raise UserError(f"blend.method={self.name} trains out-of-fold, so it needs >= 2 folds in the "
                            "rows it is fitted on (>= 3 folds in all, for the nested CV)")
        folds = np.asarray(folds)
        self.oof_ = np.zeros(P.shape[1:])
        for k in np.unique(folds):
            tr, te = folds != k, folds == k
            for j in range(P.shape[2]):
                model = self._fit_label(P[:, tr], y[tr, j], j)
                self.oof_[te, j] = _proba(model, self._x(P[:, te], j))
        self.models_ = [self._fit_label(P, y[:, j], j) for j in range(P.shape[2])]
        self.weights_ = self._gain_shares(P.shape[0])
        return self

    def predict(self, P: np.ndarray) -> np.ndarray:
        """Stacked probabilities ``(n, L)`` from the all-rows stackers."""
        P = check_stack(P)
        return np.stack([_proba(m, self._x(P, j)) for j, m in enumerate(self.models_)], axis=1)

    def _x(self, P: np.ndarray, j: int) -> np.ndarray:
        """Features for label j."""
        raise NotImplementedError

    def _fit_label(self, P: np.ndarray, yj: np.ndarray, j: int) -> Any:
        """One label's classifier (or a constant)."""
        raise NotImplementedError

    def _gain_shares(self, M: int) -> np.ndarray:
        """Each model's share of the fitted classifiers' importance."""
        raise NotImplementedError


@BLENDERS.register("lgbm")
class LGBMStacker(PerLabelStacker):
    """A LightGBM classifier per label over every model's probability of that label.

    With ``cooccurrence`` the features also hold the mean probability of every label, so the
    stacker can learn that "night" rarely comes with "striped". Trained out-of-fold as every
    :class:`PerLabelStacker`.

    Args:
        n_estimators, learning_rate, num_leaves, min_child_samples: LightGBM settings, small so
            that one label's stacker trains in milliseconds.
        cooccurrence: Add the mean probability of every label as features.
        all_labels: Add every model's probability of every label as features (the all-label
            stacker of Planet's and iMet's winners; ``blend.method=lgbm_all``).
        seed: LightGBM seed.
        num_threads: LightGBM threads. 1 by default: a stacker fits on a few thousand rows
            and a handful of features, where OpenMP start-up costs more than it saves, and on
            a busy 2-core machine 2 threads measured ~10-100x slower than 1.

    Attributes:
        weights_: Each model's share of the total split gain (a readable importance).
        oof_, models_: As for every :class:`PerLabelStacker`.
    """

    name = "lgbm"

    def __init__(self, n_estimators: int = 60, learning_rate: float = 0.1, num_leaves: int = 7,
                 min_child_samples: int = 10, cooccurrence: bool = False, seed: int = 42,
                 num_threads: int = 1, all_labels: bool = False) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.cooccurrence = cooccurrence
        self.seed = seed
        self.num_threads = num_threads
        self.all_labels = all_labels

    @classmethod
    def from_config(cls, cfg: BlendConfig, metric: str, storage: str | None, study_name: str,
                    progress: Progress | None = None) -> LGBMStacker:
        """From ``blend.*``; trees are invariant to monotone transforms, so none is applied."""
        return cls(cooccurrence=cfg.cooccurrence, seed=cfg.seed)

    def _x(self, P: np.ndarray, j: int) -> np.ndarray:
        """Features for label j: every model's probability of j first (the gain shares read
        them), then the mean of every label and/or every model's every label."""
        parts = [P[:, :, j].T]
        if self.cooccurrence:
            parts.append(P.mean(0))
        if self.all_labels:
            parts.append(P.transpose(1, 0, 2).reshape(P.shape[1], -1))
        return np.hstack(parts) if len(parts) > 1 else parts[0]

    def _fit_label(self, P: np.ndarray, yj: np.ndarray, j: int) -> Any:
        """One label's classifier; a constant when the label never or always occurs."""
        if yj.min() == yj.max():
            return float(yj[0])
        from lightgbm import LGBMClassifier

        x = self._x(P, j)
        # every label's probabilities (models x labels features): each tree samples ~64 of
        # them, so a 100-label stack costs what a small one does, not ~10x more
        colsample = min(1.0, ALL_LABELS_FEATURES / x.shape[1]) if self.all_labels else 1.0
        clf = LGBMClassifier(n_estimators=self.n_estimators, learning_rate=self.learning_rate,
                             num_leaves=self.num_leaves, min_child_samples=self.min_child_samples,
                             importance_type="gain", num_threads=self.num_threads,
                             random_state=self.seed, colsample_bytree=colsample,
                             verbose=-1)
        return clf.fit(x, yj)

    def _gain_shares(self, M: int) -> np.ndarray:
        """Split gain on each model's own-label feature, summed over labels, as shares."""
        gain = np.zeros(M)
        for m in self.models_:
            if not isinstance(m, float):
                gain += m.feature_importances_[:M]
        return gain / gain.sum() if gain.sum() > 0 else np.full(M, 1.0 / M)


@BLENDERS.register("lgbm_all")
class LGBMAllLabelsStacker(LGBMStacker):
    """:class:`LGBMStacker` whose label-j classifier sees every model's probability of every
    label, so it can learn from "model A is sure of label 3" when deciding label 7 (not only from
    the labels' means, as ``cooccurrence`` does). Features grow to models x labels per label:
    measured against the per-label stacker by ``mmfold levers``."""

    name = "lgbm_all"

    @classmethod
    def from_config(cls, cfg: BlendConfig, metric: str, storage: str | None, study_name: str,
                    progress: Progress | None = None) -> LGBMAllLabelsStacker:
        """From ``blend.*``, with every label's probabilities as features."""
        return cls(cooccurrence=cfg.cooccurrence, seed=cfg.seed, all_labels=True)


@BLENDERS.register("logistic")
class LogisticStacker(PerLabelStacker):
    """A logistic regression per label over every model's logit of that label.

    The per-label second level of Planet's and iMet's winners, in its simplest form: label j
    gets its own weight per model (and an intercept), so a member that is only good at some
    labels (a row-id neighbour vote knows the season, not the colour) counts where it helps,
    which one global weight per model cannot do. Linear in the logits, so it stays calibrated
    and cannot memorise as trees can. Trained out-of-fold as every :class:`PerLabelStacker`.

    Args:
        C: Inverse L2 strength (sklearn's): with a handful of features per label and thousands
            of rows, 1.0 barely regularises.
        seed: Kept for the shared interface (lbfgs is deterministic).

    Attributes:
        weights_: Each model's share of the summed absolute coefficients over labels.
        oof_, models_: As for every :class:`PerLabelStacker`.
    """

    name = "logistic"

    def __init__(self, C: float = 1.0, seed: int = 42) -> None:  # noqa: N803 - sklearn's name
        self.C = C
        self.seed = seed

    @classmethod
    def from_config(cls, cfg: BlendConfig, metric: str, storage: str | None, study_name: str,
                    progress: Progress | None = None) -> LogisticStacker:
        """From ``blend.*``; settings it would silently ignore are refused.

        Raises:
            UserError: ``blend.transform`` other than none (the stacker reads logits) or
                ``blend.cooccurrence`` (a per-label model over its own label's logits).
        """
        if cfg.transform != "none" or cfg.cooccurrence:
            raise UserError("blend.method=logistic reads each model's logit of a label: it takes no "
                            "blend.transform and no blend.cooccurrence")
        return cls(seed=cfg.seed)

    def _x(self, P: np.ndarray, j: int) -> np.ndarray:
        """Every model's logit of label j (probabilities clipped to [1e-4, 1 - 1e-4]): a linear
        model over logits is a weighted log-odds pool, which also recalibrates the blend."""
        p = np.clip(P[:, :, j].T, 1e-4, 1 - 1e-4)
        return np.log(p / (1 - p))

    def _fit_label(self, P: np.ndarray, yj: np.ndarray, j: int) -> Any:
        """One label's logistic regression; a constant when the label never or always occurs."""
        if yj.min() == yj.max():
            return float(yj[0])
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.C, max_iter=1000).fit(self._x(P, j), yj)

    def _gain_shares(self, M: int) -> np.ndarray:
        """Absolute coefficients of each model, summed over labels, as shares."""
        mass = np.zeros(M)
        for m in self.models_:
            if not isinstance(m, float):
                mass += np.abs(m.coef_[0])
        return mass / mass.sum() if mass.sum() > 0 else np.full(M, 1.0 / M)


def _proba(model: Any, x: np.ndarray) -> np.ndarray:
    """Positive-class probability of a fitted classifier or a constant."""
    if isinstance(model, float):
        return np.full(len(x), model)
    return model.predict_proba(x)[:, 1]


class SingleModel(WeightedBlender):
    """One model alone: how each model's honest CV is measured (thresholds still tuned)."""

    def __init__(self, index: int = 0) -> None:
        self.index = index

    def fit(self, P: np.ndarray, y: np.ndarray, folds: np.ndarray | None = None) -> SingleModel:
        """Weight 1 on model ``index``."""
        Q = self._prepare(P)
        self._finish(Q, np.eye(len(Q))[self.index])
        return self


def build_blender(cfg: BlendConfig, metric: str, storage: str | None = None,
                  study_name: str = "blend", progress: Progress | None = None) -> Blender:
    """A fresh blender for ``blend.method`` (one per fold: nothing is shared between fits)."""
    TRANSFORMS.get(cfg.transform)  # an unknown name fails here, listing the registered ones
    if cfg.transform == "power" and cfg.method != "optuna":
        raise UserError("blend.transform=power tunes exponents, which only "
                        "blend.method=optuna does")
    return BLENDERS.get(cfg.method).from_config(cfg, metric, storage, study_name, progress)
