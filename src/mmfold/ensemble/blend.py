"""``mmfold blend``: OOF probabilities -> honest CV, a submission, a log row and a report.

The models are ``--models``, else ``blend.models``, else ``data.models``, else every collected
OOF file. The CV written everywhere is the nested one (:func:`mmfold.ensemble.nested.nested_cv`);
the in-sample score is shown next to it only so the optimism is visible.

Besides the submission, its log row and ``reports/<data>/blend_<name>.{md,json}``, the blend's
own predictions go to ``reports/<data>/blend_<name>.oof.parquet`` (:func:`write_oof`, in the
layout of :func:`mmfold.artifacts.predictions.write_blend_oof`): the
nested-CV probabilities and 0/1 predictions that the honest CV scored, and the in-sample ones.
``mmfold report`` reads them, so it shows the blend that was submitted whatever the method
(a stacker or a rank/power transform cannot be re-made from the logged weights).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mmfold import fileio, hints, paths
from mmfold.artifacts import predictions, studies
from mmfold.artifacts.predictions import OOFSet
from mmfold.config import Config, flatten, load_config, test_override
from mmfold.ensemble import submission
from mmfold.ensemble.nested import BlendFit, fit_blend
from mmfold.ensemble.progress import Progress
from mmfold.ensemble.thresholds import ThresholdOptimizer
from mmfold.ensemble.state import BlendState, check_members, load_state, member_fingerprints, save_state
from mmfold.errors import UserError
from mmfold.metrics import all_metrics, per_label_f1


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--models a b c`` and ``--name NAME``."""
    p.add_argument("--models", nargs="*", default=None,
                   help="models to blend (default: blend.models, data.models, or every "
                        "model in oof/<data>/)")
    p.add_argument("--name", default=None, help="submission name (default: <method>-<UTC time>)")
    p.add_argument("--from", dest="from_", default=None, metavar="NAME",
                   help="re-submit logged blend NAME on the current test predictions: its saved "
                        "weights and thresholds, nothing refitted")
    p.add_argument("--test", default=None, help="the test CSV the members were predicted on with "
                                                 "`mmfold predict --test` (default: data.test_csv)")


def resolve_models(cli: list[str] | None, cfg: Config) -> list[str]:
    """Models from the command line, the config, or every collected OOF file, in that order."""
    models = cli or cfg.blend.models or cfg.data.models or predictions.available_models(cfg.data.name)
    if len(set(models)) != len(models):
        raise UserError(f"a model is listed twice in {models}")
    return list(models)


def default_name(method: str) -> str:
    """``<method>-<UTC timestamp>``: unique per second and sortable."""
    return f"{method}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def run(args: argparse.Namespace) -> int:
    """Load, fit, score, write; progress on stderr, a summary on stdout."""
    from mmfold.data.competition import load_competition, load_folds

    cli_models = [n for m in (args.models or []) if "=" not in m for n in m.split(",") if n]  # a b, or a,b as MODEL= takes
    overrides = list(args.overrides) + [m for m in (args.models or []) if "=" in m]
    overrides += test_override(args.test, args.data, overrides)
    cfg = load_config(args.data, None, overrides)
    comp = load_competition(cfg.data)
    folds = load_folds(comp)
    if args.from_:
        return resubmit(cfg, comp, args.from_, args.name)
    models = resolve_models(cli_models, cfg)
    name = args.name or default_name(cfg.blend.method)
    sub_path = submission.submission_path(cfg.data.name, name) if comp.test is not None else None
    _check_new(sub_path)  # fail before minutes of fitting
    check_trackers(cfg.train.trackers)
    fmt = submission.submission_format(comp) if comp.test is not None else None  # same: fail early
    progress = Progress(sys.stderr)
    progress.stage(f"loading {len(models)} models from {paths.oof_dir(cfg.data.name)}")
    oofs = predictions.load_oofs(cfg.data.name, models, comp, folds)
    y = comp.y()
    fit = fit_blend(oofs, y, cfg.blend, cfg.data.metric, studies.blend_url(cfg.data.name),
                    "+".join(models), progress)
    report = build_report(name, cfg, fit, oofs, y)
    if sub_path is not None:  # written first: write_new claims the name
        report["submission"] = str(write_submission(comp, fit, oofs, sub_path, fmt))
    write_oof(predictions.blend_oof_file(cfg.data.name, name), fit, oofs)
    # saved and logged with or without a test set: a code competition blends without one and
    # lets the exported bundle (or `blend --from` on a test set given later) predict it
    save_state(cfg.data.name, name, state_meta(name, cfg, comp, fit.models, sub_path), fit.blender, fit.thresholds)
    row = log_row(name, cfg, fit, report["commit"], sub_path is not None)
    submission.append_log(cfg.data.name, row)
    md, _ = write_report(cfg.data.name, name, report)
    print(summary(report, md))
    log_blend(cfg, row, report)
    return 0


