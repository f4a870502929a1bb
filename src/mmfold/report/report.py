"""``mmfold report``: one markdown page with PNG figures about every trained model and blend.

It only reads artifacts (``oof/<data>/*``, ``runs/<data>/*/fold*/log.jsonl``, the submissions
log, the blend's saved predictions ``reports/<data>/blend_<name>.oof.parquet``, sweep/ablation
tables) and writes ``reports/<data>/report.md`` plus ``figures/*.png``. Every score it shows is
*honest*: a model's per-label thresholds are fitted on the other folds and scored on each fold
(:func:`mmfold.ensemble.scoring.honest_cv`, the ``blend.*`` settings and ``data.metric``, as collect
does), and a blend's numbers are the blend stage's own nested-CV predictions, so they are the
ones logged for the submission.

Sections are registered functions ``(ReportContext) -> markdown``; adding one is a function
and a line in :data:`SECTIONS`. A section with nothing to show says why instead of vanishing,
so a reader can tell "no blend yet" from "the report is broken".
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mmfold import fileio, hints, paths
from mmfold.artifacts import predictions
from mmfold.config import Config, load_config
from mmfold.data.competition import Competition, load_competition, load_folds
from mmfold.errors import UserError
from mmfold.ensemble import blend, submission
from mmfold.ensemble.scoring import at_half, honest_cv, threshold_params
from mmfold.ensemble.thresholds import ThresholdOptimizer
from mmfold.metrics import METRICS, all_metrics, binarize, metric_label, per_label_f1
from mmfold.report import plots

N_NAMED = 3  # strongest/weakest labels named in the text


# ------------------------------------------------------------------------------- scoring


@dataclass
class Scored:
    """One predictor's OOF probabilities and their honest evaluation in the competition metric."""

    name: str
    prob: np.ndarray  # (n, L) OOF probabilities, train order
    pred: np.ndarray  # (n, L) 0/1, each fold decided by fits that never saw it
    fold_scores: list[float]  # honest metric per fold
    fold_scores_05: list[float]  # the metric per fold at threshold 0.5
    metrics: dict[str, float]  # all metrics on the honest predictions, pooled over rows
    metrics_05: dict[str, float]  # all metrics at threshold 0.5, pooled
    meta: dict = field(default_factory=dict)  # oof/<data>/<model>.json, or the blend's report json
    in_sample: float | None = None  # a blend's in-sample score (fitted on the rows it scores)

    @property
    def cv(self) -> float:
        """Mean of the per-fold scores: the CV that collect, the blend log and its report show."""
        return float(np.mean(self.fold_scores))

    @property
    def cv_std(self) -> float:
        return float(np.std(self.fold_scores))

    @property
    def cv_05(self) -> float:
        return float(np.mean(self.fold_scores_05))


def score(name: str, prob: np.ndarray, y: np.ndarray, folds: np.ndarray, cfg: Config,
          meta: dict | None = None) -> Scored:
    """Evaluate one model honestly (:func:`mmfold.ensemble.scoring.honest_cv`) and at 0.5.

    Why the shared scorer: thresholds fitted on the rows they score flatter every model, weak
    ones most; and a second copy of the protocol would drift from collect's and the blend's.
    """
    tuned = honest_cv(prob, y, folds, cfg.blend, cfg.data.metric)
    half = at_half(prob, y, folds, cfg.blend, cfg.data.metric)
    return Scored(name, prob, tuned.pred, tuned.per_fold, half.per_fold, all_metrics(y, tuned.pred),
                  all_metrics(y, half.pred), meta or {})


def score_blend(name: str, saved: dict[str, np.ndarray], y: np.ndarray, folds: np.ndarray,
                cfg: Config, meta: dict) -> Scored:
    """A blend from its saved predictions: the scores are recomputed, nothing is refitted."""
    metric = METRICS[cfg.data.metric]
    pred, prob = saved["honest_pred"], saved["honest_prob"]
    ks = np.unique(folds)
    half = at_half(prob, y, folds, cfg.blend, cfg.data.metric)
    return Scored(f"blend {name}", prob, pred, [float(metric(y[folds == k], pred[folds == k])) for k in ks],
                  half.per_fold, all_metrics(y, pred), all_metrics(y, half.pred), meta,
                  float(metric(y, saved["in_sample_pred"])))


