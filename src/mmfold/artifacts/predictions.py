"""The prediction-file contract: every file of probabilities mmfold writes, and the one read.

Files (their folders come from :mod:`mmfold.paths`):

- ``runs/<data>/<model>/fold<k>/oof.parquet``: ``id``, ``fold``, one float32 column per label;
  the fold's validation rows (:func:`write_fold_oof`, by the fold runner).
- ``runs/<data>/<model>/fold<k>/test.parquet``: ``id`` + labels; the test set the fold was
  trained with (:func:`write_fold_test`); ``test-<key>.parquet``: another test set, predicted
  later from the fold's saved model (``mmfold predict``), ``<key>`` its
  :func:`mmfold.artifacts.manifest.testset_key`.
- ``oof/<data>/<model>.parquet``: the collected OOF, every train id once (:func:`write_oof`).
- ``oof/<data>/<model>.test.parquet``: test probabilities averaged over folds (:func:`write_test`).
- ``reports/<data>/blend_<name>.oof.parquet``: a blend's own predictions (:func:`write_blend_oof`).

Every reader goes through :func:`read_probs`: the label columns are exactly the vocabulary
(a shifted column is a silent disaster), the ids are exactly the expected ones (rows are
reordered to them; duplicated, missing or unexpected ids are refused), an OOF file's folds are
the folds file's, and the probabilities are finite and in [0, 1]. A file that breaks one of
these raises :class:`PredictionError` (or :class:`MissingPredictions`), naming the file, what
it belongs to and the first offending ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmfold import fileio, hints, paths
from mmfold.errors import UserError

MAX_SHOWN = 5  # ids named in a mismatch message
FOLD_FILES = {"oof": "oof.parquet", "test": "test.parquet"}  # in a fold's run dir


class PredictionError(UserError):
    """A prediction file that does not fit the data: other ids, labels or folds, or values
    that are not probabilities."""


class MissingPredictions(PredictionError):
    """A prediction file that does not exist (an earlier stage has not run)."""


class InvalidPredictions(RuntimeError):
    """A runner produced predictions of the wrong shape, or values that are not probabilities
    (a bug in the runner, refused before anything is written)."""


# ---------------------------------------------------------------------------------------------
# writing


def prob_frame(ids: pd.Series | Sequence[str], probs: np.ndarray, classes: Sequence[str],
               fold: int | np.ndarray | None = None) -> pd.DataFrame:
    """The on-disk layout: ``id`` [``fold``] + one float32 column per class."""
    df = pd.DataFrame(np.asarray(probs, np.float32), columns=list(classes))
    df.insert(0, "id", list(ids))
    if fold is not None:
        df.insert(1, "fold", fold)
    return df


def check_probs(p: np.ndarray, shape: tuple[int, int], what: str) -> None:
    """Predictions about to be written must be finite probabilities of the right shape."""
    if p.shape != shape:
        raise InvalidPredictions(f"{what}: shape {p.shape}, expected {shape}")
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise InvalidPredictions(f"{what}: probabilities must be finite and in [0, 1]")


def fold_file(rd: Path, kind: str) -> Path:
    """``<run dir>/oof.parquet`` or ``<run dir>/test.parquet``."""
    return rd / FOLD_FILES[kind]


def fold_test_file(rd: Path, key: str, trained_key: str | None) -> Path:
    """A fold's test probabilities for the test set ``key``: ``test.parquet`` when that is the
    set the fold was trained with (``trained_key``, from its ``done.json``), else
    ``test-<key>.parquet`` (written by ``mmfold predict``)."""
    return fold_file(rd, "test") if key == trained_key else rd / f"test-{key}.parquet"


def _write_checked(path: Path, ids: Sequence[str], probs: np.ndarray, classes: Sequence[str],
                   what: str, fold: int | np.ndarray | None = None) -> Path:
    """Check, then write atomically."""
    check_probs(np.asarray(probs), (len(ids), len(classes)), what)
    return fileio.write_parquet(prob_frame(ids, probs, classes, fold=fold), path)


def write_fold_oof(rd: Path, ids: pd.Series | Sequence[str], probs: np.ndarray,
                   classes: Sequence[str], fold: int, what: str) -> Path:
    """A fold's predictions of its validation rows ``ids``; ``what`` names them in errors."""
    return _write_checked(fold_file(rd, "oof"), list(ids), probs, classes, what, fold)


