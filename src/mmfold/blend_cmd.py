"""``mmfold blend``: OOF probabilities -> honest CV, a submission, a log row and a report.

The models are ``--models``, else ``blend.models``, else ``data.models``, else every collected
OOF file. The CV written everywhere is the nested one (:func:`mmfold.blend.nested_cv`); the
in-sample score is shown next to it only so the optimism is visible.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mmfold import blend, io, paths, submit
from mmfold.config import Config, load_config
from mmfold.errors import UserError
from mmfold.metrics import all_metrics, per_label_f1


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--models a b c`` and ``--name NAME``."""
    p.add_argument("--models", nargs="*", default=None,
                   help="models to blend (default: blend.models, data.models, or every "
                        "model in oof/<data>/)")
    p.add_argument("--name", default=None, help="submission name (default: <method>-<UTC time>)")


def resolve_models(cli: list[str] | None, cfg: Config) -> list[str]:
    """Models from the command line, the config, or every collected OOF file, in that order."""
    models = cli or cfg.blend.models or cfg.data.models or blend.available_models(cfg.data.name)
    if len(set(models)) != len(models):
        raise UserError(f"a model is listed twice in {models}")
    return list(models)


def default_name(method: str) -> str:
    """``<method>-<UTC timestamp>``: unique per second and sortable."""
    return f"{method}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def study_storage(data: str) -> str:
    """SQLite URL of the blend studies, next to the OOF files they were tuned on."""
    path = paths.oof_dir(data) / "blend.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def run(args: argparse.Namespace) -> int:
    """Load, fit, score, write; prints a summary."""
    from mmfold.data import load_competition, load_folds

    cli_models = [m for m in (args.models or []) if "=" not in m]
    overrides = list(args.overrides) + [m for m in (args.models or []) if "=" in m]
    cfg = load_config(args.data, None, overrides)
    comp = load_competition(cfg.data)
    folds = load_folds(comp)
    models = resolve_models(cli_models, cfg)
    name = args.name or default_name(cfg.blend.method)
    sub_path = submit.submission_path(cfg.data.name, name) if comp.test is not None else None
    if sub_path is not None and sub_path.exists():  # fail before minutes of fitting
        raise UserError(f"{sub_path} exists; submissions are never overwritten: "
                        "pick another NAME=...")
    oofs = blend.load_oofs(cfg.data.name, models, comp, folds)
    y = comp.y()
    fit = blend.fit_blend(oofs, y, cfg.blend, cfg.data.metric, study_storage(cfg.data.name), "+".join(models))
    report = build_report(name, cfg, fit, oofs, y)
    if sub_path is not None:
        report["submission"] = str(write_submission(comp, fit, oofs, sub_path))
        submit.append_log(cfg.data.name, log_row(name, cfg, fit, report["commit"]))
    md, _ = write_report(cfg.data.name, name, report)
    print(summary(report, md))
    return 0


def write_submission(comp: Any, fit: blend.BlendFit, oofs: blend.OOFSet, path: Path) -> Path:
    """Final blender and thresholds applied to the test predictions, validated, written."""
    pred = fit.thresholds.predict(fit.blender.predict(oofs.test))
    df = submit.submission_frame(comp, pred, oofs.classes)
    submit.validate_submission(df, comp, oofs.classes)
    return submit.write_submission(df, path)


def log_row(name: str, cfg: Config, fit: blend.BlendFit, commit: str) -> dict[str, Any]:
    """One row of ``submissions/<data>/log.csv``."""
    best, single = fit.best_single
    return {
        "name": name, "time": submit.utc_now(), "models": " ".join(fit.models),
        "method": cfg.blend.method, "metric": cfg.data.metric,
        "weights": {m: round(float(w), 4) for m, w in zip(fit.models, fit.blender.weights_)},
        "cv_mean": f"{fit.honest.mean:.6f}", "cv_std": f"{fit.honest.std:.6f}",
        "cv_in_sample": f"{fit.in_sample:.6f}", "best_single": best,
        "best_single_cv": f"{single.mean:.6f}", "commit": commit, "lb": "",
    }


def build_report(name: str, cfg: Config, fit: blend.BlendFit, oofs: blend.OOFSet,
                 y: np.ndarray) -> dict[str, Any]:
    """Everything a user needs to judge the blend, JSON-able."""
    best, single = fit.best_single
    thr, b = fit.thresholds, fit.blender
    f1 = per_label_f1(y, fit.honest.pred)
    report = {
        "name": name, "data": cfg.data.name, "time": submit.utc_now(),
        "commit": submit.git_commit(),
        "method": cfg.blend.method, "metric": cfg.data.metric, "transform": cfg.blend.transform,
        "models": fit.models, "n_folds": int(len(np.unique(oofs.folds))),
        "cv": {**fit.honest.summary(), "in_sample": fit.in_sample},
        "models_cv": {m: s.summary() for m, s in fit.singles.items()},
        "best_single": {"model": best, **single.summary()},
        "gain_over_best_single": fit.honest.mean - single.mean,
        "weights": {m: float(w) for m, w in zip(fit.models, b.weights_)},
        "post_rules": {"min_labels": cfg.blend.min_labels, "max_labels": cfg.blend.max_labels,
                       "top_k": cfg.blend.top_k},
        "global_threshold": thr.global_threshold_,
        "per_label": {c: {"threshold": float(t), "f1": float(f), "support": int(s)}
                      for c, t, f, s in zip(oofs.classes, thr.thresholds_, f1, y.sum(0))},
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
             "| | honest CV (nested) | per fold |", "|---|---|---|",
             f"| **blend** | **{cv['mean']:.4f} ± {cv['std']:.4f}** | {_folds(cv)} |"]
    lines += [f"| {m} | {s['mean']:.4f} ± {s['std']:.4f} | {_folds(s)} |"
              for m, s in r["models_cv"].items()]
    lines += ["", f"In-sample (weights and thresholds fitted on the scored rows, optimistic): "
              f"{cv['in_sample']:.4f}. Gain over the best single model "
              f"({r['best_single']['model']}): {r['gain_over_best_single']:+.4f}.", "",
              "## Weights", "", "| model | weight |", "|---|---|"]
    lines += [f"| {m} | {w:.4f} |" for m, w in r["weights"].items()]
    lines += ["", "## Per label", "", f"Post-rules: {r['post_rules']}; search started from a "
              f"global threshold of {r['global_threshold']:.4f}. F1 is honest (nested CV).", "",
              "| label | threshold | F1 | support |", "|---|---|---|---|"]
    lines += [f"| {c} | {v['threshold']:.4f} | {v['f1']:.4f} | {v['support']} |"
              for c, v in r["per_label"].items()]
    lines += ["", "## All metrics (honest predictions)", ""]
    lines += [f"- {k}: {v:.4f}" for k, v in r["honest_metrics"].items()]
    lines += ["", f"Submission: {r['submission'] or 'none (no test set)'}", ""]
    return "\n".join(lines)


def _folds(s: dict[str, Any]) -> str:
    """Per-fold scores, compact."""
    return " ".join(f"{v:.4f}" for v in s["per_fold"])


def write_report(data: str, name: str, report: dict[str, Any]) -> tuple[Path, Path]:
    """``reports/<data>/blend_<name>.md`` and ``.json``."""
    base = paths.reports_dir(data) / f"blend_{name}"
    js = io.write_json(base.with_suffix(".json"), report)
    md = io.write_text(base.with_suffix(".md"), render_markdown(report))
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
        f"  submission   {r['submission'] or 'none (the data has no test set)'}",
        f"  report       {md}",
    ])
