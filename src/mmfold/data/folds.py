"""Multilabel-stratified K folds, written once (``mmfold folds``).

Every later stage is keyed to this file: changing it silently would make every saved OOF
incomparable. So it is never overwritten without ``--force``, and a forced rewrite keeps the
old file as a timestamped backup.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import time
import warnings

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from mmfold import fileio, owners, paths
from mmfold.config import FoldsConfig, data_yaml, load_config, stable_hash
from mmfold.data.competition import Competition, load_competition
from mmfold.errors import UserError


def assign_folds(y: np.ndarray, cfg: FoldsConfig, groups: np.ndarray | None = None) -> np.ndarray:
    """Fold index per row from ``MultilabelStratifiedKFold`` on the 0/1 label matrix.

    With ``groups``, whole groups are stratified (a group's labels = union of its rows) so
    near-duplicates never straddle train and validation.
    """
    if groups is None:
        return _stratify(y, cfg)
    codes, uniq = pd.factorize(pd.Series(groups))
    group_y = np.zeros((len(uniq), y.shape[1]), dtype=np.uint8)
    np.maximum.at(group_y, codes, y)
    return _stratify(group_y, cfg)[codes]


def _stratify(y: np.ndarray, cfg: FoldsConfig) -> np.ndarray:
    """Core split; ``fold[i]`` is the fold where row i is validated."""
    if len(y) < cfg.n_splits:
        raise UserError(f"{len(y)} rows cannot make {cfg.n_splits} folds")
    fold = np.empty(len(y), dtype=np.int64)
    mskf = MultilabelStratifiedKFold(n_splits=cfg.n_splits, shuffle=True, random_state=cfg.seed)
    for k, (_, valid) in enumerate(mskf.split(np.zeros(len(y)), y)):
        fold[valid] = k
    return fold


def rare_labels(y: np.ndarray, classes: list[str], n_splits: int) -> list[str]:
    """Labels with fewer positives than folds: some fold cannot validate them."""
    counts = y.sum(0)
    return [f"{c} ({n})" for c, n in zip(classes, counts) if n < n_splits]


def fold_summary(y: np.ndarray, fold: np.ndarray, classes: list[str]) -> tuple[pd.DataFrame, float, str]:
    """Per-fold row counts, and the worst absolute deviation of a label's rate from global."""
    glob = y.mean(0)
    dev = np.stack([np.abs(y[fold == k].mean(0) - glob) for k in np.unique(fold)])
    k, j = np.unravel_index(dev.argmax(), dev.shape)
    counts = pd.Series(fold).value_counts().sort_index().rename_axis("fold").rename("rows").to_frame()
    return counts, float(dev.max()), f"label {classes[j]} in fold {k}"


def write_folds(comp: Competition, fold: np.ndarray, force: bool) -> None:
    """Write ``folds/<data>.csv`` and the vocabulary once; back up the old pair when forced."""
    path, labels_path = paths.folds_file(comp.cfg.name), paths.labels_file(comp.cfg.name)
    if path.exists():
        if not force:
            raise UserError(f"{path} exists; folds are written once (FORCE=1 / --force rewrites, keeping a backup)")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for p in (path, labels_path):
            if p.exists():
                shutil.copy2(p, p.with_name(f"{p.name}.{stamp}.bak"))
    df = pd.DataFrame({"ImageID": comp.train["id"], "fold": fold})
    fileio.write_csv(df, path)
    fileio.write_json(labels_path, {"classes": comp.classes, "folds_hash": stable_hash(df.values.tolist())})


def group_values(comp: Competition, col: str) -> np.ndarray:
    """The ``folds.group_col`` column of train, by its name in the train CSV.

    Checked before the (slow) image check, so a typo costs nothing but a clear message.

    Raises:
        UserError: no such column, listing those that exist (and the closest match).
    """
    renamed = {comp.cfg.caption_col: "caption"} if comp.cfg.caption_col else {}
    if col in renamed or (col in comp.train.columns and col not in ("id", "labels", "caption")):
        return comp.train[renamed.get(col, col)].to_numpy()
    known = {comp.cfg.id_col, comp.cfg.label_col, "id", "labels", "caption"}
    available = list(renamed) + [c for c in comp.train.columns if c not in known]
    folded = {c.lower(): c for c in available}
    close = [folded[col.lower()]] if col.lower() in folded else difflib.get_close_matches(col, available, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UserError(
        f"folds.group_col={col!r} is not a column of {comp.cfg.train_csv}; available: {available}{hint} "
        "(ids and labels cannot be groups)"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmfold folds`` has no options beyond the common ones (folds.* overrides)."""


def run(args: argparse.Namespace) -> int:
    """Make, check, print and write the folds."""
    cfg = load_config(args.data, None, args.overrides)
    path = paths.folds_file(cfg.data.name)
    if path.exists() and not args.force:
        raise UserError(f"{path} exists; folds are written once (FORCE=1 / --force rewrites, keeping a backup)")
    comp = load_competition(cfg.data, use_saved=not args.force)  # forced: data may have changed
    groups = group_values(comp, cfg.folds.group_col) if cfg.folds.group_col else None
    if comp.has_images and cfg.data.check_images:
        comp.verify_images()
    y = comp.y()
    fold = assign_folds(y, cfg.folds, groups)
    for name in rare_labels(y, comp.classes, cfg.folds.n_splits):
        warnings.warn(f"label {name} has fewer positives than {cfg.folds.n_splits} folds")
    counts, worst, where = fold_summary(y, fold, comp.classes)
    write_folds(comp, fold, args.force)
    owners.claim(cfg.data.name, data_yaml(args.data))  # these folds (and what follows) are this file's
    print(counts.T.to_string())
    print(f"worst per-label rate deviation from global: {worst:.4f} ({where})")
    print(f"wrote {path} ({len(fold)} ids, {cfg.folds.n_splits} folds, {len(comp.classes)} labels)")
    return 0

