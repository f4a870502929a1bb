"""``mmfold collect``: merge a model's fold predictions into one OOF file and one test file.

This is where scikit-learn's ``cross_val_predict`` promise is enforced: every train id is
predicted exactly once, by the fold that did not train on it. A model with unfinished folds,
or folds trained on other folds/labels/data/config, is refused rather than half-collected.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from mmfold import fileio, hints, paths
from mmfold.artifacts import predictions
from mmfold.config import Config, config_from_dict, describe_diff, learning_diff, load_config, model_names
from mmfold.data.competition import Competition, load_competition, load_folds
from mmfold.errors import UserError
from mmfold.artifacts.manifest import (check_upstream, check_weights_fresh, config_drift, data_fingerprints, describe,
                                      fingerprints, fold_weights,
                                      learning_view, stale, testset_key)
from mmfold.metrics import all_metrics, metric_label
from mmfold.ensemble.scoring import at_half, honest_cv
from mmfold.ensemble.submission import utc_now


def missing_folds(data: str, model: str, fold_of_row: np.ndarray) -> list[int]:
    """Folds without a ``done.json``."""
    n = int(fold_of_row.max()) + 1
    return [k for k in range(n) if not (paths.run_dir(data, model, k) / "done.json").exists()]


def fold_infos(cfg: Config, comp: Competition, n_folds: int) -> tuple[list[dict], list[dict]]:
    """Each fold's done.json and saved config, refusing folds made from other inputs than the
    current ones.

    Data (folds, labels, files) must match what is on disk now; every fold must have been
    trained with the same settings (a fold trained with other overrides is named, with the
    keys that differ); and those settings must still be what the model's YAML plus those
    overrides resolve to.
    """
    current = data_fingerprints(comp)
    infos, configs = [], []
    for k in range(n_folds):
        rd = paths.run_dir(cfg.data.name, cfg.model.name, k)
        info = json.loads((rd / "done.json").read_text())
        changed = stale(info.get("hashes", {}), current)
        if changed:
            raise UserError(f"{cfg.model.name} fold {k} is stale: {describe(changed)}; retrain it "
                            f"({hints.make('train', cfg.data.name, model=cfg.model.name, fold=k, force=True)})")
        infos.append(info)
        configs.append(yaml.safe_load((rd / "config.yaml").read_text()))
    _check_same_settings(cfg, infos, configs)
    check_weights_fresh(cfg.data.name, cfg.model.name, fold_weights(cfg.data.name, cfg.model.name, infos))
    check_upstream(cfg.source or cfg.data.name, cfg.model.name, upstream_of(cfg, infos))
    drift = config_drift(cfg.data.name, cfg.model.name, configs[0])
    if drift:
        raise UserError(f"{cfg.model.name} is stale: its config changed since its folds were trained "
                        f"(YAML now + overrides {configs[0].get('overrides', [])}):\n"
                        f"{describe_diff(drift, 'trained', 'now')}\nretrain it "
                        f"({hints.make('train', cfg.data.name, model=cfg.model.name, force=True)}) or restore the YAML")
    return infos, configs


def _check_same_settings(cfg: Config, infos: list[dict], configs: list[dict]) -> None:
    """Every fold of one model trained the same way, or its OOF mixes two models."""
    model = cfg.model.name
    first = infos[0].get("hashes", {}).get("config")
    for k, (info, conf) in enumerate(zip(infos, configs)):
        if info.get("hashes", {}).get("config") != first:
            changed = learning_diff(learning_view(configs[0]), learning_view(conf))
            raise UserError(f"{model}: fold {k} was trained with other settings than fold 0:\n"
                            f"{describe_diff(changed, 'fold 0', f'fold {k}')}\n"
                            f"retrain it with fold 0's settings "
                            f"({hints.make('train', cfg.data.name, model=model, fold=k, force=True)})")


def upstream_of(cfg: Config, infos: list[dict]) -> dict[str, str]:
    """What a student's folds were made from, merged (its pseudo-teachers' fold k for fold k),
    refusing folds made from different versions of its base or teachers (whether those are
    still current is :func:`~mmfold.artifacts.manifest.check_upstream`'s question).

    Raises:
        UserError: naming the fold and the fix.
    """
    merged: dict[str, str] = {}
    for k, info in enumerate(infos):
        for key, value in info.get("upstream", {}).items():
            if merged.setdefault(key, value) != value:
                raise UserError(f"{cfg.model.name}: fold {k} was made from another version of "
                                f"{key.split(':', 1)[1]} than fold 0; retrain it "
                                f"({hints.make('train', cfg.data.name, model=cfg.model.name, fold=k, force=True)})")
    return merged


def merge_oof(cfg: Config, comp: Competition, fold_of_row: np.ndarray) -> np.ndarray:
    """Every fold's OOF probabilities in train order (each fold file holds exactly its fold's
    ids: every train id is predicted once, checked by :func:`predictions.read_fold_oofs`)."""
    return predictions.read_fold_oofs(cfg.data.name, cfg.model.name, comp.ids("train"), comp.classes,
                                      fold_of_row)


def fold_test_files(cfg: Config, comp: Competition, infos: list[dict]) -> list[Path]:
    """Each fold's test file for the current test set: ``test.parquet`` if the fold was trained
    with it, else what ``mmfold predict`` wrote for it (``test-<key>.parquet``)."""
    key = testset_key(comp)
    return [predictions.fold_test_file(paths.run_dir(cfg.data.name, cfg.model.name, k), key,
                                       info.get("hashes", {}).get("test")) for k, info in enumerate(infos)]


def mean_test(cfg: Config, comp: Competition, infos: list[dict]) -> np.ndarray | None:
    """The folds' test probabilities for the current test set averaged (each fold's file
    checked), or None without a test set or when a fold has none for it."""
    if comp.test is None:
        return None
    return predictions.mean_fold_tests(cfg.data.name, cfg.model.name, comp.ids("test"), comp.classes,
                                       fold_test_files(cfg, comp, infos))


def write_test(cfg: Config, comp: Competition, test: np.ndarray, source: str) -> None:
    """``oof/<data>/<model>.test.parquet`` and ``.test.json`` (the test set it is for, and
    whether training or ``mmfold predict`` made the fold files)."""
    data, model = cfg.data.name, cfg.model.name
    predictions.write_test(data, model, comp.ids("test"), test, comp.classes)
    fileio.write_json(paths.test_meta_file(data, model), {
        "test": testset_key(comp), "test_csv": str(comp.cfg.test_csv), "rows": len(comp.test),
        "source": source, "time": utc_now()})


def cv_summary(cfg: Config, y: np.ndarray, probs: np.ndarray, fold_of_row: np.ndarray) -> dict:
    """CV metrics at 0.5, and with thresholds fitted on the other folds (honest), in the
    competition metric's terms (``data.metric``; every metric is stored)."""
    tuned = honest_cv(probs, y, fold_of_row, cfg.blend, cfg.data.metric)
    half = at_half(probs, y, fold_of_row, cfg.blend, cfg.data.metric)
    return {"metric": cfg.data.metric,
            "cv": all_metrics(y, half.pred), "cv_tuned": all_metrics(y, tuned.pred),
            "cv_tuned_per_fold": tuned.per_fold, "cv_tuned_std": tuned.std}


