"""``mmfold predict``: test probabilities for the current (or a given) test set from the saved
fold models, nothing retrained.

Competitions change the test set (a second stage, a re-issued ``test.csv``, a hidden set in a
code competition). Each fold keeps what predicting needs (``best.pt`` with its tokenizer for
torch models, ``member.skops`` for CPU members), so a new test set costs one forward pass per
fold. For each model and fold this writes ``runs/<data>/<model>/fold<k>/test-<key>.parquet``
(``<key>``: :func:`mmfold.artifacts.manifest.testset_key` of the test set; the set the
fold was trained with is its ``test.parquet``), then the collected
``oof/<data>/<model>.test.parquet`` and ``.test.json`` for it. Out-of-fold files, ``done.json``
and checkpoints are only read. A model whose train side changed (train file, folds, labels,
config) is refused exactly as ``collect`` refuses it: that needs retraining.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mmfold import fileio, paths
from mmfold.artifacts import predictions
from mmfold.artifacts.manifest import testset_key
from mmfold.config import Config, config_from_dict, load_config, test_override
from mmfold.data.competition import Competition, load_competition, load_folds
from mmfold.errors import DataError, UserError
from mmfold.train.seeds import predict_seeds

Predictor = Callable[[Config, Competition, Path], np.ndarray]


def predictor_for(kind: str) -> Predictor:
    """How a fold of ``kind`` predicts from its saved state: a CPU member's fitted pipeline or
    the torch engine's ``best.pt`` (imported lazily: members need no torch import)."""
    from mmfold.cpu.members import MEMBERS

    if kind in MEMBERS:
        from mmfold.cpu.members import predict_member_fold

        return lambda cfg, comp, rd: predict_member_fold(cfg, comp, rd, "test")
    from mmfold.train.infer import predict_fold
    from mmfold.train.runner import runner_for

    runner_for(kind)  # an unknown kind fails here, listing the registered ones
    return predict_fold


def predict_fold_dir(cfg: Config, comp: Competition, run_dir: Path) -> np.ndarray:
    """One fold's test probabilities from its saved state: its model, or the mean of its seeds'
    models (``train.seeds``), exactly as training averaged them. ``mmfold predict`` and an
    exported bundle both predict through here."""
    predict = predictor_for(cfg.model.kind)
    return predict_seeds(predict, cfg, comp, run_dir) if cfg.train.seeds else predict(cfg, comp, run_dir)


def as_collected(fold_probs: list[np.ndarray]) -> np.ndarray:
    """The folds' test probabilities averaged exactly as the collected file holds them, read
    back: each fold's as written (float32), their mean in float64, stored as float32. An
    exported bundle, which writes no files, gets the very numbers ``make blend`` blended."""
    mean = np.mean([np.asarray(p, np.float32).astype(np.float64) for p in fold_probs], axis=0)
    return mean.astype(np.float32).astype(np.float64)


def trained_config(data_cfg: Config, comp: Competition, model: str, n_folds: int) -> tuple[Config, list[dict]]:
    """The config ``model``'s folds were trained with (checked as ``collect`` checks it: same
    train side, same settings in every fold, YAML unchanged), with the current data section
    (the test set to predict), and each fold's ``done.json``.

    Raises:
        UserError: unfinished folds, or a train side or config that changed (retrain).
    """
    from mmfold.train.collect import fold_infos, missing_folds

    base = load_config(data_cfg.source or data_cfg.data.name, model, [])
    missing = missing_folds(comp.cfg.name, model, np.arange(n_folds))
    if missing:
        raise UserError(f"{model}: folds {missing} are not trained; train them first (make train MODEL={model})")
    infos, configs = fold_infos(base, comp, n_folds)
    cfg = config_from_dict(configs[0])
    cfg.data = data_cfg.data
    return cfg, infos


