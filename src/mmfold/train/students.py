"""Soft targets for student members (``kind: student``): distillation and pseudo-labelling
without fold leakage. This module owns the rule; nothing else decides which teacher output a
fold may see.

The rule: the student of fold k is scored on fold k, so nothing it learns from may depend on
fold k's labels. And a student is only as current as its teachers: each fold records what it
was made from (:func:`upstream`), so a retrained teacher or an edited base makes it stale.

- **Pseudo-labels** (``pseudo: true``): the test rows, labelled by the mean of the teachers'
  *fold-k* test probabilities (``runs/<data>/<teacher>/fold<k>/test.parquet``, or what
  ``mmfold predict`` wrote there for the current test set). A CPU member's fold-k model was
  fitted on every fold but k and never looked at fold k's labels. A torch teacher is refused:
  its fold-k checkpoint was *chosen* by fold k's labels (best epoch, early stopping), so its
  test probabilities carry a little of them.
- **Distillation** (``distill: a``): each train row's target is ``(1 - a) * label + a *
  teacher``, where the teacher probability of a row of fold j comes from a teacher refitted on
  the folds other than j *and* k ("inner" out-of-fold). The usual OOF file would leak: its
  fold-j rows come from models trained on fold k. One inner fit (excluding folds {j, k})
  scores the rows of both j and k, so a teacher needs K(K-1)/2 refits, cached under the
  student's run folder (so it needs 3 folds or more). Only CPU-member teachers are refitted
  here (seconds each).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from mmfold import fileio, hints, paths
from mmfold.artifacts import predictions
from mmfold.artifacts.manifest import data_fingerprints, testset_key, upstream_keys
from mmfold.config import Config, learned_settings, load_config, stable_hash
from mmfold.cpu.members import MEMBERS, STUDENT_DEFAULTS, SoftTargets, fit_member_fold, resolve_params
from mmfold.data.competition import Competition
from mmfold.errors import UserError

STUDENT = "student"


def training_targets(cfg: Config, comp: Competition, fold_of_row: np.ndarray, fold: int) -> SoftTargets | None:
    """The soft targets of a student's fold ``fold`` (None for any other kind).

    Raises:
        UserError: a torch or student teacher, distillation with fewer than 3 folds, a
            teacher fold that is not trained.
    """
    if cfg.model.kind != STUDENT:
        return None
    p = resolve_params(cfg, STUDENT_DEFAULTS)
    train = fold_of_row != fold
    y = comp.y()[train].astype(np.float64)
    a = float(p["distill"])
    if not 0.0 <= a <= 1.0:
        raise UserError(f"model '{cfg.model.name}': model.params.distill must be in [0, 1], got {a}")
    if a > 0 and len(np.unique(fold_of_row)) < 3:
        raise UserError(f"model '{cfg.model.name}': distillation refits teachers without two folds, "
                        f"which needs 3 folds or more (this data has {len(np.unique(fold_of_row))})")
    if a > 0:
        y = (1.0 - a) * y + a * inner_teacher_probs(cfg, comp, list(p["teachers"]), fold_of_row, fold)[train]
    pseudo_teachers = list(p["pseudo_teachers"] or p["teachers"])
    test = teacher_test_probs(cfg, comp, pseudo_teachers, fold) if p["pseudo"] else None
    return SoftTargets(y, test)


def upstream(cfg: Config, fold: int) -> dict[str, str]:
    """What a student's fold ``fold`` is made from, as
    :func:`mmfold.artifacts.manifest.upstream_keys` (recorded in its ``done.json``; a change
    makes the student stale): the base's and the teachers' configs (distillation refits the
    teachers from them) and, with pseudo-labels, the pseudo-teachers' fold ``fold``. Empty for
    any other kind."""
    if cfg.model.kind != STUDENT:
        return {}
    p = resolve_params(cfg, STUDENT_DEFAULTS)
    config = list(dict.fromkeys([str(p["base"]), *p["teachers"]]))
    trained = list(p["pseudo_teachers"] or p["teachers"]) if p["pseudo"] else []
    return upstream_keys(cfg.source or cfg.data.name, config, trained, fold)


def teacher_test_probs(cfg: Config, comp: Competition, teachers: list[str], fold: int) -> np.ndarray:
    """Mean of the teachers' fold-``fold`` test probabilities, in test order.

    Raises:
        UserError: a teacher without that fold's test file (train it first), or one whose
            file is for another test set or label list.
    """
    if comp.test is None:
        raise UserError(f"model '{cfg.model.name}': pseudo-labels need a test set (data.test_csv)")
    probs = []
    for t in teachers:
        teacher_config(cfg, t, "pseudo-labels")  # a CPU member (see the module docstring)
        path = _teacher_test_file(cfg, comp, t, fold)
        probs.append(predictions.read_probs(
            path, comp.ids("test"), comp.classes, f"teacher {t} fold {fold} ({path})", comp.cfg.name,
            fix=f"retrain teacher {t} ({hints.make('train', comp.cfg.name, model=t, force=True)})",
            against="the test set", absent=f"student '{cfg.model.name}': teacher {t} has no {path}; train it "
                                           f"first ({hints.make('train', comp.cfg.name, model=t)})"))
    return np.mean(probs, axis=0)


def _teacher_test_file(cfg: Config, comp: Competition, teacher: str, fold: int) -> Path:
    """The teacher fold's test file for the current test set (``test.parquet`` if it was
    trained with it, else what ``mmfold predict`` wrote)."""
    rd = paths.run_dir(comp.cfg.name, teacher, fold)
    if not (rd / "done.json").exists():
        raise UserError(f"student '{cfg.model.name}': teacher {teacher} fold {fold} is not trained; "
                        f"train it first ({hints.make('train', comp.cfg.name, model=teacher)})")
    trained_key = json.loads((rd / "done.json").read_text()).get("hashes", {}).get("test")
    return predictions.fold_test_file(rd, testset_key(comp), trained_key)


def inner_teacher_probs(cfg: Config, comp: Competition, teachers: list[str], fold_of_row: np.ndarray,
                        fold: int) -> np.ndarray:
    """``(n_train, L)``: for each row of a fold j != ``fold``, the teachers' mean probability
    from fits that saw neither fold j nor ``fold`` (rows of ``fold`` itself are left at 0)."""
    out = np.zeros((len(fold_of_row), len(comp.classes)))
    for t in teachers:
        tcfg = teacher_config(cfg, t)
        for j in np.unique(fold_of_row):
            if j != fold:
                rows = fold_of_row == j
                out[rows] += _inner_fit(cfg, tcfg, comp, fold_of_row, int(j), fold)[rows]
    return out / len(teachers)


def teacher_config(cfg: Config, teacher: str, use: str = "distillation") -> Config:
    """A teacher's current config; it must be a CPU member (see the module docstring: a torch
    fold model was chosen by its fold's labels, and only members refit in seconds)."""
    tcfg = load_config(cfg.source or cfg.data.name, teacher, [])
    if tcfg.model.kind not in MEMBERS or tcfg.model.kind == STUDENT:
        raise UserError(f"student '{cfg.model.name}': {teacher} is a {tcfg.model.kind}; {use} take only CPU "
                        "members as teachers (a torch fold model is chosen by its fold's labels, and "
                        "distillation refits teachers without two folds)")
    tcfg.data = cfg.data
    return tcfg


