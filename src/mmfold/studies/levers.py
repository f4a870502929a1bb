"""``mmfold levers``: each lever beyond the plain blend, switched on alone, scored by the same
honest nested CV, as one table.

The plain blend is ``blend.*`` with the Optuna-weighted mean and per-label thresholds, whatever
``blend.method`` and ``blend.decoder`` the data config submits with, over the data config's
models (or ``--models``). Every lever changes one thing and is scored on the same folds, so its
per-fold delta against the plain blend is paired:

- decoders: ``expected_f1`` (Platt), ``expected_f1_isotonic`` and ``gfm`` (expected F1 with
  the label count learned) decide the *same* honest blend probabilities as the plain blend
  (one blender fit per fold, several decoders); they maximise samples-F1, so under another
  ``data.metric`` each is a row that says it was skipped and why, and the rest still run;
- stackers: ``stack_lgbm`` (a LightGBM per label over every model's probability of that label),
  ``stack_lgbm_all`` (over every model's probability of every label) and ``stack_logistic``
  (a logistic regression per label over every model's logit of that label);
- members (``levers.*`` in the data config, trained here if they are not yet, resumably):
  ``knn`` adds nearest-neighbour label-transfer members, ``seeds`` swaps a model for its
  multi-seed version, ``students`` adds distilled / pseudo-labelled students, ``ids`` adds
  members that read only the row id (``id_knn``), blended by ``levers.method`` (its note also
  gives its delta over the plain models under that method alone); a lever's model that is
  already in the plain blend is not added again;
- ``all``: every member lever at once, blended by ``levers.method`` (default: Optuna, the plain
  blend's) and decided by ``levers.decoder`` (expected-F1 by default; per-label thresholds,
  said in its note, where the metric is not samples-F1).

``extra_s`` is what a lever costs beyond the plain blend: the training seconds its members
recorded (``done.json``, every fold; for a multi-seed model swapped in, its seeds but one, so
the cost never compares timings of two runs; the row's ``train_s``) plus its blend's seconds
minus the plain blend's; timing noise below zero (a busy machine) counts as 0. Written to
``reports/<data>/levers.{json,md}`` (``--out``); ``--bench`` (``make bench-levers``) writes the
committed ``docs/bench/levers.{json,md}`` instead, one entry per dataset merged with the others,
and takes only the datasets shipped with mmfold (:data:`BENCH_DATA`): a competition of one's
own never lands in the repo's tracked benchmark tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mmfold import fileio, hints, paths
from mmfold.artifacts.manifest import fold_seconds
from mmfold.bench.real import DATASETS as REAL_DATASETS
from mmfold.config import SAMPLES_ONLY_DECODERS, Config, data_yaml, load_config
from mmfold.data.competition import Competition, load_competition, load_folds
from mmfold.errors import UserError
from mmfold.machine import available_cores
from mmfold.metrics import metric_label
from mmfold.registry import Registry

LEVERS = Registry("lever")

# the datasets whose tables docs/bench/levers.{json,md} holds: the ones shipped in configs/data/
BENCH_DATA = ("demo", *REAL_DATASETS)
BENCH_OUT = "docs/bench/levers"


@dataclass
class Context:
    """What every lever needs: the data, the plain blend's models and their fold scores."""

    cfg: Config
    comp: Competition
    folds: np.ndarray
    models: list[str]
    jobs: int
    overrides: list[str] = field(default_factory=list)  # what the command line set, for every member too
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    plain_s: float = 0.0

    @property
    def data(self) -> str:
        return self.cfg.data.name


@dataclass
class Blended:
    """One blend's honest per-fold scores and what it cost."""

    per_fold: list[float]
    blend_s: float
    models: list[str]


def nested(ctx: Context, models: list[str], decoders: dict[str, Any] | None = None,
           **blend: Any) -> dict[str, Blended]:
    """Nested CV of ``models`` under ``blend.*`` changes, one result per decoder (default:
    ``blend.decoder``), timed; the blender is fitted once per fold for all decoders."""
    from mmfold.artifacts.predictions import load_oofs
    from mmfold.ensemble.blenders import build_blender
    from mmfold.ensemble.decoders import build_decoder
    from mmfold.ensemble.nested import nested_cv_decoders

    bcfg = replace(ctx.cfg.blend, **blend)
    metric = ctx.cfg.data.metric
    decoders = decoders or {"": {}}
    makers = {name: (lambda c=replace(bcfg, **over): build_decoder(c, metric)) for name, over in decoders.items()}
    oofs = load_oofs(ctx.data, models, ctx.comp, ctx.folds, with_test=False)
    start = time.perf_counter()
    res = nested_cv_decoders(oofs.P, ctx.comp.y(), oofs.folds, lambda k: build_blender(bcfg, metric), makers, metric)
    seconds = time.perf_counter() - start
    return {name: Blended(r.per_fold, seconds, models) for name, r in res.items()}