def predict_model(cfg: Config, comp: Competition, infos: list[dict], force: bool = False) -> dict:
    """Write each fold's test file for the current test set (skipping those that exist unless
    ``force``), then the collected test file; return timings."""
    from mmfold.train.collect import fold_test_files, write_test
    from mmfold.train.runner import fold_lock

    key, started, done = testset_key(comp), time.perf_counter(), []
    files = fold_test_files(cfg, comp, infos)
    predictor_for(cfg.model.kind)  # an unknown kind fails before any fold is locked
    for k, path in enumerate(files):
        trained_with_it = path.name == predictions.FOLD_FILES["test"]
        if path.exists() and (trained_with_it or not force):
            continue  # a fold's own test.parquet is never rewritten
        rd = paths.run_dir(cfg.data.name, cfg.model.name, k)
        with fileio.file_lock(fold_lock(cfg.data.name, cfg.model.name, k)):
            probs = predict_fold_dir(cfg, comp, rd)
            predictions.write_fold_test(rd, comp.ids("test"), probs, comp.classes,
                                        f"{cfg.model.name} fold {k} test ({key})", path=path)
        done.append(k)
    test = predictions.mean_fold_tests(cfg.data.name, cfg.model.name, comp.ids("test"), comp.classes, files)
    with fileio.file_lock(paths.oof_dir(cfg.data.name) / f".{cfg.model.name}.collect.lock", wait=True):
        write_test(cfg, comp, test, "predict")
    return {"model": cfg.model.name, "folds_predicted": done, "seconds": round(time.perf_counter() - started, 2),
            "test": key, "rows": len(comp.test)}


def models_to_predict(cfg: Config, requested: str | None) -> list[str]:
    """``--model a,b``, or every collected model of the data (sweep trials and ablation
    variants aside): a blend may use any of them, not only ``data.models``."""
    names = requested.split(",") if requested else predictions.available_models(cfg.data.name)
    if not names:
        raise UserError(f"data '{cfg.data.name}': no collected models to predict; train some first (make train)")
    return names


def predictable(base: Config, comp: Competition, names: list[str], n_folds: int,
                strict: bool) -> list[tuple[Config, list[dict]]]:
    """Each model's trained config and folds, all checked before anything is predicted.

    Named models (``--model``) must all be predictable. By default (every collected model) one
    that cannot be (unfinished folds, a train side or YAML changed since) is skipped with its
    reason on stderr, so an old experiment does not block the models a blend uses; a blend
    that needs it refuses later, naming it.
    """
    jobs = []
    for name in names:
        try:
            jobs.append(trained_config(base, comp, name, n_folds))
        except UserError as e:
            if strict:
                raise
            print(f"predict: skipped {name}: {e}", file=sys.stderr)
    if not jobs:
        raise UserError(f"none of {names} can be predicted (reasons above)")
    return jobs


def check_test_images(comp: Competition) -> None:
    """Decode the whole test set before any model writes a test file (unless
    ``data.check_images=false``, as for ``make folds``).

    Models are predicted one after another: a bad image found by the second would leave the
    first's collected test file rewritten for a test set the others never predicted.

    Raises:
        DataError: every bad test image, in one message.
    """
    if not (comp.has_images and comp.cfg.check_images):
        return
    try:
        comp.verify_test_images()
    except DataError as e:
        raise DataError(f"{e}; nothing was predicted or written") from e


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmfold predict`` options."""
    p.add_argument("--model", help="model name(s), comma-separated (default: every collected model, "
                                   "i.e. everything a blend can use)")
    p.add_argument("--test", help="a test CSV to predict instead of the data config's test_csv "
                                  "(its images in data.image_dir)")


def run(args: argparse.Namespace) -> int:
    """Check every model first, then predict each; one summary line per model."""
    overrides = list(args.overrides) + test_override(args.test, args.data, list(args.overrides))
    base = load_config(args.data, None, overrides)
    comp = load_competition(base.data)
    if comp.test is None or comp.test.empty:
        raise UserError(f"data '{comp.cfg.name}' has no test rows (data.test_csv: {comp.cfg.test_csv}); "
                        "nothing to predict")
    check_test_images(comp)
    n_folds = int(load_folds(comp).max()) + 1
    jobs = predictable(base, comp, models_to_predict(base, args.model), n_folds, strict=bool(args.model))
    for cfg, infos in jobs:
        r = predict_model(cfg, comp, infos, args.force)
        what = f"folds {r['folds_predicted']} predicted" if r["folds_predicted"] else "every fold up to date"
        print(f"{r['model']}: {r['rows']} test rows ({comp.cfg.test_csv}, key {r['test']}): {what} in "
              f"{r['seconds']:.1f}s -> {paths.test_pred_file(comp.cfg.name, r['model'])}")
    return 0