# ------------------------------------------------------------------------------- loading


def model_names(data: str) -> list[str]:
    """Collected models, sweep trials and ablation variants excluded (one owner: the
    prediction files' module; a ``<model>.test.json`` is not a model)."""
    from mmfold.artifacts.predictions import available_models

    return available_models(data)


def load_models(cfg: Config, comp: Competition, folds: np.ndarray) -> list[Scored]:
    """Every collected model, scored, best honest CV first."""
    data, ids, y = cfg.data.name, comp.train["id"].astype(str).tolist(), comp.y()
    out = []
    for name in model_names(data):
        if not paths.oof_file(data, name).exists():
            continue
        meta = json.loads(paths.oof_meta_file(data, name).read_text())
        prob = predictions.read_oof(data, name, ids, comp.classes, folds)
        out.append(score(name, prob, y, folds, cfg, meta))
    return sorted(out, key=lambda s: -s.cv)


def read_log(data: str) -> pd.DataFrame | None:
    """The submissions log with each submission's latest LB and LB count, or None before the
    first blend."""
    if not submission.log_path(data).exists():
        return None
    log = submission.read_log(data)
    table = submission.log_table(data).drop_duplicates("name", keep="last").set_index("name")
    for c in ("lb", "lb_n"):
        log[c] = log["name"].map(table[c]).map(lambda v: "" if pd.isna(v) else str(v))
    return log


def load_blend(cfg: Config, comp: Competition, folds: np.ndarray, name: str) -> Scored:
    """The named blend from the predictions ``mmfold blend`` saved (and its report json).

    Raises:
        UserError: the blend has no saved predictions, or they do not fit the current data.
    """
    ids = comp.train["id"].astype(str).tolist()
    saved = predictions.read_blend_oof(predictions.blend_oof_file(cfg.data.name, name), ids,
                                       comp.classes, folds, cfg.data.name)
    js = blend.report_base(cfg.data.name, name).with_suffix(".json")
    meta = json.loads(js.read_text()) if js.exists() else {}
    return score_blend(name, saved, comp.y(), folds, cfg, meta)


# ------------------------------------------------------------------------------- context


@dataclass
class ReportContext:
    """Everything the sections share, loaded once."""

    cfg: Config
    comp: Competition
    folds: np.ndarray
    out: Path  # reports/<data>/
    models: list[Scored]
    log: pd.DataFrame | None
    blend: Scored | None = None
    blend_note: str = ""  # why no blend is shown, when a logged one is not

    @property
    def fig_dir(self) -> Path:
        return self.out / "figures"

    @property
    def best(self) -> Scored | None:
        return self.models[0] if self.models else None

    @property
    def metric(self) -> str:
        """How the competition metric reads in a header (``samples-F1``)."""
        return metric_label(self.cfg.data.metric)

    @property
    def freq(self) -> pd.Series:
        """Share of training rows per label."""
        return pd.Series(self.comp.y().mean(0), index=self.comp.classes)

    def figure(self, name: str) -> Path:
        """Path of a figure, and the link the markdown uses (relative, so GitHub renders it)."""
        return self.fig_dir / name

    def image(self, name: str, alt: str) -> str:
        """Markdown image link relative to the report."""
        return f"![{alt}](figures/{name})"


def build_context(cfg: Config, blend_name: str | None = None) -> ReportContext:
    """Load the competition, every model and the chosen (default: latest logged) blend.

    Raises:
        UserError: a named blend that is not logged, or has no saved predictions (the latest
            blend without them is skipped with a note instead).
    """
    comp = load_competition(cfg.data)
    folds = load_folds(comp)
    models = load_models(cfg, comp, folds)
    ctx = ReportContext(cfg, comp, folds, paths.reports_dir(cfg.data.name), models, read_log(cfg.data.name))
    name = _blend_name(ctx.log, blend_name, cfg.data.name)
    if name is None:
        return ctx
    try:
        ctx.blend = load_blend(cfg, comp, folds, name)
    except UserError as e:
        if blend_name:
            raise
        ctx.blend_note = (f"The latest blend, `{name}`, is not shown: {e}. Its numbers cannot be "
                          "re-made from the members and the logged weights (a stacker, rank and "
                          "power transforms differ), and a re-mix would not be what was submitted.")
    return ctx