def _check_new(sub_path: Path | None) -> None:
    """Submissions are never overwritten."""
    if sub_path is not None and sub_path.exists():
        raise UserError(f"{sub_path} exists; submissions are never overwritten: pick another NAME=...")


def state_meta(name: str, cfg: Config, comp: Any, models: list[str], sub: Path | None,
               source: str | None = None) -> dict[str, Any]:
    """The JSON half of a blend's saved state (:mod:`mmfold.ensemble.state`); ``sub`` is the
    submission it wrote, None for a blend of data without a test set (``test`` is then '')."""
    from mmfold.artifacts.manifest import testset_key

    return {"name": name, "data": cfg.data.name, "models": list(models), "classes": list(comp.classes),
            "metric": cfg.data.metric, "blend": dict(vars(cfg.blend)),
            "members": member_fingerprints(cfg.data.name, list(models)), "test": testset_key(comp),
            "test_csv": None if comp.test is None else str(cfg.data.test_csv),
            "submission": None if sub is None else _relative(sub), "from": source, "time": submission.utc_now()}


def resubmit(cfg: Config, comp: Any, source: str, name: str | None) -> int:
    """Apply logged blend ``source``'s saved blender and thresholds to the members' current
    test probabilities (after ``mmfold predict``), write the submission and log a row that
    points at ``source``. Nothing is refitted, so the CV of ``source`` still describes it."""
    from mmfold.artifacts.manifest import testset_key

    if comp.test is None:
        data, test = cfg.data.name, "<test.csv>"
        raise UserError(f"data '{data}' has no test set to submit: predict one with the saved fold models, then "
                        f"re-submit on it: {hints.make('predict', data, TEST=test)} && "
                        f"{hints.make('blend', data, FROM=source, TEST=test)}")
    state = load_state(cfg.data.name, source)
    name = name or f"{source}-resubmit-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    sub_path = submission.submission_path(cfg.data.name, name)
    _check_new(sub_path)
    fmt = submission.submission_format(comp)
    check_members(state, cfg.data.name, list(comp.classes))
    models = state.meta["models"]
    oofs = predictions.load_oofs(cfg.data.name, models, comp)  # freshness: train side and test set
    df = submission.submission_frame(comp, state.predict(oofs.test), oofs.classes, fmt)
    submission.validate_submission(df, comp, oofs.classes, fmt)
    submission.write_submission(df, sub_path)
    save_state(cfg.data.name, name, state_meta(name, cfg, comp, models, sub_path, source),
               state.blender, state.thresholds)
    submission.append_log(cfg.data.name, resubmit_row(cfg.data.name, source, name, state, testset_key(comp)))
    print(f"re-submitted blend {source} as {name}: its weights and thresholds on the test predictions of "
          f"{cfg.data.test_csv} ({len(comp.test)} rows)\n  submission   {sub_path}")
    return 0


def resubmit_row(data: str, source: str, name: str, state: BlendState, key: str) -> dict[str, Any]:
    """The log row of a re-submission: the source blend's row (its CV still holds: same blend),
    renamed, with ``from`` naming the source and no LB score yet."""
    log = submission.read_log(data)
    rows = log[log["name"] == source]
    row = rows.iloc[-1].to_dict() if len(rows) else {"models": " ".join(state.meta["models"])}
    note = f"re-submitted from {source} on test set {key}"
    return {**row, "name": name, "time": submission.utc_now(), "lb": "", "from": source,
            "commit": submission.git_commit(), "note": note}


def write_submission(comp: Any, fit: BlendFit, oofs: OOFSet, path: Path,
                     fmt: submission.SubmissionFormat | None = None) -> Path:
    """Final blender and thresholds applied to the test predictions, validated, written."""
    pred = fit.thresholds.predict(fit.blender.predict(oofs.test))
    df = submission.submission_frame(comp, pred, oofs.classes, fmt)
    submission.validate_submission(df, comp, oofs.classes, fmt)
    return submission.write_submission(df, path)


