"""Blending several models' out-of-fold probabilities, and scoring the blend honestly.

Every blender is an sklearn-style estimator over a stack of probabilities ``P`` of shape
``(n_models, n_rows, n_labels)``: ``fit(P, y, folds)`` returns self and sets ``weights_`` (one
per model, summing to 1) and ``oof_`` (its predictions for the rows it was fitted on, as
honest as the method allows: the blend itself for weighted means, the stacker's out-of-fold
predictions for LightGBM); ``predict(P)`` returns blended probabilities ``(n_rows, n_labels)``.
Thresholds are fitted on ``oof_`` by :class:`mmfold.ensemble.thresholds.ThresholdOptimizer`.

:func:`nested_cv` is what the submissions log reports: for each fold k, blender and thresholds
are fitted on the other folds only and scored on fold k.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import signal
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import pandas as pd

from mmfold import paths
from mmfold.config import BlendConfig
from mmfold.errors import UserError
from mmfold.metrics import METRICS
from mmfold.registry import Registry
from mmfold.ensemble.scoring import threshold_params
from mmfold.ensemble.thresholds import ThresholdOptimizer

BLENDERS = Registry("blend method")
TRANSFORMS = Registry("blend transform")
MAX_SHOWN = 5  # ids named in a mismatch message


# ---------------------------------------------------------------------------------------------
# loading and aligning OOF files


@dataclass
class OOFSet:
    """Every model's OOF (and test) probabilities, aligned to train (and test) order."""

    models: list[str]
    classes: list[str]
    ids: list[str]
    folds: np.ndarray  # (n,)
    P: np.ndarray  # (M, n, L)
    test_ids: list[str] | None = None
    test: np.ndarray | None = None  # (M, n_test, L)


def available_models(data: str) -> list[str]:
    """Models with a collected OOF file (``oof/<data>/<model>.parquet``, not ``*.test``)."""
    folder = paths.oof_dir(data)
    stems = (p.stem for p in folder.glob("*.parquet") if not p.name.endswith(".test.parquet"))
    return sorted(s for s in stems if not paths.is_variant(s))  # sweep trials / ablation variants


def _first(ids: list[str] | set[str]) -> str:
    """The first few ids of a mismatch, for a message a user can act on."""
    ids = sorted(ids) if isinstance(ids, set) else list(ids)
    more = f" ... ({len(ids)} in all)" if len(ids) > MAX_SHOWN else ""
    return ", ".join(repr(i) for i in ids[:MAX_SHOWN]) + more


def _read(path: Any, model: str, data: str) -> pd.DataFrame:
    """Read one prediction file, or say which models do exist."""
    if not path.exists():
        raise UserError(f"model '{model}': {path} not found; collected models: "
                        f"{available_models(data)} (run `make train MODEL={model}`)")
    return pd.read_parquet(path)


def _check_columns(df: pd.DataFrame, classes: list[str], need: list[str], where: str) -> None:
    """Label columns must be exactly the vocabulary: a shifted column is a silent disaster."""
    cols = [str(c) for c in df.columns]
    missing = [c for c in need + classes if c not in cols]
    extra = [c for c in cols if c not in set(need + classes)]
    if missing or extra:
        raise UserError(f"{where}: label columns do not match folds/labels.json: missing "
                        f"{missing[:MAX_SHOWN]}, unexpected {extra[:MAX_SHOWN]}")


def align_rows(df: pd.DataFrame, ids: list[str], where: str, fix: str = "re-run `make collect`") -> pd.DataFrame:
    """Rows reordered to ``ids``; refuse duplicated, missing or unexpected ids (``fix`` says what to do)."""
    got = df["id"].astype(str)
    dup = got[got.duplicated()].tolist()
    if dup:
        raise UserError(f"{where}: duplicated ids, first: {_first(dup)}")
    have = set(got)
    missing = [i for i in ids if i not in have]
    extra = have - set(ids)
    if missing or extra:
        raise UserError(f"{where}: ids do not match the folds file: {len(missing)} missing "
                        f"(first: {_first(missing)}), {len(extra)} unexpected "
                        f"(first: {_first(extra)}); {fix}")
    return df.assign(id=got).set_index("id").loc[ids]