def _blend_name(log: pd.DataFrame | None, name: str | None, data: str) -> str | None:
    """The named blend (logged, or saved without a test set), else the latest logged one."""
    names = [] if log is None or log.empty else log["name"].tolist()
    if name:
        if name not in names and not predictions.blend_oof_file(data, name).exists():
            raise UserError(f"no blend named {name!r} in {submission.log_path(data)} or "
                            f"{paths.reports_dir(data)}; logged: {names[-10:]}")
        return name
    return names[-1] if names else None


# ------------------------------------------------------------------------------ markdown


def md_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no tabulate dependency); numbers pre-formatted by the caller."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _cell(v: object) -> str:
    """Table cell text: floats to 4 decimals, missing as a dash, pipes escaped."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _params(n: object) -> str:
    """Parameter counts as 1.2M / 35.1k."""
    if n is None or n == "":
        return "–"
    n = float(n)
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


# ------------------------------------------------------------------------------ sections


def section_models(ctx: ReportContext) -> str:
    """The table of every trained model."""
    head = "## Models\n\n"
    if not ctx.models:
        return head + f"No collected models in `oof/{ctx.cfg.data.name}/` yet (run `{hints.make('train', ctx.cfg.data.name)}`).\n"
    rows = [_model_row(m, ctx.metric) for m in ctx.models]
    note = (f"CV {ctx.metric} is honest: per-label thresholds fitted on the other folds, scored on "
            "each fold; mean ± std over folds, as collect and the blend log report it. Micro/macro-F1, "
            "exact match, hamming loss and label accuracy use the same honest predictions, pooled over "
            "all rows; *@0.5* uses one threshold of 0.5. Time is training time per fold; images/s is "
            "training throughput (CPU members: rows/s or –).\n\n")
    return head + note + md_table(pd.DataFrame(rows)) + "\n"


def _model_row(m: Scored, metric: str) -> dict[str, object]:
    """One line of the models table."""
    per_fold = m.meta.get("per_fold") or []
    fold_time = m.meta.get("train_time_s", 0.0) / max(len(per_fold), 1)
    return {
        "model": f"`{m.name}`", "kind": m.meta.get("kind", ""),
        f"CV {metric}": f"{m.cv:.4f} ± {m.cv_std:.4f}",
        f"{metric} @0.5": m.cv_05, "micro-F1": m.metrics["micro"], "macro-F1": m.metrics["macro"],
        "exact match": m.metrics["subset_accuracy"], "hamming loss": m.metrics["hamming_loss"],
        "label acc.": m.metrics["label_accuracy"],
        "trainable": _params(m.meta.get("params_trainable")), "total": _params(m.meta.get("params_total")),
        "time/fold (s)": f"{fold_time:.1f}",
        "images/s": "–" if m.meta.get("images_per_s") is None else f"{m.meta['images_per_s']:.0f}",
    }


LOG_COLUMNS = {  # submissions-log column -> report header (missing columns are skipped)
    "name": "name", "time": "time", "models": "models", "method": "method",
    "transform": "transform", "metric": "metric",
    "cv_mean": "CV (honest)", "cv_std": "± std", "cv_in_sample": "in-sample CV", "lb": "LB",
    "lb_n": "LBs", "best_single": "best single", "best_single_cv": "its CV", "commit": "commit",
}


def section_blends(ctx: ReportContext) -> str:
    """Every logged blend, CV and leaderboard side by side."""
    head = "## Blends and leaderboard\n\n"
    if ctx.log is None or ctx.log.empty:
        return head + (f"No blends logged yet (`{hints.make('blend', ctx.cfg.data.name)}` appends to "
                       f"`submissions/{ctx.cfg.data.name}/log.csv`).\n")
    log = ctx.log.copy()
    cols = {c: h for c, h in LOG_COLUMNS.items() if c in log.columns}
    extra = [c for c in log.columns if c.startswith("cv") and c not in cols and c != "cv"]
    if "cv" in log.columns and "cv_mean" not in log.columns:
        cols = {"cv": "CV (honest)", **cols}
    table = log[list(cols) + extra].rename(columns=cols)
    table = table.map(_short)
    note = ("*CV (honest)* is nested: blend weights and thresholds fitted without the scored fold. "
            "*In-sample CV* fits and scores on the same rows: the gap to the honest CV is optimism. "
            f"*LB* is the latest score written back with `{hints.make('submit', ctx.cfg.data.name)} NAME=<name> "
            "LB=<score>` (*LBs*: how "
            "many; all are in `submissions/<data>/lb.csv`); LB far below CV means the CV cannot be "
            "trusted (leak, shift, or thresholds overfitted).\n\n")
    details = sorted(ctx.out.glob("blend_*.md"))
    links = "\n\nBlend reports: " + ", ".join(f"[{p.stem}]({p.name})" for p in details) if details else ""
    return head + note + md_table(table) + links + "\n"


def _short(v: str) -> str:
    """Round numeric log cells, shorten long JSON lists."""
    try:
        return f"{float(v):.4f}" if v not in ("", None) and not str(v).isdigit() else v
    except ValueError:
        return v if len(str(v)) <= 60 else str(v)[:57] + "..."


def section_per_label(ctx: ReportContext) -> str:
    """Per-label F1 of the best model and the blend, with the strongest and weakest labels."""
    head = "## Per-label F1\n\n"
    if ctx.best is None:
        return head + "No models yet.\n"
    y = ctx.comp.y()
    preds = [ctx.best] + ([ctx.blend] if ctx.blend else [])
    f1 = pd.DataFrame({p.name: per_label_f1(y, p.pred) for p in preds}, index=ctx.comp.classes)
    plots.per_label_f1(f1, ctx.freq, ctx.figure("per_label_f1.png"))
    text = [_strong_weak(f1[c], ctx.freq, c) for c in f1.columns]
    return (head + ctx.image("per_label_f1.png", "per-label F1") + "\n\n" + "\n".join(text)
            + "\n\n" + _blend_source(ctx) + "\n")


def _blend_source(ctx: ReportContext) -> str:
    """Where the blend's numbers come from, with its honest and in-sample CV; or why none."""
    if ctx.blend is None:
        return ctx.blend_note or "No blend to compare yet."
    b, name = ctx.blend, ctx.blend.name.removeprefix("blend ")
    in_sample = f", in-sample {b.in_sample:.4f}" if b.in_sample is not None else ""
    return (f"**{b.name}**: honest CV {b.cv:.4f} ± {b.cv_std:.4f} ({ctx.metric}, nested: blender and "
            f"thresholds fitted without the scored fold){in_sample}. Its predictions are the ones "
            f"`mmfold blend` scored and logged (`{predictions.blend_oof_file(ctx.cfg.data.name, name).name}`).")