def write_fold_test(rd: Path, ids: pd.Series | Sequence[str], probs: np.ndarray,
                    classes: Sequence[str], what: str, path: Path | None = None) -> Path:
    """A fold's predictions of the test set (``path``: default ``test.parquet``)."""
    return _write_checked(path or fold_file(rd, "test"), list(ids), probs, classes, what)


def write_oof(data: str, model: str, ids: Sequence[str], probs: np.ndarray,
              classes: Sequence[str], folds: np.ndarray) -> Path:
    """``oof/<data>/<model>.parquet``: every train id once, with its fold."""
    return _write_checked(paths.oof_file(data, model), ids, probs, classes,
                          f"model '{model}' OOF", np.asarray(folds))


def write_test(data: str, model: str, ids: Sequence[str], probs: np.ndarray,
               classes: Sequence[str]) -> Path:
    """``oof/<data>/<model>.test.parquet``."""
    return _write_checked(paths.test_pred_file(data, model), ids, probs, classes,
                          f"model '{model}' test")


# ---------------------------------------------------------------------------------------------
# the one validated read


def _first(ids: list[str] | set[str]) -> str:
    """The first few ids of a mismatch, for a message a user can act on."""
    ids = sorted(ids) if isinstance(ids, set) else list(ids)
    more = f" ... ({len(ids)} in all)" if len(ids) > MAX_SHOWN else ""
    return ", ".join(repr(i) for i in ids[:MAX_SHOWN]) + more


def _check_columns(df: pd.DataFrame, classes: Sequence[str], need: list[str], where: str) -> None:
    """Label columns must be exactly the vocabulary: a shifted column is a silent disaster."""
    want = need + list(classes)
    cols = [str(c) for c in df.columns]
    missing = [c for c in want if c not in cols]
    extra = [c for c in cols if c not in set(want)]
    if missing or extra:
        raise PredictionError(f"{where}: label columns do not match folds/labels.json: missing "
                              f"{missing[:MAX_SHOWN]}, unexpected {extra[:MAX_SHOWN]}")


def align_rows(df: pd.DataFrame, ids: Sequence[str], where: str, fix: str,
               against: str = "the folds file") -> pd.DataFrame:
    """Rows reordered to ``ids``; refuse duplicated, missing or unexpected ids (``fix`` says
    what to do, ``against`` where the expected ids come from)."""
    got = df["id"].astype(str)
    dup = got[got.duplicated()].tolist()
    if dup:
        raise PredictionError(f"{where}: duplicated ids, first: {_first(dup)}")
    have = set(got)
    missing = [i for i in ids if i not in have]
    extra = have - set(ids)
    if missing or extra:
        raise PredictionError(f"{where}: ids do not match {against}: {len(missing)} missing "
                              f"(first: {_first(missing)}), {len(extra)} unexpected "
                              f"(first: {_first(extra)}); {fix}")
    return df.assign(id=got).set_index("id").loc[list(ids)]


LEAK = "it was trained on other folds, so blending it would leak; retrain it or re-make the folds"


def _check_folds(df: pd.DataFrame, ids: Sequence[str], folds: np.ndarray, where: str, data: str,
                 fix: str = LEAK) -> None:
    """An OOF file's fold column must be the folds file's, row by row (``df`` aligned to ``ids``)."""
    bad = df["fold"].to_numpy(np.int64) != np.asarray(folds)
    if bad.any():
        first = [ids[i] for i in np.flatnonzero(bad)]
        raise PredictionError(f"{where}: folds differ from {paths.folds_file(data)} for "
                              f"{bad.sum()} ids (first: {_first(first)}); {fix}")


def _finite(a: np.ndarray, where: str) -> np.ndarray:
    """NaN, inf or out-of-range probabilities would poison every blend silently."""
    if not np.isfinite(a).all():
        raise PredictionError(f"{where}: {int((~np.isfinite(a)).sum())} NaN/inf probabilities")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise PredictionError(f"{where}: probabilities outside [0, 1] (min {a.min():.3g}, max "
                              f"{a.max():.3g}); were logits saved instead of probabilities?")
    return a


def _read_frame(path: Path, where: str, absent: str | None) -> pd.DataFrame:
    """The file's frame, or :class:`MissingPredictions` (``absent``: the message)."""
    if not path.exists():
        raise MissingPredictions(absent or f"{where}: not found")
    return pd.read_parquet(path)