# ---------------------------------------------------------------------------------------------
# the blend's own out-of-fold predictions


def write_oof(path: Path, fit: BlendFit, oofs: OOFSet) -> Path:
    """Write, id-keyed and atomically, what the blend's scores were computed from.

    ``honest_*``: each row from the blender and thresholds fitted without its fold (the
    nested CV, ``cv_mean``); ``in_sample_*``: the final blender's ``oof_`` and the submission's
    thresholds applied to it (``cv_in_sample``). Probabilities as float32, predictions 0/1.
    """
    in_prob = fit.blender.oof_
    arrays = {"honest_prob": fit.honest.prob, "honest_pred": fit.honest.pred,
              "in_sample_prob": in_prob, "in_sample_pred": fit.thresholds.predict(in_prob)}
    return predictions.write_blend_oof(path, oofs.ids, oofs.folds, oofs.classes, arrays)


# ---------------------------------------------------------------------------------------------
# log row, report, summary


def thresholds_hash(fit: BlendFit) -> str:
    """Short hash of the submission's decision rule: thresholds and post-rules."""
    t = fit.thresholds
    if isinstance(t, ThresholdOptimizer):  # the historical hash: logged rows stay comparable
        h = hashlib.sha256(np.ascontiguousarray(t.thresholds_, np.float64).tobytes())
        h.update(repr((t.metric, t.min_labels, t.max_labels, t.top_k)).encode())
        return h.hexdigest()[:12]
    h = hashlib.sha256(type(t).__name__.encode())
    _hash_state(h, t)
    return h.hexdigest()[:12]


def _hash_state(h: Any, obj: Any) -> None:
    """Feed an estimator's parameters and fitted arrays (recursively) into hash ``h``."""
    if isinstance(obj, np.ndarray):
        h.update(np.ascontiguousarray(obj, np.float64).tobytes())
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _hash_state(h, item)
    elif hasattr(obj, "__dict__"):
        for key in sorted(vars(obj)):
            h.update(key.encode())
            _hash_state(h, vars(obj)[key])
    else:
        h.update(repr(obj).encode())


def _relative(path: Path) -> str:
    """A project path as written in the log (relative to the project root when inside it)."""
    try:
        return str(path.relative_to(paths.root()))
    except ValueError:
        return str(path)


NO_TEST_NOTE = "no test set: no submission written; its state is saved for `mmfold export` and `blend --from`"


def log_row(name: str, cfg: Config, fit: BlendFit, commit: str, submitted: bool = True) -> dict[str, Any]:
    """One row of ``submissions/<data>/log.csv``: every setting that changes the submission
    (``submitted`` False: a blend of data without a test set, logged so it can be found, and
    noted as having no submission)."""
    best, single = fit.best_single
    b, blender = cfg.blend, fit.blender
    exponents = ({m: round(float(e), 4) for m, e in zip(fit.models, blender.exponents_)}
                 if b.transform == "power" and hasattr(blender, "exponents_") else None)
    return {
        "name": name, "time": submission.utc_now(), "models": " ".join(fit.models),
        "method": b.method, "metric": cfg.data.metric,
        "weights": {m: round(float(w), 4) for m, w in zip(fit.models, blender.weights_)},
        "cv_mean": f"{fit.honest.mean:.6f}", "cv_std": f"{fit.honest.std:.6f}",
        "cv_in_sample": f"{fit.in_sample:.6f}", "best_single": best,
        "best_single_cv": f"{single.mean:.6f}", "commit": commit, "lb": "",
        "transform": b.transform, "n_trials": b.n_trials, "seed": b.seed,
        "cooccurrence": b.cooccurrence, "min_labels": b.min_labels, "max_labels": b.max_labels,
        "top_k": b.top_k, "decoder": b.decoder, "calibration": _calibration(b),
        "exponents": exponents, "thresholds": thresholds_hash(fit),
        "thresholds_file": _relative(report_base(cfg.data.name, name).with_suffix(".json")),
        "note": "; ".join(n for n in (fit.note, None if submitted else NO_TEST_NOTE) if n),
    }


def _calibration(b: Any) -> str | None:
    """The calibration setting where the decoder uses one (``None`` for thresholds)."""
    return None if b.decoder == "thresholds" else b.calibration