def inner_file(cfg: Config, tcfg: Config, comp: Competition, a: int, b: int) -> Path:
    """Cache of the teacher fit without folds ``a`` < ``b`` (its scores of both folds' rows),
    named by the teacher's learned settings and the train side, so a changed teacher, train
    file or folds file is refitted, never served stale."""
    key = stable_hash([learned_settings(tcfg.to_dict()), data_fingerprints(comp)])[:12]
    folder = paths.run_dir(cfg.data.name, cfg.model.name, 0).parent / "inner"
    return folder / f"{tcfg.model.name}-{key}-{a}-{b}.npz"


def _inner_fit(cfg: Config, tcfg: Config, comp: Competition, fold_of_row: np.ndarray, j: int, k: int
               ) -> np.ndarray:
    """``(n, L)`` probabilities of the rows of folds j and k (zeros elsewhere) from the
    teacher fitted on every other fold; computed once per pair, under a lock, then cached."""
    a, b = sorted((j, k))
    path = inner_file(cfg, tcfg, comp, a, b)
    with fileio.file_lock(path.with_name(f".{path.stem}.lock"), wait=True):
        if not path.exists():
            scored = np.flatnonzero((fold_of_row == a) | (fold_of_row == b))
            fit_rows = np.flatnonzero((fold_of_row != a) & (fold_of_row != b))
            p, _, _ = fit_member_fold(tcfg, _without_test(comp), fit_rows, scored)
            buf = io.BytesIO()
            np.savez(buf, rows=scored, probs=np.asarray(p, np.float32), fit_rows=fit_rows)
            fileio.write_bytes(path, buf.getvalue())
        with np.load(path) as z:
            full = np.zeros((len(fold_of_row), len(comp.classes)))
            full[z["rows"]] = z["probs"]
    return full


def _without_test(comp: Competition) -> Competition:
    """The competition without its test rows: an inner fit scores train rows only."""
    import dataclasses

    return dataclasses.replace(comp, test=None)