def train_members(ctx: Context, models: list[str]) -> float:
    """Train (or find trained) ``models`` on every fold; their recorded training seconds.

    As ``make train ARGS=... JOBS=...`` would: under the command's overrides (the metric a
    member stops early on is the one the table scores), in this process unless ``jobs`` > 1
    (a process pool would start, and import torch, only to find the folds done)."""
    from mmfold.train.runner import overrides_for, train_model, train_parallel

    source = ctx.cfg.source or ctx.data
    plain = [load_config(source, m, ctx.overrides) for m in models]
    cfgs = [load_config(source, c.model.name, overrides_for(c, ctx.overrides, plain)) for c in plain]
    if ctx.jobs > 1 and cfgs:
        train_parallel(cfgs, ctx.comp, None, jobs=ctx.jobs)
    elif ctx.jobs <= 1:
        for cfg in cfgs:
            train_model(cfg, ctx.comp)
    return sum(train_seconds(ctx.data, m, ctx.folds) for m in models)


SEED_SHARES = {"all": lambda n: 1.0, "one": lambda n: 1 / n, "rest": lambda n: 1 - 1 / n}


def train_seconds(data: str, model: str, folds: np.ndarray, seeds: str = "all") -> float:
    """Seconds a model's folds recorded when trained (``done.json``); of a multi-seed model,
    ``seeds="one"`` is one seed's share (what the single-seed model it replaces costs) and
    ``"rest"`` the other seeds' (its extra cost), both from its own run: the single-seed
    model's folds may have been timed on a busier machine."""
    total = 0.0
    for k in np.unique(folds):
        done = json.loads((paths.run_dir(data, model, int(k)) / "done.json").read_text())
        total += fold_seconds(done) * SEED_SHARES[seeds](len(done.get("seeds") or [0]))
    return total


def _blend_extra(ctx: Context, b: Blended) -> float:
    """A lever blend's seconds beyond the plain blend's (timing noise below zero counts as 0)."""
    return max(0.0, b.blend_s - ctx.plain_s)


def member_row(ctx: Context, b: Blended, train_s: float, note: str = "") -> dict[str, Any]:
    """A member lever's row: its cost is the training seconds its members recorded beyond the
    plain blend's (``train_s``, kept as recorded: a swapped-in model can train faster than the
    one it replaces on a busy machine) plus its blend's extra; noise below zero counts as 0."""
    return row(ctx, b, max(0.0, train_s) + _blend_extra(ctx, b), note) | {"train_s": round(float(train_s), 1)}


def row(ctx: Context, b: Blended, extra_s: float, note: str = "") -> dict[str, Any]:
    """One table row: honest CV, paired delta against the plain blend, cost."""
    base = np.array(ctx.results["plain"]["per_fold"]) if "plain" in ctx.results else np.array(b.per_fold)
    d = np.array(b.per_fold) - base
    return {"cv": round(float(np.mean(b.per_fold)), 4), "cv_std": round(float(np.std(b.per_fold)), 4),
            "delta": round(float(d.mean()), 4), "delta_std": round(float(d.std()), 4),
            "folds_better": int((d > 0).sum()), "folds": len(d), "extra_s": round(float(extra_s), 1),
            "per_fold": [round(float(s), 5) for s in b.per_fold], "models": b.models,
            **({"note": note} if note else {})}


# ------------------------------------------------------------------------------- levers


# the decoder levers: their ``blend.*`` changes, scored on the plain blend's own fits
DECODER_LEVERS: dict[str, dict[str, str]] = {
    "expected_f1": {"decoder": "expected_f1", "calibration": "platt"},
    "expected_f1_isotonic": {"decoder": "expected_f1", "calibration": "isotonic"},
    "gfm": {"decoder": "gfm", "calibration": "platt"},
}


def samples_only(metric: str) -> str:
    """Why a lever that maximises samples-F1 does not apply under ``metric`` ('' where it does)."""
    return "" if metric == "samples" else f"maximises samples-F1, the metric is {metric_label(metric)}: not run"