def read_probs(path: Path, ids: Sequence[str], classes: Sequence[str], where: str, data: str,
               folds: np.ndarray | None = None, fix: str | None = None,
               against: str = "the folds file", absent: str | None = None) -> np.ndarray:
    """Read and validate one prediction file: every reader of probabilities comes here.

    Args:
        path: The parquet file.
        ids: The ids it must hold, exactly; the rows are returned in this order.
        classes: The label vocabulary; its columns must be exactly these (plus ``id``, and
            ``fold`` when ``folds`` is given).
        where: What the file is, for messages (``model 'a' (oof/d/a.parquet)``).
        data: The dataset (messages name its folds file).
        folds: For an OOF file, the fold of every id: its ``fold`` column must equal it. None
            for a test file, which has no fold column.
        fix: What to do about mismatched ids, appended to that message (default: collect again).
        against: Where ``ids`` come from, for that message.
        absent: The message when the file does not exist.

    Returns:
        ``(len(ids), len(classes))`` float64 probabilities.

    Raises:
        MissingPredictions: the file does not exist.
        PredictionError: other label columns, ids or folds; NaN, inf or values outside [0, 1].
    """
    df = _read_frame(path, where, absent)
    _check_columns(df, classes, ["id"] + (["fold"] if folds is not None else []), where)
    df = align_rows(df, ids, where, fix or f"re-run `{hints.make('collect', data)}`", against)
    if folds is not None:
        _check_folds(df, ids, folds, where, data)
    return _finite(df[list(classes)].to_numpy(np.float64), where)


# ---------------------------------------------------------------------------------------------
# the readers of each file


def available_models(data: str) -> list[str]:
    """Models with a collected OOF file (``oof/<data>/<model>.parquet``, not ``*.test``)."""
    folder = paths.oof_dir(data)
    stems = (p.stem for p in folder.glob("*.parquet") if not p.name.endswith(".test.parquet"))
    return sorted(s for s in stems if not paths.is_variant(s))  # sweep trials / ablation variants


def _not_collected(data: str, model: str, path: Path) -> str:
    return (f"model '{model}': {path} not found; collected models: {available_models(data)} "
            f"(run `{hints.make('train', data, model=model)}`)")


def read_oof(data: str, model: str, ids: Sequence[str], classes: Sequence[str],
             folds: np.ndarray) -> np.ndarray:
    """A collected model's OOF probabilities in ``ids`` (train) order, its folds checked."""
    path = paths.oof_file(data, model)
    return read_probs(path, ids, classes, f"model '{model}' ({path})", data, folds=folds,
                      absent=_not_collected(data, model, path))