def collect_model(cfg: Config, comp: Competition, fold_of_row: np.ndarray) -> dict:
    """Write ``oof/<data>/<model>.parquet``, ``.test.parquet`` and ``.json``; return the json."""
    missing = missing_folds(cfg.data.name, cfg.model.name, fold_of_row)
    if missing:
        raise UserError(f"{cfg.model.name}: folds {missing} are not finished; not writing a partial OOF")
    n = int(fold_of_row.max()) + 1
    infos, configs = fold_infos(cfg, comp, n)
    oof = merge_oof(cfg, comp, fold_of_row)
    test = mean_test(cfg, comp, infos)
    trained = config_from_dict(configs[0])  # every fold was trained the same way (checked)
    meta = _meta(cfg, trained, comp, oof, fold_of_row, infos)
    data, model = cfg.data.name, cfg.model.name
    names = [p.name for p in (paths.oof_file(data, model), paths.test_pred_file(data, model),
                              paths.oof_meta_file(data, model), paths.test_meta_file(data, model))]
    # two fold runs finishing together both collect: one at a time, and each clears the
    # temp files a killed collect of this model left behind
    with fileio.file_lock(paths.oof_dir(data) / f".{model}.collect.lock", wait=True):
        fileio.remove_orphan_temps(paths.oof_dir(data), names)
        predictions.write_oof(data, model, comp.ids("train"), oof, comp.classes, fold_of_row)
        if test is not None:
            write_test(cfg, comp, test, "train")
        fileio.write_json(paths.oof_meta_file(data, model), meta)
    if test is None and comp.test is not None:
        print(f"{model}: no test predictions for the current test set ({comp.cfg.test_csv}); "
              f"make them from the saved fold models: {hints.make('predict', data, model=model)}")
    metric = cfg.data.metric
    how = "tuned thresholds" if cfg.blend.decoder == "thresholds" else f"blend.decoder={cfg.blend.decoder}"
    print(f"{cfg.model.name}: CV {metric_label(metric)} {meta['cv'][metric]:.4f} at 0.5, "
          f"{meta['cv_tuned'][metric]:.4f} with {how} (honest: each fold decided by a decoder "
          "fitted on the other folds)")
    return meta


def _meta(cfg: Config, trained: Config, comp: Competition, oof: np.ndarray, fold_of_row: np.ndarray,
          infos: list[dict]) -> dict:
    """The model's CV card: metrics (scored with ``cfg``'s blend settings and metric), per-fold
    info, sizes, time, the config it was trained with and its input hashes."""
    probs = np.asarray(oof, np.float32)  # as stored
    return {
        "model": cfg.model.name,
        "kind": cfg.model.kind,
        **cv_summary(cfg, comp.y(), probs, fold_of_row),
        "per_fold": infos,
        "params_trainable": infos[0].get("params_trainable"),
        "params_total": infos[0].get("params_total"),
        "train_time_s": float(sum(i.get("train_time_s", 0.0) for i in infos)),
        "images_per_s": _mean([i.get("images_per_s") for i in infos]),
        "config": trained.to_dict(),
        "hashes": fingerprints(trained, comp),
        **({"upstream": upstream_of(cfg, infos)} if any(i.get("upstream") for i in infos) else {}),
        **({"weights": infos[0]["weights"]} if infos[0].get("weights") else {}),
    }


def _mean(values: list) -> float | None:
    """Mean of the non-missing values, or None."""
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmfold collect`` options."""
    p.add_argument("--model", help="model name(s), comma-separated (default: data.models)")


def run(args: argparse.Namespace) -> int:
    """Collect each requested model; report (not write) models with missing folds."""
    base = load_config(args.data, None, args.overrides)
    comp = load_competition(base.data)
    fold_of_row = load_folds(comp)
    for name in model_names(base, args.model):
        collect_model(load_config(args.data, name, args.overrides), comp, fold_of_row)
    return 0