def _load_one(data: str, model: str, classes: list[str], ids: list[str],
              folds: np.ndarray) -> np.ndarray:
    """One model's OOF probabilities in train order, its folds checked against ours."""
    path = paths.oof_file(data, model)
    where = f"model '{model}' ({path})"
    df = _read(path, model, data)
    _check_columns(df, classes, ["id", "fold"], where)
    df = align_rows(df, ids, where)
    bad = df["fold"].to_numpy(np.int64) != folds
    if bad.any():
        first = [ids[i] for i in np.flatnonzero(bad)]
        raise UserError(f"{where}: folds differ from {paths.folds_file(data)} for "
                        f"{bad.sum()} ids (first: {_first(first)}); it was trained on other "
                        "folds, so blending it would leak; retrain it or re-make the folds")
    return _finite(df[classes].to_numpy(np.float64), where)


def _load_test(data: str, model: str, classes: list[str], ids: list[str]) -> np.ndarray:
    """One model's test probabilities in test order."""
    path = paths.test_pred_file(data, model)
    where = f"model '{model}' ({path})"
    df = _read(path, model, data)
    _check_columns(df, classes, ["id"], where)
    return _finite(align_rows(df, ids, where)[classes].to_numpy(np.float64), where)


def _finite(a: np.ndarray, where: str) -> np.ndarray:
    """NaN, inf or out-of-range probabilities would poison every blend silently."""
    if not np.isfinite(a).all():
        raise UserError(f"{where}: {int((~np.isfinite(a)).sum())} NaN/inf probabilities")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise UserError(f"{where}: probabilities outside [0, 1] (min {a.min():.3g}, max {a.max():.3g}); "
                        "were logits saved instead of probabilities?")
    return a


def load_oofs(data: str, models: list[str], comp: Any, folds: np.ndarray | None = None,
              with_test: bool = True, check_stale: bool = True) -> OOFSet:
    """Load and align every model's OOF (and test) predictions.

    Args:
        data: Data config name.
        models: Model names (``oof/<data>/<model>.parquet``).
        comp: The :class:`mmfold.data.competition.Competition` (train/test ids and classes).
        folds: Fold of every train row; read from the folds file when None.
        with_test: Also load ``<model>.test.parquet`` when the competition has a test set.
        check_stale: Refuse models whose folds, labels, data or config changed since they were
            collected (hashes in ``oof/<data>/<model>.json``).

    Raises:
        UserError: a missing file, or a model whose ids, folds or label columns differ from
            the folds file, naming the model and the first differing ids.
    """
    if not models:
        raise UserError(f"no models to blend: nothing in {paths.oof_dir(data)} (run `make train`)")
    if folds is None:
        from mmfold.data.competition import load_folds

        folds = load_folds(comp)
    ids, classes = comp.train["id"].astype(str).tolist(), list(comp.classes)
    if check_stale:
        from mmfold.artifacts.manifest import check_fresh

        for m in models:
            check_fresh(m, comp)
    P = np.stack([_load_one(data, m, classes, ids, folds) for m in models])
    out = OOFSet(list(models), classes, ids, np.asarray(folds), P)
    if with_test and comp.test is not None:
        out.test_ids = comp.test["id"].astype(str).tolist()
        out.test = np.stack([_load_test(data, m, classes, out.test_ids) for m in models])
    return out


# ---------------------------------------------------------------------------------------------
# progress


PROGRESS_EVERY_S = 5.0  # at most one trial line per this many seconds: alive, never a flood


class Progress:
    """Which stage a blend is in, as lines on ``stream`` (stderr for ``mmfold blend``).

    A blend on real data runs for minutes; without this, the terminal shows nothing until the
    end. Stages print at once; Optuna trials at most every :data:`PROGRESS_EVERY_S` seconds.
    ``Progress()`` (no stream) is silent: library callers and benchmarks pass nothing.
    """

    def __init__(self, stream: TextIO | None = None, prefix: str = "blend") -> None:
        self.stream = stream
        self.prefix = prefix
        self.where = ""

    def stage(self, message: str) -> None:
        """Print a stage line; trial lines that follow are labelled with it."""
        self.where = message
        self._print(message)

    def trial_callback(self, total: int) -> Callable[[Any, Any], None]:
        """An Optuna callback printing ``trial done/total, best`` now and then."""
        last = time.monotonic()

        def report(study: Any, trial: Any) -> None:
            nonlocal last
            if self.stream is None or time.monotonic() - last < PROGRESS_EVERY_S:
                return
            last = time.monotonic()
            done = len(_complete(study))
            best = f", best {study.best_value:.4f}" if done else ""
            self._print(f"{self.where}: trial {done}/{total}{best}")

        return report

    def _print(self, message: str) -> None:
        if self.stream is not None:
            print(f"{self.prefix}: {message}", file=self.stream, flush=True)