def _per_label_thresholds(decoder: Any, n_labels: int) -> list[float | None]:
    """Each label's threshold, or ``None`` for a decoder that decides per row."""
    thr = getattr(decoder, "thresholds_", None)
    return [None] * n_labels if thr is None else list(thr)


def build_report(name: str, cfg: Config, fit: BlendFit, oofs: OOFSet,
                 y: np.ndarray) -> dict[str, Any]:
    """Everything a user needs to judge the blend, JSON-able."""
    best, single = fit.best_single
    thr, b = fit.thresholds, fit.blender
    f1 = per_label_f1(y, fit.honest.pred)
    report = {
        "name": name, "data": cfg.data.name, "time": submission.utc_now(),
        "commit": submission.git_commit(),
        "method": cfg.blend.method, "metric": cfg.data.metric, "transform": cfg.blend.transform,
        "models": fit.models, "n_folds": int(len(np.unique(oofs.folds))),
        "cv": {**fit.honest.summary(), "in_sample": fit.in_sample},
        "models_cv": {m: s.summary() for m, s in fit.singles.items()},
        "best_single": {"model": best, **single.summary()},
        "gain_over_best_single": fit.honest.mean - single.mean,
        "weights": {m: float(w) for m, w in zip(fit.models, b.weights_)},
        "post_rules": {"min_labels": cfg.blend.min_labels, "max_labels": cfg.blend.max_labels,
                       "top_k": cfg.blend.top_k},
        "decoder": cfg.blend.decoder, "calibration": _calibration(cfg.blend),
        "global_threshold": getattr(thr, "global_threshold_", None),
        "thresholds_hash": thresholds_hash(fit),
        "note": fit.note, "oof": _relative(predictions.blend_oof_file(cfg.data.name, name)),
        "per_label": {c: {"threshold": None if t is None else float(t), "f1": float(f),
                          "support": int(s)}
                      for c, t, f, s in zip(oofs.classes, _per_label_thresholds(thr, len(f1)), f1,
                                            y.sum(0))},
        "honest_metrics": all_metrics(y, fit.honest.pred),
        "submission": None,
    }
    if hasattr(b, "exponents_") and cfg.blend.transform == "power":
        report["exponents"] = {m: float(e) for m, e in zip(fit.models, b.exponents_)}
    if hasattr(b, "study_"):
        report["study"] = {"name": b.study_.study_name, "trials": len(b.study_.trials)}
    return report


def render_markdown(r: dict[str, Any]) -> str:
    """The report as a markdown page."""
    cv = r["cv"]
    lines = [f"# Blend `{r['name']}` on {r['data']}", "",
             f"{r['method']} blend of {len(r['models'])} models; metric {r['metric']} F1; "
             f"{r['n_folds']} folds; commit {r['commit']}; {r['time']}.", "",
             *([f"Note: {r['note']}.", ""] if r.get("note") else []),
             "| | honest CV (nested) | per fold |", "|---|---|---|",
             f"| **blend** | **{cv['mean']:.4f} ± {cv['std']:.4f}** | {_folds(cv)} |"]
    lines += [f"| {m} | {s['mean']:.4f} ± {s['std']:.4f} | {_folds(s)} |"
              for m, s in r["models_cv"].items()]
    lines += ["", f"In-sample (weights and thresholds fitted on the scored rows, optimistic): "
              f"{cv['in_sample']:.4f}. Gain over the best single model "
              f"({r['best_single']['model']}): {r['gain_over_best_single']:+.4f}.", "",
              "## Weights", "", "| model | weight |", "|---|---|"]
    lines += [f"| {m} | {w:.4f} |" for m, w in r["weights"].items()]
    lines += ["", "## Per label", "", f"Post-rules: {r['post_rules']}; {_decided_by(r)}. F1 is honest "
              "(nested CV).", "", "| label | threshold | F1 | support |", "|---|---|---|---|"]
    lines += [f"| {c} | {'per row' if v['threshold'] is None else format(v['threshold'], '.4f')} | "
              f"{v['f1']:.4f} | {v['support']} |" for c, v in r["per_label"].items()]
    lines += ["", "## All metrics (honest predictions)", ""]
    lines += [f"- {k}: {v:.4f}" for k, v in r["honest_metrics"].items()]
    lines += ["", f"Submission: {r['submission'] or 'none (no test set)'}", ""]
    return "\n".join(lines)