def _strong_weak(f1: pd.Series, freq: pd.Series, who: str) -> str:
    """One sentence naming the strongest and weakest labels with their frequency."""
    s = f1.sort_values(ascending=False)
    name = lambda lab: f"`{lab}` {s[lab]:.2f} ({freq[lab]:.0%} of rows)"  # noqa: E731
    strong = ", ".join(name(lab) for lab in s.index[:N_NAMED])
    weak = ", ".join(name(lab) for lab in s.index[::-1][:N_NAMED])
    return f"- **{who}**: strongest {strong}; weakest {weak}."


def section_labels(ctx: ReportContext) -> str:
    """Label frequency and co-occurrence of the training data."""
    y, classes = ctx.comp.y(), ctx.comp.classes
    plots.label_frequency(pd.Series(y.sum(0), index=classes), len(y), ctx.figure("label_frequency.png"))
    plots.cooccurrence(y, classes, ctx.figure("label_cooccurrence.png"))
    card = y.sum(1)
    return ("## Training labels\n\n"
            f"{len(y)} training rows, {len(classes)} labels, {card.mean():.2f} labels per row "
            f"(min {card.min()}, max {card.max()}).\n\n"
            + ctx.image("label_frequency.png", "label frequency") + "\n\n"
            + "Row *i*, column *j*: the share of rows with label *i* that also have label *j*.\n\n"
            + ctx.image("label_cooccurrence.png", "label co-occurrence") + "\n")


