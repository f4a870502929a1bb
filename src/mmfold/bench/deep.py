"""``mmfold bench-deep``: fine-tuned members on real data, per fold, blended with the CPU members.

For each dataset (fashion, comp5329 in ``../shared/data``): folds (the existing folds file is
reused) -> the CPU members and every fine-tuned member on all folds through the normal
``train`` + ``collect`` path, the folds of all members in one queue over the cores
(:func:`mmfold.train.runner.train_parallel`) -> the members that are only measured on one
fold (a GPU user's choice between backbones) -> two blends with nested (honest) CV: the CPU
members alone (what ``bench-real`` blends) and deep + CPU. Written to
``reports/bench/deep.{md,json}``.

Finished folds are kept (the runner skips them), so a run that was cut off continues where
it stopped; ``--fresh`` retrains everything. A member's seconds are what its folds cost when
trained (``done.json``: the whole fold, caches included), so they hold for a resumed run too.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from mmfold import fileio, paths
from mmfold.artifacts.manifest import fold_seconds
from mmfold.bench.real import Timer, blend_members, load_dataset, member_configs
from mmfold.config import Config
from mmfold.data.competition import Competition
from mmfold.machine import available_cores

DATASETS = ("fashion", "comp5329")
# per dataset: CPU members (frozen features), fine-tuned members on every fold, and
# fine-tuned members measured on fold 0 only
CPU_MEMBERS = {"fashion": ["tfidf_lr", "fused_lr", "fused_mlp"],
               "comp5329": ["tfidf_lr", "tfidf_mlp", "minilm_mlp", "mpnet_mlp"]}
DEEP_MEMBERS = {"fashion": ["effnet_lite0_ft", "effnet_minilm_concat_ft"],
                "comp5329": ["minilm_ft", "mpnet_ft"]}
# per dataset: members whose worth is measured as the blend of all members without them
WITHOUT = {"comp5329": ["mpnet_mlp", "mpnet_ft"]}
ONE_FOLD = {"fashion": ["effnet_lite1_ft", "effnet_lite2_ft", "effnet_minilm_hybrid_ft"], "comp5329": []}
# the targets (honest nested-CV samples-F1)
TARGETS = {"fashion": {"image": 0.87, "fusion": 0.955, "blend": 0.960},
           "comp5329": {"text": 0.875, "blend": 0.880}}  # issue 24: text 0.875 (was 0.872)


def machine() -> str:
    """The processor architecture, the cores this process may use and the GPU, if any."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {available_cores()} cores, {gpu}"


def report_paths() -> tuple[Path, Path]:
    """``reports/bench/deep.md`` and ``deep.json``."""
    folder = paths.root() / "reports" / "bench"
    return folder / "deep.md", folder / "deep.json"


# --------------------------------------------------------------------------------- stages


def train_all(cfgs: list[Config], comp: Competition, jobs: int, fresh: bool, timer: Timer,
              folds: list[int] | None = None) -> None:
    """Every fold of every member in one queue over ``jobs`` processes (then collect)."""
    from mmfold.train.runner import train_parallel

    if fresh:
        for cfg in cfgs:
            shutil.rmtree(paths.run_dir(cfg.data.name, cfg.model.name, 0).parent, ignore_errors=True)
    with timer("train" if folds is None else "train one fold"):
        train_parallel(cfgs, comp, folds, jobs=jobs, collect=folds is None)


def fold_cost(data: str, model: str, folds: list[int]) -> dict[str, float]:
    """Seconds (:func:`~mmfold.artifacts.manifest.fold_seconds`) and training samples/s of a
    member's folds, from their ``done.json``."""
    infos = [json.loads((paths.run_dir(data, model, k) / "done.json").read_text()) for k in folds]
    seconds = [fold_seconds(i) for i in infos]
    rates = [i["images_per_s"] for i in infos if i.get("images_per_s")]
    return {"train_s": round(sum(seconds), 1), "s_per_fold": round(float(np.mean(seconds)), 1),
            "samples_per_s": round(float(np.mean(rates)), 1) if rates else None,
            "epochs": [i.get("epochs") for i in infos], "best_epoch": [i.get("best_epoch") for i in infos]}


def one_fold_score(data: str, model: str, comp: Competition, fold_of_row: np.ndarray, cfg: Config) -> dict[str, Any]:
    """Honest samples-F1 of fold 0 alone (thresholds fitted on one half, applied to the other)."""
    from mmfold.artifacts.predictions import read_fold_oofs
    from mmfold.ensemble.scoring import honest_cv

    probs = read_fold_oofs(data, model, comp.train["id"].tolist(), comp.classes, fold_of_row, folds=[0])
    y = comp.y()[fold_of_row == 0]
    cv = honest_cv(probs, y, np.zeros(len(y), int), cfg.blend, cfg.data.metric)
    return {"fold": 0, "cv": round(cv.mean, 4), **fold_cost(data, model, [0])}