# ---------------------------------------------------------------------------------------------
# transforms applied to each model's probabilities before they are averaged


@TRANSFORMS.register("none")
class IdentityTransform:
    """Average probabilities as they are."""

    def fit(self, P: np.ndarray) -> IdentityTransform:
        """Nothing to learn."""
        return self

    def __call__(self, P: np.ndarray) -> np.ndarray:
        return P


@TRANSFORMS.register("power")
class PowerTransform(IdentityTransform):
    """Same as none here; the per-model exponents are tuned by the Optuna blender."""


@TRANSFORMS.register("rank")
class RankTransform:
    """Each model's probability -> its empirical CDF among that model's training OOF.

    Rank averaging removes calibration differences between models. Ranks are taken against the
    *training* rows (stored at fit), so a test row's value does not depend on the other test
    rows, and the thresholds fitted on OOF ranks mean the same on test.
    """

    def fit(self, P: np.ndarray) -> RankTransform:
        """Store each (model, label) column sorted."""
        self.sorted_ = np.sort(P, axis=1)
        return self

    def __call__(self, P: np.ndarray) -> np.ndarray:
        M, n, L = self.sorted_.shape
        out = np.empty(P.shape)
        for m in range(M):
            for j in range(L):
                out[m, :, j] = np.searchsorted(self.sorted_[m, :, j], P[m, :, j], side="right")
        return out / n


# ---------------------------------------------------------------------------------------------
# blenders


def _score_after_thresholds(prob: np.ndarray, y: np.ndarray, thr: dict[str, Any]) -> float:
    """The objective of every blender: the metric after fitting per-label thresholds."""
    return ThresholdOptimizer(**thr).fit(prob, y).score_


class WeightedBlender:
    """Shared machinery: ``predict`` is the weighted mean of transformed probabilities."""

    transform: str = "none"

    def _prepare(self, P: np.ndarray) -> np.ndarray:
        """Fit the transform on the training stack and return the transformed stack."""
        P = _check_stack(P)
        self.transform_ = TRANSFORMS.get(self.transform)().fit(P)
        self.exponents_ = np.ones(len(P))
        return self.transform_(P)

    def _finish(self, Q: np.ndarray, weights: np.ndarray) -> None:
        """Store normalised weights and the in-sample blend as ``oof_``."""
        self.weights_ = np.asarray(weights, float) / np.sum(weights)
        self.oof_ = _mix(Q, self.weights_, self.exponents_)

    def predict(self, P: np.ndarray) -> np.ndarray:
        """Blended probabilities ``(n, L)``."""
        return _mix(self.transform_(_check_stack(P)), self.weights_, self.exponents_)


def _mix(Q: np.ndarray, weights: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """Weighted mean over models of ``Q[m] ** exponents[m]``."""
    out = np.zeros(Q.shape[1:])
    for w, e, q in zip(weights, exponents, Q):
        if w > 0:
            out += w * (q if e == 1 else np.power(q, e))
    return out


def _check_stack(P: np.ndarray) -> np.ndarray:
    """A float stack ``(M, n, L)`` (finiteness is checked when files are loaded)."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 3:
        raise ValueError(f"expected probabilities of shape (models, rows, labels), got {P.shape}")
    return P


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
        done = len(_complete(study))
        if done < self.n_trials:
            study.sampler = _sampler(self.seed + done)
            self._optimize(study, Q, y, self.n_trials - done)
        self.study_ = study
        weights, self.exponents_ = self._decode(study.best_trial.params, len(Q))
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
        storage = _storage(self.storage) if self.storage else None
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                    sampler=_sampler(self.seed), load_if_exists=True)
        if storage is not None:
            with _heartbeat_api():
                optuna.storages.fail_stale_trials(study)  # trials of a killed run
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
        return _score_after_thresholds(_mix(Q, weights / weights.sum(), exponents), y, thr)

    def _decode(self, params: dict[str, float], M: int) -> tuple[np.ndarray, np.ndarray]:
        """Trial parameters -> (unnormalised weights, exponents)."""
        weights = np.array([-np.log(params[f"u{m}"]) for m in range(M)])
        exps = np.array([params.get(f"p{m}", 1.0) for m in range(M)])
        return weights, exps


# A trial whose process was killed stays RUNNING forever unless something notices: with a
# heartbeat, a trial silent for GRACE_S seconds is marked FAIL when a study is next opened.
HEARTBEAT_S = 10
GRACE_S = 60


@contextlib.contextmanager
def _heartbeat_api() -> Iterator[None]:
    """Optuna flags its heartbeat API "experimental"; we rely on it knowingly, so say nothing."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


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


@functools.lru_cache(maxsize=8)
def _storage(url: str) -> Any:
    """Optuna storage for a URL; SQLite gets write-ahead logging.

    Optuna commits several times per trial; with SQLite's default journal each commit is an
    fsync, which measured ~8x slower than an in-memory study here. WAL with synchronous=NORMAL
    keeps the database consistent after a crash (at worst the last trials are lost, and a
    resumed study redoes them).
    """
    import optuna

    if not url.startswith("sqlite:///"):
        return url
    path = url.removeprefix("sqlite:///")

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=60, check_same_thread=False)  # heartbeat thread
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    with _heartbeat_api():
        return optuna.storages.RDBStorage(url, engine_kwargs={"creator": connect},
                                          heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)