def read_test(data: str, model: str, ids: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """A collected model's test probabilities in ``ids`` (test) order."""
    path = paths.test_pred_file(data, model)
    return read_probs(path, ids, classes, f"model '{model}' ({path})", data,
                      against="the test set", absent=_not_collected(data, model, path))


def _retrain(data: str, model: str, fold: int) -> str:
    return f"retrain it ({hints.make('train', data, model=model, fold=fold, force=True)})"


def read_fold_oofs(data: str, model: str, ids: Sequence[str], classes: Sequence[str],
                   fold_of_row: np.ndarray, folds: Sequence[int] | None = None) -> np.ndarray:
    """The fold files' OOF probabilities of the train rows in ``folds`` (default all), in train order.

    Each ``runs/<data>/<model>/fold<k>/oof.parquet`` must hold exactly the ids the folds file
    puts in fold k, with fold k: so every row is predicted once, by the fold that did not
    train on it (scikit-learn's ``cross_val_predict`` promise).

    Args:
        ids: Every train id, train order.
        fold_of_row: The fold of every train row.
        folds: The folds to read.

    Returns:
        ``(rows, L)`` float64 for the rows whose fold is in ``folds``, in train order.
    """
    ids, fold_of_row = list(ids), np.asarray(fold_of_row)
    chosen = [int(k) for k in (np.unique(fold_of_row) if folds is None else folds)]
    rows = np.flatnonzero(np.isin(fold_of_row, chosen))
    out = np.zeros((len(ids), len(classes)))
    for k in chosen:
        path = fold_file(paths.run_dir(data, model, k), "oof")
        mine = np.flatnonzero(fold_of_row == k)
        out[mine] = read_probs(path, [ids[i] for i in mine], classes, f"{model} fold {k} ({path})",
                               data, folds=np.full(len(mine), k), fix=_retrain(data, model, k))
    return out[rows]


def mean_fold_tests(data: str, model: str, ids: Sequence[str], classes: Sequence[str],
                    files: Sequence[Path]) -> np.ndarray | None:
    """The folds' test probabilities (``files``, one per fold) averaged, in ``ids`` (test)
    order; None unless every file exists."""
    if not all(f.exists() for f in files):
        return None
    probs = [read_probs(f, ids, classes, f"{model} fold {k} ({f})", data, against="the test set",
                        fix=f"re-run `{hints.make('predict', data, model=model)}`") for k, f in enumerate(files)]
    return np.mean(probs, axis=0)


# ---------------------------------------------------------------------------------------------
# every model of a blend at once


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
        raise UserError(f"no models to blend: nothing in {paths.oof_dir(data)} (run `{hints.make('train', data)}`)")
    if folds is None:
        from mmfold.data.competition import load_folds

        folds = load_folds(comp)
    ids, classes = comp.train["id"].astype(str).tolist(), list(comp.classes)
    if check_stale:
        from mmfold.artifacts.manifest import check_all_fresh

        check_all_fresh(models, comp, test=with_test)
    P = np.stack([read_oof(data, m, ids, classes, folds) for m in models])
    out = OOFSet(list(models), classes, ids, np.asarray(folds), P)
    if with_test and comp.test is not None:
        out.test_ids = comp.test["id"].astype(str).tolist()
        out.test = np.stack([read_test(data, m, out.test_ids, classes) for m in models])
    return out


# ---------------------------------------------------------------------------------------------
# a blend's own predictions


BLEND_KINDS = ("honest_prob", "honest_pred", "in_sample_prob", "in_sample_pred")


def blend_oof_file(data: str, name: str) -> Path:
    """``reports/<data>/blend_<name>.oof.parquet``, next to the blend's report."""
    return paths.reports_dir(data) / f"blend_{name}.oof.parquet"


def _column(kind: str, label: str) -> str:
    """Column of one label's values of one kind (``honest_prob:<label>``)."""
    return f"{kind}:{label}"


def write_blend_oof(path: Path, ids: Sequence[str], folds: np.ndarray, classes: Sequence[str],
                    arrays: dict[str, np.ndarray]) -> Path:
    """Write, id-keyed and atomically, ``{kind: (n, L) array}`` for every :data:`BLEND_KINDS`:
    probabilities as float32, 0/1 predictions as uint8."""
    frames = [pd.DataFrame({"id": list(ids), "fold": np.asarray(folds, np.int64)})]
    for kind in BLEND_KINDS:
        dtype = np.uint8 if kind.endswith("_pred") else np.float32
        frames.append(pd.DataFrame(np.asarray(arrays[kind], dtype),
                                   columns=[_column(kind, c) for c in classes]))
    return fileio.write_parquet(pd.concat(frames, axis=1), path)


def read_blend_oof(path: Path, ids: Sequence[str], classes: Sequence[str], folds: np.ndarray,
                   data: str) -> dict[str, np.ndarray]:
    """A blend's saved predictions in ``ids`` (train) order: ``{kind: (n, L) array}`` for
    :data:`BLEND_KINDS`, as stored (float32 probabilities, uint8 predictions).

    Raises:
        MissingPredictions: the file is missing (a blend made before blends saved them).
        PredictionError: it was made on other ids, labels or folds than the current ones.
    """
    where, fix = f"blend predictions {path}", f"re-run `{hints.make('blend', data)}`"
    df = _read_frame(path, where, f"{path} not found: this blend was made before `mmfold blend` "
                                  f"saved its predictions; {fix} to report it")
    cols = [_column(k, c) for k in BLEND_KINDS for c in classes]
    try:
        _check_columns(df, cols, ["id", "fold"], where)
    except PredictionError as e:
        raise PredictionError(f"{e}: made with other labels; {fix}") from None
    df = align_rows(df, ids, where, f"the data changed since the blend; {fix}")
    _check_folds(df, ids, folds, where, data, f"made on other folds; {fix}")
    out = {k: df[[_column(k, c) for c in classes]].to_numpy() for k in BLEND_KINDS}
    for kind in ("honest_prob", "in_sample_prob"):
        _finite(out[kind], f"{where} {kind}")
    return out