def member_rows(data: str, cfgs: list[Config], scores: dict[str, dict[str, float]], n_folds: int) -> dict[str, Any]:
    """The JSON rows of the members: kind, fine-tuned or not, honest CV, cost."""
    deep = set(DEEP_MEMBERS.get(data, []))
    return {c.model.name: {"kind": c.model.kind, "fine_tuned": c.model.name in deep,
                           "cv": round(scores[c.model.name]["samples"], 4),
                           "cv_std": round(scores[c.model.name]["samples_std"], 4),
                           **fold_cost(data, c.model.name, list(range(n_folds)))}
            for c in cfgs}


def blend_row(data: str, models: list[str], comp: Competition, fold: np.ndarray, cfg: Config) -> dict[str, Any]:
    """Nested-CV blend of ``models``: honest samples-F1, spread, weights, and the members alone."""
    out = blend_members(data, models, comp, fold, cfg)
    s = out["scores"]
    return {"models": models, "cv": round(s["blend"]["samples"], 4), "cv_std": round(s["blend"]["samples_std"], 4),
            "micro": round(s["blend"]["micro"], 4), "macro": round(s["blend"]["macro"], 4),
            "weights": out["weights"], "scores": s}


# ------------------------------------------------------------------------------- dataset


def bench_dataset(data: str, args: argparse.Namespace) -> dict[str, Any]:
    """Folds -> members (all folds) -> one-fold members -> the two blends, for one dataset."""
    timer = Timer()
    cfg, comp, fold, _ = load_dataset(data, args, timer)
    cpu, _ = member_configs(data, CPU_MEMBERS[data], comp, args.overrides)
    deep, _ = member_configs(data, DEEP_MEMBERS[data], comp, args.overrides)
    one, _ = member_configs(data, [] if args.skip_one_fold else ONE_FOLD[data], comp, args.overrides)
    train_all(cpu + deep, comp, args.jobs, args.fresh, timer)
    if one:
        train_all(one, comp, args.jobs, args.fresh, timer, folds=[0])
    with timer("blend"):
        base = blend_row(data, [c.model.name for c in cpu], comp, fold, cfg)
        full = blend_row(data, [c.model.name for c in cpu + deep], comp, fold, cfg)
        left_out = [c.model.name for c in cpu + deep if c.model.name not in WITHOUT.get(data, [])]
        without = blend_row(data, left_out, comp, fold, cfg) if len(left_out) < len(cpu + deep) else None
    n_folds = int(fold.max()) + 1
    members = member_rows(data, cpu + deep, full.pop("scores"), n_folds)
    base.pop("scores")
    if without is not None:
        without.pop("scores")
        without["without"] = WITHOUT[data]
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": len(comp.train), "labels": len(comp.classes), "folds": n_folds,
              "members": members, "blend": full, "blend_cpu_only": base, "blend_without": without,
              "one_fold": {c.model.name: {"kind": c.model.kind, "fine_tuned": True,
                                          **one_fold_score(data, c.model.name, comp, fold, cfg)} for c in one},
              "stages_s": timer.stages, "total_s": round(sum(timer.stages.values()), 1)}
    result["targets"] = targets(data, result)
    return result


def targets(data: str, r: dict[str, Any]) -> dict[str, Any]:
    """Each target of the issue: the figure it is about, the bar, and whether it is met."""
    deep = [v for v in r["members"].values() if v["fine_tuned"]]
    best_member = max(v["cv"] for v in r["members"].values())
    by_kind: dict[str, list[float]] = {}
    for v in deep:
        by_kind.setdefault(inputs_of(v["kind"]), []).append(v["cv"])
    out = {}
    for what, bar in TARGETS.get(data, {}).items():
        value = r["blend"]["cv"] if what == "blend" else max(by_kind.get(what, []), default=float("nan"))
        ok = value >= bar and (what != "blend" or value > best_member)
        out[what] = {"cv": value, "target": bar, "met": bool(ok)}
    return out


def inputs_of(kind: str) -> str:
    """``image``, ``text`` or ``fusion``: what a torch model kind reads."""
    from mmfold.models import MODELS

    builder = MODELS.get(kind)
    sides = (getattr(builder, "needs_image", False), getattr(builder, "needs_text", False))
    return {(True, False): "image", (False, True): "text"}.get(sides, "fusion")


# -------------------------------------------------------------------------------- report