@LEVERS.register("plain")
def plain_and_decoders(ctx: Context) -> None:
    """The plain blend and the decoder levers, from one blender fit per fold; under a metric
    other than samples-F1 the decoder levers do not apply: their rows say so."""
    why = samples_only(ctx.cfg.data.metric)
    if why:
        b = nested(ctx, ctx.models)[""]
        ctx.plain_s = b.blend_s
        ctx.results["plain"] = row(ctx, b, 0.0)
        ctx.results.update({name: {"skipped": why} for name in DECODER_LEVERS})
        return
    res = nested(ctx, ctx.models, {"plain": {"decoder": "thresholds"}, **DECODER_LEVERS})
    extra = _decoder_seconds(ctx)
    ctx.plain_s = max(0.0, res["plain"].blend_s - sum(extra.values()))  # the thresholds-only blend
    ctx.results["plain"] = row(ctx, res["plain"], 0.0)
    for name, seconds in extra.items():
        ctx.results[name] = row(ctx, res[name], seconds)


def _decoder_seconds(ctx: Context) -> dict[str, float]:
    """Extra seconds of each decoder lever over the thresholds, fitted on the other folds'
    rows and predicting each fold, on an equal-weight blend of the plain models."""
    from mmfold.artifacts.predictions import load_oofs
    from mmfold.ensemble.decoders import build_decoder

    P = load_oofs(ctx.data, ctx.models, ctx.comp, ctx.folds, with_test=False).P.mean(0)
    y = ctx.comp.y()

    def seconds(over: dict[str, str]) -> float:
        cfg = replace(ctx.cfg.blend, **over)
        start = time.perf_counter()
        for k in np.unique(ctx.folds):
            tr = ctx.folds != k
            build_decoder(cfg, ctx.cfg.data.metric).fit(P[tr], y[tr]).predict(P[~tr])
        return time.perf_counter() - start

    base = seconds({"decoder": "thresholds"})
    return {name: max(0.0, seconds(over) - base) for name, over in DECODER_LEVERS.items()}


def _stacker(method: str) -> Callable[[Context], None]:
    def lever(ctx: Context) -> None:
        b = nested(ctx, ctx.models, method=method)[""]
        ctx.results[f"stack_{method}"] = row(ctx, b, _blend_extra(ctx, b))

    return lever


LEVERS.register("stack_lgbm")(_stacker("lgbm"))
LEVERS.register("stack_lgbm_all")(_stacker("lgbm_all"))
LEVERS.register("stack_logistic")(_stacker("logistic"))


@LEVERS.register("knn")
def knn(ctx: Context) -> None:
    """The plain models plus ``levers.knn``."""
    _added(ctx, "knn", list(ctx.cfg.levers.knn))


@LEVERS.register("ids")
def ids(ctx: Context) -> None:
    """The plain models plus ``levers.ids`` (members reading only the row id), blended by
    ``levers.method``: a member that knows a few labels needs per-label weights. Two changes
    at once, so the note also gives the paired delta over the plain models under that method."""
    method = ctx.cfg.levers.method or ctx.cfg.blend.method
    _added(ctx, "ids", list(ctx.cfg.levers.ids), method=method)
    r = ctx.results["ids"]
    if method != ctx.cfg.blend.method and "per_fold" in r:
        alone = ctx.results.get(f"stack_{method}", {}).get("per_fold")  # stack_<method> ran already
        if alone is None:
            alone = nested(ctx, ctx.models, method=method)[""].per_fold
        d = np.array(r["per_fold"]) - np.array(alone)
        r["delta_vs_method"] = round(float(d.mean()), 4)
        r["note"] += f"; vs the plain models under it: {d.mean():+.4f} ({int((d > 0).sum())}/{len(d)} folds better)"


@LEVERS.register("students")
def students(ctx: Context) -> None:
    """The plain models plus ``levers.students``."""
    _added(ctx, "students", list(ctx.cfg.levers.students))


def _added(ctx: Context, name: str, extra: list[str], **blend: Any) -> None:
    """The plain models plus ``extra`` (trained if need be), under ``blend.*`` changes; a model
    already in the plain blend is not added twice (the row would measure nothing)."""
    extra = [m for m in extra if m not in ctx.models]
    if not extra:
        ctx.results[name] = {"skipped": f"no levers.{name} models in {data_yaml(ctx.cfg.source or ctx.data)} "
                                        "beyond the plain blend's"}
        return
    cost = train_members(ctx, extra)
    b = nested(ctx, ctx.models + extra, **blend)[""]
    note = f"blend.method {blend['method']}" if blend.get("method", ctx.cfg.blend.method) != ctx.cfg.blend.method else ""
    ctx.results[name] = member_row(ctx, b, cost, note)