def _sampler(seed: int) -> Any:
    """Seeded TPE: the same OOF and seed give the same study."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


def _complete(study: Any) -> list[Any]:
    """Finished trials (a killed run leaves RUNNING ones behind; they are not counted)."""
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _anchor_points(M: int) -> list[dict[str, float]]:
    """Equal weights, then each model alone (u=1 -> weight 0, u=1/e -> weight 1)."""
    equal = {f"u{m}": float(np.exp(-1.0)) for m in range(M)}
    singles = [{f"u{m}": float(np.exp(-1.0)) if m == k else 1.0 for m in range(M)}
               for k in range(M)] if M > 1 else []
    return [equal] + singles


@BLENDERS.register("lgbm")
class LGBMStacker:
    """A LightGBM classifier per label over every model's probability of that label.

    With ``cooccurrence`` the features also hold the mean probability of every label, so the
    stacker can learn that "night" rarely comes with "striped". Trained out-of-fold on
    ``folds``: ``oof_`` holds, for each row, the prediction of stackers that never saw it (what
    the thresholds are fitted on); ``predict`` uses stackers refitted on all rows.

    Args:
        n_estimators, learning_rate, num_leaves, min_child_samples: LightGBM settings, small so
            that one label's stacker trains in milliseconds.
        cooccurrence: Add the mean probability of every label as features.
        seed: LightGBM seed.
        num_threads: LightGBM threads. 1 by default: a stacker fits on a few thousand rows
            and a handful of features, where OpenMP start-up costs more than it saves, and on
            a busy 2-core machine 2 threads measured ~10-100x slower than 1.

    Attributes:
        weights_: Each model's share of the total split gain (a readable importance).
        oof_: ``(n, L)`` out-of-fold stacked probabilities.
        models_: One fitted classifier (or a constant) per label.
    """

    def __init__(self, n_estimators: int = 60, learning_rate: float = 0.1, num_leaves: int = 7,
                 min_child_samples: int = 10, cooccurrence: bool = False, seed: int = 42,
                 num_threads: int = 1) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.cooccurrence = cooccurrence
        self.seed = seed
        self.num_threads = num_threads

    @classmethod
    def from_config(cls, cfg: BlendConfig, metric: str, storage: str | None, study_name: str,
                    progress: Progress | None = None) -> LGBMStacker:
        """From ``blend.*``; trees are invariant to monotone transforms, so none is applied."""
        return cls(cooccurrence=cfg.cooccurrence, seed=cfg.seed)

    def fit(self, P: np.ndarray, y: np.ndarray, folds: np.ndarray | None = None) -> LGBMStacker:
        """Out-of-fold stackers for ``oof_``, then one per label on every row."""
        P, y = _check_stack(P), np.asarray(y)
        if folds is None or len(np.unique(folds)) < 2:
            raise UserError("blend.method=lgbm trains out-of-fold, so it needs >= 2 folds in the "
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
        P = _check_stack(P)
        return np.stack([_proba(m, self._x(P, j)) for j, m in enumerate(self.models_)], axis=1)

    def _x(self, P: np.ndarray, j: int) -> np.ndarray:
        """Features for label j: every model's probability of j (+ mean of every label)."""
        x = P[:, :, j].T
        return np.hstack([x, P.mean(0)]) if self.cooccurrence else x

    def _fit_label(self, P: np.ndarray, yj: np.ndarray, j: int) -> Any:
        """One label's classifier; a constant when the label never or always occurs."""
        if yj.min() == yj.max():
            return float(yj[0])
        from lightgbm import LGBMClassifier

        clf = LGBMClassifier(n_estimators=self.n_estimators, learning_rate=self.learning_rate,
                             num_leaves=self.num_leaves, min_child_samples=self.min_child_samples,
                             importance_type="gain", num_threads=self.num_threads,
                             random_state=self.seed,
                             verbose=-1)
        return clf.fit(self._x(P, j), yj)

    def _gain_shares(self, M: int) -> np.ndarray:
        """Split gain on each model's own-label feature, summed over labels, as shares."""
        gain = np.zeros(M)
        for m in self.models_:
            if not isinstance(m, float):
                gain += m.feature_importances_[:M]
        return gain / gain.sum() if gain.sum() > 0 else np.full(M, 1.0 / M)


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