def _decided_by(r: dict[str, Any]) -> str:
    """How the label sets were decided, for the report's per-label section."""
    if r.get("global_threshold") is None:
        return (f"decoder {r.get('decoder')}: each row's expected-F1-best top-k after "
                f"{r.get('calibration')} calibration (no per-label threshold)")
    return f"search started from a global threshold of {r['global_threshold']:.4f}"


def _folds(s: dict[str, Any]) -> str:
    """Per-fold scores, compact."""
    return " ".join(f"{v:.4f}" for v in s["per_fold"])


def report_base(data: str, name: str) -> Path:
    """``reports/<data>/blend_<name>``: the stem of the blend's report files."""
    return paths.reports_dir(data) / f"blend_{name}"


def write_report(data: str, name: str, report: dict[str, Any]) -> tuple[Path, Path]:
    """``reports/<data>/blend_<name>.md`` and ``.json``."""
    base = report_base(data, name)
    js = fileio.write_json(base.with_suffix(".json"), report)
    md = fileio.write_text(base.with_suffix(".md"), render_markdown(report))
    return md, js


def summary(r: dict[str, Any], md: Path) -> str:
    """What is printed at the end of ``mmfold blend``."""
    cv, best = r["cv"], r["best_single"]
    weights = ", ".join(f"{m} {w:.3f}" for m, w in r["weights"].items())
    return "\n".join([
        f"blend {r['name']}: {r['method']} over {len(r['models'])} models, {r['metric']} F1",
        f"  honest CV    {cv['mean']:.4f} ± {cv['std']:.4f}  (nested over {r['n_folds']} folds: "
        "each scored by fits that never saw it)",
        f"  in-sample    {cv['in_sample']:.4f}           (optimistic: fitted on the rows scored)",
        f"  best single  {best['mean']:.4f} ± {best['std']:.4f}  ({best['model']}); blend gain "
        f"{r['gain_over_best_single']:+.4f}",
        f"  weights      {weights}",
        *([f"  note         {r['note']}"] if r.get("note") else []),
        f"  submission   {r['submission'] or 'none (the data has no test set)'}",
        *([] if r["submission"] else [_export_line(r)]),
        f"  report       {md}",
    ])


def _export_line(r: dict[str, Any]) -> str:
    """A blend without a test set wrote no submission: how to use it (its state is saved)."""
    return (f"  export       {hints.make('export', r['data'], NAME=r['name'])}  (its state is saved: the bundle "
            "predicts a test set given later)")


# ---------------------------------------------------------------------------------------------
# experiment tracking (``train.trackers``): the blend's honest CV, weights and thresholds, written
# with the trackers' own libraries (this side never imports torch or Accelerate). The torch-free
# helpers here are the one definition mmfold.train.trackers uses for the folds too.

# the pip pin a one-line error names when a tracker's package is missing
TRACKER_PINS = {"tensorboard": "tensorboard==2.21.0", "mlflow": "mlflow-skinny==3.17.2", "wandb": "wandb==0.31.0"}


def check_trackers(names: list[str]) -> list[str]:
    """``train.trackers`` checked before any work starts: known names, each one's package installed.

    Raises:
        UserError: one line naming an unknown tracker, or the pip pin that installs a missing one.
    """
    for name in names:
        if name not in TRACKER_PINS:
            raise UserError(f"train.trackers: unknown tracker {name!r}; known: {list(TRACKER_PINS)}")
        if importlib.util.find_spec(name) is None:
            raise UserError(f"train.trackers: {name} is not installed: pip install '{TRACKER_PINS[name]}'")
    return list(dict.fromkeys(names))


def tracking_project(data: str) -> str:
    """The MLflow experiment and W&B project of a dataset: its folds and its blends side by side."""
    return f"mmfold-{data}"


def metric_key(key: str) -> str:
    """A name every tracker accepts (MLflow allows word characters and ``./- :`` only; a label
    name may hold anything)."""
    return re.sub(r"[^\w./\- :]", "_", key)


def hyperparams(config: dict[str, Any]) -> dict[str, Any]:
    """A nested config as flat ``section.key`` hyper-parameters with scalar values (lists and
    mappings as JSON): what the trackers' parameter tables take."""
    scalar = (bool, int, float, str, type(None))
    return {metric_key(k): v if isinstance(v, scalar) else json.dumps(v, sort_keys=True)
            for k, v in flatten(config).items()}