@LEVERS.register("seeds")
def seeds(ctx: Context) -> None:
    """The plain models with each ``levers.seeds`` model swapped for its multi-seed version."""
    swap = {m: s for m, s in ctx.cfg.levers.seeds.items() if m in ctx.models}
    if not swap:
        ctx.results["seeds"] = {"skipped": f"no levers.seeds entry for {ctx.models}"}
        return
    train_members(ctx, list(swap.values()))
    cost = sum(train_seconds(ctx.data, s, ctx.folds, seeds="rest") for s in swap.values())
    b = nested(ctx, [swap.get(m, m) for m in ctx.models])[""]
    ctx.results["seeds"] = member_row(ctx, b, cost)


@LEVERS.register("all")
def all_levers(ctx: Context) -> None:
    """Every member lever at once, blended by ``levers.method`` (default: the plain blend's
    Optuna) and decided by ``levers.decoder`` (Platt calibration), or by per-label thresholds
    where that decoder does not apply to the metric (the row's note says so)."""
    lv = ctx.cfg.levers
    wanted = [lv.seeds.get(m, m) for m in ctx.models] + list(lv.knn) + list(lv.ids) + list(lv.students)
    models = list(dict.fromkeys(wanted))  # each model once
    swapped = [lv.seeds[m] for m in ctx.models if m in lv.seeds]
    cost = train_members(ctx, [m for m in models if m not in ctx.models])
    cost -= sum(train_seconds(ctx.data, s, ctx.folds, seeds="one") for s in swapped)  # replaces the plain model
    method = lv.method or ctx.cfg.blend.method
    decoder, why = lv.decoder, ""
    if decoder in SAMPLES_ONLY_DECODERS and ctx.cfg.data.metric != "samples":
        decoder, why = "thresholds", f" (levers.decoder {lv.decoder} {samples_only(ctx.cfg.data.metric)})"
    b = nested(ctx, models, decoder=decoder, calibration="platt", method=method)[""]
    ctx.results["all"] = member_row(ctx, b, cost, f"decoder {decoder}{why}, blend.method {method}")


# ------------------------------------------------------------------------------- command


def run_levers(cfg: Config, models: list[str], names: list[str], jobs: int) -> dict[str, Any]:
    """Every lever in ``names`` (``plain`` always first) on one dataset."""
    comp = load_competition(cfg.data)
    folds = load_folds(comp)
    missing = [m for m in models if not paths.oof_file(cfg.data.name, m).exists()]
    if missing:
        raise UserError(f"levers: the plain blend's models {missing} are not collected; "
                        f"{hints.make('train', cfg.data.name, model=missing)}")
    ctx = Context(cfg, comp, folds, models, jobs, list(cfg.overrides))
    start = time.perf_counter()
    for name in ["plain", *[n for n in names if n != "plain"]]:
        LEVERS.get(name)(ctx)
        print(f"levers {cfg.data.name}: {name} done ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": len(comp.train), "labels": len(comp.classes),
            "folds": int(len(np.unique(folds))), "metric": cfg.data.metric, "models": models,
            "blend": {"method": cfg.blend.method, "n_trials": cfg.blend.n_trials}, "levers": ctx.results,
            "total_s": round(time.perf_counter() - start, 1)}