# ---------------------------------------------------------------------------------------------
# building from the config, honest scoring


def build_blender(cfg: BlendConfig, metric: str, storage: str | None = None,
                  study_name: str = "blend", progress: Progress | None = None) -> Any:
    """A fresh blender for ``blend.method`` (one per fold: nothing is shared between fits)."""
    TRANSFORMS.get(cfg.transform)  # an unknown name fails here, listing the registered ones
    if cfg.transform == "power" and cfg.method != "optuna":
        raise UserError("blend.transform=power tunes exponents, which only "
                        "blend.method=optuna does")
    return BLENDERS.get(cfg.method).from_config(cfg, metric, storage, study_name, progress)


@dataclass
class NestedCV:
    """Honest scores: fold k predicted by a blender and thresholds fitted without fold k."""

    per_fold: list[float]
    prob: np.ndarray  # (n, L) blended probabilities, each row from fits that never saw it
    pred: np.ndarray  # (n, L) 0/1 after those fits' thresholds

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_fold))

    @property
    def std(self) -> float:
        return float(np.std(self.per_fold))

    def summary(self) -> dict[str, Any]:
        """JSON-able mean, std and per-fold scores."""
        return {"mean": self.mean, "std": self.std, "per_fold": [float(s) for s in self.per_fold]}


def nested_cv(P: np.ndarray, y: np.ndarray, folds: np.ndarray,
              make_blender: Callable[[int], Any], make_thresholds: Callable[[], ThresholdOptimizer],
              metric: str = "samples", progress: Progress | None = None) -> NestedCV:
    """Score a blend recipe on folds it was never fitted on.

    For each fold k: a new blender is fitted on the other folds' OOF (``folds`` passed along,
    so a stacker trains out-of-fold inside them), thresholds on that blender's ``oof_``, and
    both are applied to fold k. Fitting anything on fold k would flatter the score.

    Args:
        P: ``(M, n, L)`` OOF probabilities.
        y: ``(n, L)`` 0/1 labels.
        folds: Fold of every row.
        make_blender: ``fold -> unfitted blender``.
        make_thresholds: ``() -> unfitted ThresholdOptimizer``.
        metric: A :data:`mmfold.metrics.METRICS` name to score each fold.
        progress: Prints ``nested CV fold i/K`` as each fold starts (silent when None).
    """
    P, y, folds = _check_stack(P), np.asarray(y), np.asarray(folds)
    prob, pred = np.zeros(P.shape[1:]), np.zeros(P.shape[1:], np.uint8)
    scores, ks = [], np.unique(folds)
    for i, k in enumerate(ks):
        if progress is not None:
            progress.stage(f"nested CV fold {i + 1}/{len(ks)} (fitted on the other {len(ks) - 1})")
        tr, te = folds != k, folds == k
        blender = make_blender(int(k)).fit(P[:, tr], y[tr], folds[tr])
        thresholds = make_thresholds().fit(blender.oof_, y[tr])
        prob[te] = blender.predict(P[:, te])
        pred[te] = thresholds.predict(prob[te])
        scores.append(float(METRICS[metric](y[te], pred[te])))
    return NestedCV(scores, prob, pred)


@dataclass
class BlendFit:
    """Everything ``mmfold blend`` reports: the final fits and the honest scores."""

    models: list[str]
    blender: Any  # fitted on all OOF: used for the test submission
    thresholds: ThresholdOptimizer  # fitted on all of the blender's oof_
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
    make_thresholds = functools.partial(ThresholdOptimizer, **threshold_params(cfg, metric))

    def make_blender(label: str) -> Any:
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