def wandb_settings() -> dict[str, Any]:
    """Offline (files under the run's folder, ``wandb sync`` later) unless the user chose a mode
    (``WANDB_MODE``)."""
    return {} if os.environ.get("WANDB_MODE") else {"mode": "offline"}


def mlflow_experiment(data: str) -> str:
    """The id of experiment ``mmfold-<data>`` in the user's MLflow store (``MLFLOW_TRACKING_URI``)
    or else a local file store under ``mlruns/``, created if missing (restored if deleted).

    MLflow 3 opens a file store only when ``MLFLOW_ALLOW_FILE_STORE`` says so: set here for the
    default store, which keeps every run in plain files beside the project.
    """
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((paths.root() / "mlruns").resolve().as_uri())
    name = tracking_project(data)
    with fileio.file_lock(paths.root() / "runs" / data / ".tracking.lock", wait=True):  # parallel folds
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            return mlflow.create_experiment(name)
        if found.lifecycle_stage == "deleted":
            mlflow.MlflowClient().restore_experiment(found.experiment_id)
        return found.experiment_id


def blend_values(row: dict[str, Any], report: dict[str, Any]) -> dict[str, float]:
    """What a blend logs, read from its log row and report: the honest CV (mean, std), the
    in-sample score, the best single member's CV, each member's weight and each label's
    threshold (none for a decoder that decides per row)."""
    out = {f"cv/{k}": float(row[k]) for k in ("cv_mean", "cv_std", "cv_in_sample", "best_single_cv")}
    out |= {metric_key(f"weight/{m}"): float(w) for m, w in row["weights"].items()}
    out |= {metric_key(f"threshold/{c}"): float(v["threshold"]) for c, v in report["per_label"].items()
            if v["threshold"] is not None}
    return out


def blend_tracking_dir(data: str, name: str) -> Path:
    """``runs/<data>/_blend/<name>/``: a blend's TensorBoard (``tb/``) and W&B files, under the
    folder ``mmfold tensorboard`` serves."""
    return paths.root() / "runs" / data / "_blend" / name


def log_blend(cfg: Config, row: dict[str, Any], report: dict[str, Any]) -> None:
    """Log a finished blend to each of ``train.trackers`` as one run ``blend/<name>`` beside the
    folds' runs: :func:`blend_values` at step 0, its log row's settings as parameters."""
    names = check_trackers(cfg.train.trackers)
    if not names:
        return
    data, name = cfg.data.name, row["name"]
    values = blend_values(row, report)
    params = hyperparams({k: v for k, v in row.items() if k != "weights" and not k.endswith("_cv")
                          and not k.startswith("cv_")})
    folder = blend_tracking_dir(data, name)
    for tracker in names:
        {"tensorboard": _blend_tensorboard, "mlflow": _blend_mlflow, "wandb": _blend_wandb}[tracker](
            data, name, folder, values, params)
        print(f"  tracked      {tracker}: blend/{name}")


def _blend_tensorboard(data: str, name: str, folder: Path, values: dict[str, float],
                       params: dict[str, Any]) -> None:
    """Scalars at step 0 in ``<folder>/tb``, through TensorBoard's own event writer (no torch)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(folder / "tb"))
    summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
    writer.add_event(Event(wall_time=time.time(), step=0, summary=summary))
    writer.close()


def _blend_mlflow(data: str, name: str, folder: Path, values: dict[str, float], params: dict[str, Any]) -> None:
    """A finished run ``blend/<name>`` in the dataset's experiment, tagged as a blend."""
    import mlflow

    tags = {"mmfold.kind": "blend", "mmfold.data": data, "mmfold.blend": name}
    with mlflow.start_run(experiment_id=mlflow_experiment(data), run_name=f"blend/{name}", tags=tags):
        mlflow.log_params(params)
        mlflow.log_metrics(values, step=0)


def _blend_wandb(data: str, name: str, folder: Path, values: dict[str, float], params: dict[str, Any]) -> None:
    """A run ``blend/<name>`` in the dataset's project, group ``blends`` (offline by default)."""
    import wandb

    folder.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=tracking_project(data), group="blends", name=f"blend/{name}", job_type="blend",
                     config=params, dir=str(folder), **wandb_settings())
    run.log(values, step=0)
    run.finish()