def oof_correlation(models: list[Scored]) -> pd.DataFrame:
    """Mean over labels of the per-label Pearson correlation of two models' OOF probabilities.

    Per label, not pooled: pooled over labels, every pair correlates highly just because both
    models know which labels are common.
    """
    names = [m.name for m in models]
    corr = np.eye(len(models))
    for i in range(len(models)):
        for j in range(i + 1, len(models)):
            corr[i, j] = corr[j, i] = _mean_label_corr(models[i].prob, models[j].prob)
    return pd.DataFrame(corr, index=names, columns=names)


def _mean_label_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Average per-column Pearson r, skipping constant columns."""
    a, b = a - a.mean(0), b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    ok = den > 0
    return float(((a * b).sum(0)[ok] / den[ok]).mean()) if ok.any() else float("nan")


def section_diversity(ctx: ReportContext) -> str:
    """Correlation heatmap of the models' OOF probabilities."""
    head = "## Model diversity\n\n"
    if len(ctx.models) < 2:
        return head + "Needs at least two collected models.\n"
    corr = oof_correlation(ctx.models)
    plots.model_correlation(corr, ctx.figure("oof_correlation.png"))
    off = corr.to_numpy()[~np.eye(len(corr), dtype=bool)]
    i, j = np.unravel_index(np.nanargmin(np.where(np.eye(len(corr), dtype=bool), np.inf, corr)), corr.shape)
    return (head + "Lower correlation = more diverse members = more for a blend to gain. "
            f"Mean off-diagonal {np.nanmean(off):.2f}; most diverse pair: `{corr.index[i]}` and "
            f"`{corr.columns[j]}` ({corr.iloc[i, j]:.2f}).\n\n"
            + ctx.image("oof_correlation.png", "OOF correlation") + "\n")


LOG_ALIASES = {  # log.jsonl key -> names the plots use
    "train_loss": ("train_loss", "loss"),
    "valid_loss": ("valid_loss", "val_loss"),
    "valid_f1": ("valid_f1", "val_f1", "f1"),
}


def read_logs(data: str, model: str) -> pd.DataFrame | None:
    """Every fold's ``log.jsonl`` of a model as one long frame (None if it has none)."""
    frames = []
    for log in sorted(paths.run_dir(data, model, 0).parent.glob("fold*/log.jsonl")):
        rows = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
        if rows:
            df = pd.DataFrame(rows)
            df["fold"] = int(log.parent.name.removeprefix("fold"))
            frames.append(df)
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    for name, keys in LOG_ALIASES.items():
        found = next((k for k in keys if k in df.columns), None)
        if found is not None:
            df[name] = df[found]
    return df


def section_curves(ctx: ReportContext) -> str:
    """Training curves per model from ``log.jsonl``."""
    parts, without = ["## Training curves\n"], []
    for m in ctx.models:
        logs = read_logs(ctx.cfg.data.name, m.name)
        if logs is None or "epoch" not in logs:
            without.append(f"`{m.name}`")
            continue
        fname = f"curves_{_slug(m.name)}.png"
        plots.training_curves(logs, m.name, ctx.figure(fname))
        parts.append(f"### {m.name}\n\n" + ctx.image(fname, f"training curves {m.name}") + "\n")
    if without:
        parts.append(f"No per-epoch logs (fitted in one step, e.g. CPU members): {', '.join(without)}.\n")
    return "\n".join(parts)