def merged(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new``, keeping the rows of levers it did not run from an earlier run of the same
    plain blend (same models, rows and folds: their deltas are against the same plain CV)."""
    same = old is not None and all(old.get(k) == new[k] for k in ("models", "rows", "folds"))
    same = same and old["levers"].get("plain", {}).get("per_fold") == new["levers"]["plain"]["per_fold"]
    rows = {**old["levers"], **new["levers"]} if same else new["levers"]
    return {**new, "levers": dict(sorted(rows.items(), key=lambda kv: _rank(kv[0])))}


def _rank(name: str) -> int:
    """A row's place in the table: plain, decoders, stackers, member levers, ``all`` last."""
    order = ["plain", *DECODER_LEVERS, "stack_lgbm", "stack_lgbm_all", "stack_logistic", "knn", "ids", "seeds",
             "students", "all"]
    return order.index(name) if name in order else len(order)


def to_markdown(doc: dict[str, Any]) -> str:
    """One table per dataset."""
    lines = ["# Levers beyond the plain blend (honest nested CV, in each dataset's metric)", "",
             f"machine: {doc.get('machine', '')}", "",
             "delta: mean over folds of (lever - plain blend) on the same folds; better: folds where it is higher.", ""]
    for data, d in doc["datasets"].items():
        about = (f" ({d['rows']:,} rows, {d['labels']} labels, {d['folds']} folds, "
                 f"{metric_label(d.get('metric', 'samples'))}; plain blend of {', '.join(d['models'])})"
                 if "rows" in d else "")
        lines += [f"## {data}{about}", "",
                  "| lever | honest CV | delta vs plain | fold std of delta | folds better | extra s | note |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in d["levers"].items():
            if "skipped" in r:
                lines.append(f"| {name} | skipped | | | | | {r['skipped']} |")
                continue
            if "cv_std" not in r:
                lines.append(f"| {name} | {r.get('cv', '')} | | | | | |")
                continue
            lines.append(f"| {name} | {r['cv']:.4f} ± {r['cv_std']:.4f} | {r['delta']:+.4f} | {r['delta_std']:.4f} | "
                         f"{r['folds_better']}/{r['folds']} | {r['extra_s']:.1f} | {r.get('note', '')} |")
        lines.append("")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmfold levers`` options."""
    p.add_argument("--models", nargs="*", default=None, help="the plain blend's models (default: data.models)")
    p.add_argument("--levers", nargs="*", default=None, help=f"levers to run (default: all of {sorted(LEVERS)})")
    p.add_argument("--jobs", type=int, default=1, help="folds trained at once for the levers' members")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", default=None,
                       help="output path stem (.json, .md; default reports/<data>/levers); datasets merge")
    where.add_argument("--bench", action="store_true",
                       help=f"refresh the committed {BENCH_OUT}.{{json,md}} (shipped datasets only: {', '.join(BENCH_DATA)})")


def check_bench(data: str, cfg: Config) -> None:
    """``--bench`` writes the repo's tracked tables: only for a dataset shipped with mmfold, named
    as such (a data YAML given by path, or another dataset's key, is a competition of one's own).

    Raises:
        UserError: naming the shipped datasets and where the dataset's own table goes.
    """
    if paths.is_yaml_file(data) or data not in BENCH_DATA or cfg.data.name != data:
        raise UserError(f"levers --bench refreshes the committed {BENCH_OUT}.{{json,md}}, which holds the datasets "
                        f"shipped with mmfold ({', '.join(BENCH_DATA)}); {data!r} is not one of them. Its table "
                        f"goes to {paths.reports_dir(cfg.data.name) / 'levers'}.{{json,md}}: "
                        f"{hints.make('levers', cfg.data.name)}")


def out_stem(args: argparse.Namespace, cfg: Config) -> Path:
    """Where the table goes (``.json``/``.md`` added): ``--out``, the benchmark tables for
    ``--bench``, else the dataset's own reports folder."""
    if args.out:
        return paths.resolve(args.out)
    return paths.resolve(BENCH_OUT) if args.bench else paths.reports_dir(cfg.data.name) / "levers"


def run(args: argparse.Namespace) -> int:
    """Run the levers on ``--data`` and merge its table into ``--out``."""
    # the baseline every lever is one change away from: Optuna weights + per-label thresholds,
    # whatever the data config (or the command line) submits with: fashion's is a stacker with
    # gfm, itself the result of levers; other methods are levers.method. Set as an override, so
    # a data config whose submitted decoder is samples-only still loads under another metric.
    cfg = load_config(args.data, None, [*args.overrides, "blend.decoder=thresholds"])
    if args.bench:
        check_bench(args.data, cfg)
    cfg.blend.method = "optuna"
    if cfg.levers.n_trials:
        cfg.blend.n_trials = cfg.levers.n_trials
    models = list(args.models or cfg.blend.models or cfg.data.models)
    if not models:
        raise UserError("levers: no models for the plain blend (--models, blend.models or data.models)")
    names = list(args.levers or LEVERS)
    for n in names:
        LEVERS.get(n)  # an unknown lever fails before anything runs
    result = run_levers(cfg, models, names, args.jobs)
    stem = out_stem(args, cfg)
    js = stem.with_suffix(".json")
    doc = json.loads(js.read_text()) if js.exists() else {"datasets": {}}
    doc.update({"machine": f"{platform.machine()}, {available_cores()} cores", "date": result["date"]})
    doc["datasets"][cfg.data.name] = merged(doc["datasets"].get(cfg.data.name), result)
    fileio.write_json(js, doc)
    fileio.write_text(stem.with_suffix(".md"), to_markdown(doc))
    print(to_markdown({**doc, "datasets": {cfg.data.name: result}}))
    print(f"wrote {js} and {stem.with_suffix('.md')}")
    return 0