def render(doc: dict[str, Any]) -> str:
    """Markdown: per dataset the members, the blends, one-fold members and the targets."""
    lines = ["# Deep-member benchmark (fine-tuned + CPU members)", "",
             f"machine: {doc['machine']}; written {doc['date']}; this run's wall time {doc['total_s']:.0f} s; "
             f"cost of a cold run (every fold's seconds as trained, {doc['jobs']} folds at a time, plus the "
             f"blends): {doc['cost_s']:.0f} s. Scores are honest nested-CV samples-F1.", ""]
    for data, r in doc["datasets"].items():
        lines += [f"## {data}", "", f"{r['rows']} rows, {r['labels']} labels, {r['folds']} folds; run {r.get('date', doc['date'])}.", "",
                  "| member | kind | fine-tuned | CV | ± fold std | s per fold | train samples/s | weight |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, v in r["members"].items():
            lines.append(f"| {m} | {v['kind']} | {'yes' if v['fine_tuned'] else 'no'} | {v['cv']:.4f} | "
                         f"{v['cv_std']:.4f} | {v['s_per_fold']:.0f} | {v['samples_per_s'] or ''} | "
                         f"{r['blend']['weights'].get(m, '')} |")
        for name, b in blend_rows(r):
            lines.append(f"| {name} | | | {b['cv']:.4f} | {b['cv_std']:.4f} | | | |")
        if r["one_fold"]:
            lines += ["", "Measured on fold 0 only (honest: thresholds fitted on one half of the fold):", "",
                      "| member | kind | fold-0 CV | s per fold | train samples/s |", "|---|---|---|---|---|"]
            lines += [f"| {m} | {v['kind']} | {v['cv']:.4f} | {v['s_per_fold']:.0f} | {v['samples_per_s'] or ''} |"
                      for m, v in r["one_fold"].items()]
        met = ", ".join(f"{k} {v['cv']:.4f} vs {v['target']} {'met' if v['met'] else 'MISSED'}"
                        for k, v in r["targets"].items())
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages_s"].items())
        lines += ["", f"Targets: {met}.", f"Stage wall times (s): {stages}.", ""]
    return "\n".join(lines) + "\n"


def blend_rows(r: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The blend rows of a dataset's table: CPU members, every member without the ones being
    measured (where a run measured that), every member."""
    rows = [("blend, CPU members", r["blend_cpu_only"])]
    if r.get("blend_without"):
        rows.append((f"blend, deep + CPU without {', '.join(r['blend_without']['without'])}", r["blend_without"]))
    return [*rows, ("**blend, deep + CPU**", r["blend"])]


# ----------------------------------------------------------------------------------- cli


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--datasets``, ``--shared``, ``--jobs``, ``--fresh``, ``--skip-one-fold``."""
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated data config names")
    p.add_argument("--shared", default="../shared/data", help="folder holding <dataset>/ folders")
    p.add_argument("--jobs", type=int, default=0, help="folds trained at once (0: one per core)")
    p.add_argument("--fresh", action="store_true", help="retrain every member instead of keeping finished folds")
    p.add_argument("--skip-one-fold", action="store_true", help="skip the members measured on fold 0 only")


def run(args: argparse.Namespace) -> int:
    """Benchmark every dataset, write reports/bench/deep.{md,json}, print the tables."""
    args.jobs = args.jobs or available_cores()
    start = time.perf_counter()
    datasets = {}
    for data in args.datasets.split(","):
        print(f"== {data}", flush=True)
        datasets[data] = bench_dataset(data, args)
    print(write_report(with_previous(datasets), args.jobs, time.perf_counter() - start))
    return 0


def with_previous(datasets: dict[str, Any]) -> dict[str, Any]:
    """This run's datasets plus the other datasets of the previous ``deep.json`` (each entry
    carries its own ``date``), so ``--datasets fashion`` refreshes fashion alone."""
    _, js = report_paths()
    old = json.loads(js.read_text()).get("datasets", {}) if js.exists() else {}
    return {**{d: r for d, r in old.items() if d not in datasets}, **datasets}


def write_report(datasets: dict[str, Any], jobs: int, wall_s: float) -> str:
    """Write ``deep.json`` and ``deep.md`` for ``datasets``; returns the markdown.

    ``cost_s`` is what every fold of every dataset cost as trained (``done.json``), divided by
    the folds trained at once: the wall time of one cold run, whichever runs trained them.
    """
    cost = sum(v["train_s"] for r in datasets.values() for v in [*r["members"].values(), *r["one_fold"].values()])
    blends = sum(r["stages_s"].get("blend", 0.0) for r in datasets.values())
    doc = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "jobs": jobs,
           "total_s": round(wall_s, 1), "cost_s": round(cost / jobs + blends, 1), "datasets": datasets}
    md, js = report_paths()
    fileio.write_json(js, doc)
    text = render(doc)
    fileio.write_text(md, text)
    return text