def _slug(name: str) -> str:
    """A file-name-safe version of a model name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def section_thresholds(ctx: ReportContext) -> str:
    """Thresholds per label, and F1 at 0.5 versus tuned, for the blend (else the best model)."""
    head = "## Thresholds\n\n"
    target = ctx.blend or ctx.best
    if target is None:
        return head + "No models yet.\n"
    y = ctx.comp.y()
    thr = pd.Series(_submission_thresholds(ctx, target), index=ctx.comp.classes)
    f1 = pd.DataFrame({"at 0.5": per_label_f1(y, binarize(target.prob, 0.5)),
                       "tuned": per_label_f1(y, target.pred)}, index=ctx.comp.classes)
    plots.thresholds(thr, f1, ctx.figure("thresholds.png"))
    preds = ctx.models + ([ctx.blend] if ctx.blend else [])
    table = pd.DataFrame([{"predictor": f"`{p.name}`", f"{ctx.metric} @0.5": p.cv_05,
                           "tuned (honest)": p.cv, "gain": p.cv - p.cv_05} for p in preds])
    how = ("as its submission applied them (fitted on the blend's in-sample OOF, saved with its report)"
           if target is ctx.blend else "fitted on all OOF rows (what a submission would use)")
    if target is ctx.blend and _per_row_decoder(target):
        how = (f"which its submission did not use: it decided each row with blend.decoder="
               f"{target.meta.get('decoder')}; shown are the per-label thresholds fitted on its OOF, for comparison")
    return (head + f"Thresholds of **{target.name}**, {how}. The F1 bars and the table use "
            "thresholds fitted without the scored fold.\n\n"
            + ctx.image("thresholds.png", "thresholds") + "\n\n" + md_table(table) + "\n")


def _per_row_decoder(target: Scored) -> bool:
    """A blend decided per row (expected-F1, GFM): its report has no per-label thresholds."""
    per_label = target.meta.get("per_label") or {}
    return any(v.get("threshold") is None for v in per_label.values())


def _submission_thresholds(ctx: ReportContext, target: Scored) -> np.ndarray:
    """A blend's thresholds as its report saved them (what its submission used); a model's,
    or a per-row-decoded blend's, fitted on all of its OOF rows with the ``blend.*`` rules."""
    per_label = target.meta.get("per_label") if target is ctx.blend else None
    if per_label and all(c in per_label for c in ctx.comp.classes) and not _per_row_decoder(target):
        return np.array([per_label[c]["threshold"] for c in ctx.comp.classes])
    params = threshold_params(ctx.cfg.blend, ctx.cfg.data.metric)
    return ThresholdOptimizer(**params).fit(target.prob, ctx.comp.y()).thresholds_


def section_experiments(ctx: ReportContext) -> str:
    """Links to sweep and ablation reports written by ``mmfold sweep`` / ``mmfold ablate``."""
    found = sorted(ctx.out.glob("sweep_*.md")) + sorted(ctx.out.glob("ablate_*.md"))
    head = "## Sweeps and ablations\n\n"
    if not found:
        return head + (f"None yet (`{hints.make('sweep', ctx.cfg.data.name)} MODEL=<model>`, "
                       f"`{hints.make('ablate', ctx.cfg.data.name)} MODEL=<model>`).\n")
    return head + "\n".join(f"- [{p.stem}]({p.name})" for p in found) + "\n"


Section = Callable[[ReportContext], str]
SECTIONS: list[Section] = [
    section_models, section_blends, section_per_label, section_labels, section_diversity,
    section_curves, section_thresholds, section_experiments,
]


def write_report(ctx: ReportContext) -> Path:
    """Render every section into ``reports/<data>/report.md``."""
    data = ctx.cfg.data.name
    title = (f"# mmfold report: `{data}`\n\nGenerated {time.strftime('%Y-%m-%d %H:%M')} from `oof/{data}/`, "
             f"`runs/{data}/*/fold*/log.jsonl` and `submissions/{data}/log.csv`.\n")
    body = "\n".join(section(ctx) for section in SECTIONS)
    return fileio.write_text(ctx.out / "report.md", title + "\n" + body)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmfold report`` options."""
    p.add_argument("--blend", help="submissions-log name of the blend to show (default: the latest)")


def run(args: argparse.Namespace) -> int:
    """Build and write the report."""
    cfg = load_config(args.data, None, args.overrides)
    path = write_report(build_context(cfg, args.blend))
    print(f"wrote {path}")
    return 0
