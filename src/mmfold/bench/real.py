"""``mmfold bench-real``: the CPU members and their blend on the real data in ../shared/data.

For each dataset: folds (the existing folds file is reused) -> frozen-encoder embeddings
(cached: a second run only loads them) -> every CPU member over all folds through the normal
``train`` + ``collect`` path -> the blend with nested (honest) CV. Each member's and the
blend's honest samples/micro/macro F1 and the wall time of every stage go to
``reports/bench/real.{md,json}``; the JSON keeps a short history of runs, so the first (cold
cache) and later (warm cache) totals sit side by side.

Members are retrained on every run (only the label-free embeddings are cached), so the times
are what a user pays for ``make train blend`` once the embeddings exist.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmfold import fileio, paths
from mmfold.machine import available_cores
from mmfold.config import Config, load_config
from mmfold.data.competition import Competition, load_competition
from mmfold.errors import UserError

DATASETS = ("comp5329", "coco_mini", "fashion")
# Members per dataset; a member whose inputs a dataset lacks (images on comp5329) is skipped.
MEMBERS_BY_DATA: dict[str, list[str]] = {
    "comp5329": ["tfidf_lr", "minilm_lr", "minilm_mlp", "tfidf_mlp", "lgbm_emb", "text_fused_lr"],
    "coco_mini": ["tfidf_lr", "minilm_lr", "effnet_lr", "fused_lr"],
    "fashion": ["tfidf_lr", "minilm_lr", "effnet_mlp", "fused_lr", "fused_mlp"],
}
HISTORY = 10  # runs kept in real.json


@dataclass
class Timer:
    """Wall seconds per named stage, in the order they ran."""

    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - start, 2)


def report_paths() -> tuple[Path, Path]:
    """``reports/bench/real.md`` and ``real.json``."""
    folder = paths.root() / "reports" / "bench"
    return folder / "real.md", folder / "real.json"


# --------------------------------------------------------------------------------- stages


def dataset_config(data: str, shared: str, overrides: list[str]) -> Config:
    """The data config with its root pointed at ``<shared>/<data>``."""
    return load_config(data, None, [f"data.root={Path(shared) / data}", *overrides])


def ensure_folds(comp: Competition, cfg: Config) -> tuple[np.ndarray, bool]:
    """The fold of every row: the existing folds file (True), or new folds written once."""
    from mmfold.data.competition import load_folds
    from mmfold.data.folds import assign_folds, write_folds

    if paths.folds_file(comp.cfg.name).exists():
        return load_folds(comp), True
    fold = assign_folds(comp.y(), cfg.folds)
    write_folds(comp, fold, force=False)
    return fold, False


def member_configs(data: str, names: list[str], comp: Competition, overrides: list[str]) -> tuple[list[Config], list[str]]:
    """Resolved configs of the members this dataset can feed, and notes on the skipped ones."""
    from mmfold.cpu.members import modalities

    have = {m for m, ok in (("text", comp.has_captions), ("image", comp.has_images)) if ok}
    cfgs, skipped = [], []
    for name in names:
        cfg = load_config(data, name, overrides)
        cfg.data = comp.cfg
        missing = modalities(cfg) - have
        if missing:
            skipped.append(f"{name} (needs {', '.join(sorted(missing))})")
        else:
            cfgs.append(cfg)
    return cfgs, skipped


def warm_embeddings(comp: Competition, cfgs: list[Config], timer: Timer) -> dict[str, bool]:
    """Compute (or load) every encoder the members use, timed per encoder; True = was cached."""
    from mmfold.cpu.encoders import build_encoder, cache_file, embed

    cached = {}
    for enc_name, settings in _encoders(cfgs):
        for split in ("train", "test") if comp.test is not None else ("train",):
            enc = build_encoder(enc_name, **settings)
            key = f"embed {enc_name}/{split}"
            cached[key] = cache_file(comp, split, enc).exists()
            with timer(key):
                embed(comp, split, enc_name, **settings)
    return cached


def _encoders(cfgs: list[Config]) -> list[tuple[str, dict]]:
    """Distinct (encoder, settings) pairs over the member configs."""
    seen: dict[str, tuple[str, dict]] = {}
    for cfg in cfgs:
        p = cfg.model.params
        if cfg.model.kind == "tfidf_linear":
            continue
        for e in p.get("encoders", ["minilm"]):
            s = dict((p.get("encoder_settings") or {}).get(e, {}))
            seen[json.dumps([e, s], sort_keys=True)] = (e, s)
    return list(seen.values())


def train_members(cfgs: list[Config], comp: Competition, fresh: bool, timer: Timer) -> None:
    """Each member over all folds via ``mmfold.train.train_model`` (writes runs/ and oof/)."""
    from mmfold.train.runner import train_model

    for cfg in cfgs:
        if fresh:  # retrain: the bench measures training, only embeddings are cached
            shutil.rmtree(paths.run_dir(cfg.data.name, cfg.model.name, 0).parent, ignore_errors=True)
        with timer(f"train {cfg.model.name}"):
            train_model(cfg, comp)


def blend_members(data: str, models: list[str], comp: Competition, fold: np.ndarray, cfg: Config) -> dict[str, Any]:
    """Nested-CV blend of the members; honest metrics of the blend and of each member alone."""
    from mmfold.artifacts.predictions import load_oofs
    from mmfold.ensemble.nested import fit_blend
    from mmfold.metrics import all_metrics

    oofs = load_oofs(data, models, comp, fold, with_test=False)
    y = comp.y()
    fit = fit_blend(oofs, y, cfg.blend, cfg.data.metric, storage=None, study_name=f"bench-{data}")
    rows = {m: _scores(all_metrics, y, s) for m, s in fit.singles.items()}
    rows["blend"] = _scores(all_metrics, y, fit.honest)
    weights = {m: round(float(w), 4) for m, w in zip(models, fit.blender.weights_)}
    return {"scores": rows, "weights": weights, "in_sample": float(fit.in_sample),
            "method": cfg.blend.method}


def _scores(all_metrics: Any, y: np.ndarray, cv: Any) -> dict[str, float]:
    """Honest samples/micro/macro F1 of one nested-CV result, plus the per-fold spread."""
    m = all_metrics(y, cv.pred)
    return {"samples": m["samples"], "micro": m["micro"], "macro": m["macro"], "samples_std": cv.std}


# ------------------------------------------------------------------------------- dataset


def load_dataset(data: str, args: argparse.Namespace, timer: Timer) -> tuple[Config, Competition, np.ndarray, bool]:
    """The dataset's config (root under ``args.shared``), competition and folds (reused or
    written), each stage timed; True when the folds file already existed."""
    with timer("load"):
        cfg = dataset_config(data, args.shared, args.overrides)
        comp = load_competition(cfg.data)
    with timer("folds"):
        fold, reused = ensure_folds(comp, cfg)
    return cfg, comp, fold, reused


def bench_dataset(data: str, args: argparse.Namespace) -> dict[str, Any]:
    """Folds -> embeddings -> members -> blend for one dataset; scores, times, notes."""
    timer = Timer()
    cfg, comp, fold, reused = load_dataset(data, args, timer)
    cfgs, skipped = member_configs(data, _member_names(data, args), comp, args.overrides)
    if not cfgs:
        raise UserError(f"{data}: no member can run on this data (skipped: {skipped})")
    cached = warm_embeddings(comp, cfgs, timer)
    train_members(cfgs, comp, not args.reuse, timer)
    with timer("blend"):
        result = blend_members(data, [c.model.name for c in cfgs], comp, fold, cfg)
    result.update(_dataset_info(comp, fold, reused, skipped, cached, timer))
    result["checks"] = checks(data, result["scores"])
    return result


def _member_names(data: str, args: argparse.Namespace) -> list[str]:
    """``--models`` if given, else this dataset's default members."""
    return args.models.split(",") if args.models else MEMBERS_BY_DATA.get(data, MEMBERS_BY_DATA["comp5329"])


def _dataset_info(comp: Competition, fold: np.ndarray, reused: bool, skipped: list[str],
                  cached: dict[str, bool], timer: Timer) -> dict[str, Any]:
    """Size of the data and how the run went (timings, cache hits, skipped members)."""
    return {"rows": len(comp.train), "labels": len(comp.classes), "folds": int(fold.max()) + 1,
            "test_rows": 0 if comp.test is None else len(comp.test),
            "modalities": [m for m, ok in (("text", comp.has_captions), ("image", comp.has_images)) if ok],
            "folds_reused": reused, "skipped": skipped, "embeddings_cached": cached,
            "stages_s": timer.stages, "total_s": round(sum(timer.stages.values()), 2)}


def checks(data: str, scores: dict[str, dict[str, float]]) -> dict[str, bool]:
    """The issue's targets, evaluated on honest samples-F1."""
    s = {m: v["samples"] for m, v in scores.items()}
    members = {m: v for m, v in s.items() if m != "blend"}
    out = {"blend_beats_best_member": s["blend"] > max(members.values())}
    if data == "comp5329":
        out["blend_ge_0.87"] = s["blend"] >= 0.87
    fused = [m for m in members if m.startswith("fused")]
    single = [m for m in members if m not in fused]
    if fused and single:
        out["fused_beats_single_modality"] = max(s[m] for m in fused) > max(s[m] for m in single)
    return out


# -------------------------------------------------------------------------------- report


def render(doc: dict[str, Any]) -> str:
    """Markdown: one table per dataset, stage times, and the run history."""
    lines = ["# Real-data benchmark (CPU members)", "",
             f"machine: {doc['machine']}; run {doc['time']}; total {doc['total_s']:.0f} s "
             f"({'cold' if doc['cold'] else 'warm'} embedding cache). Scores are honest "
             "nested-CV: each fold is scored by weights and thresholds fitted without it.", ""]
    for data, r in doc["datasets"].items():
        lines += _dataset_md(data, r)
    lines += ["## Run history", "", "| time | cache | total s | per dataset s |", "|---|---|---|---|"]
    for h in doc["history"]:
        per = ", ".join(f"{d} {t:.0f}" for d, t in h["datasets_s"].items())
        lines.append(f"| {h['time']} | {'cold' if h['cold'] else 'warm'} | {h['total_s']:.0f} | {per} |")
    return "\n".join(lines) + "\n"


def _dataset_md(data: str, r: dict[str, Any]) -> list[str]:
    """One dataset's section."""
    if "error" in r:
        return [f"## {data}", "", f"not run: {r['error']}", ""]
    head = [f"## {data}", "",
            f"{r['rows']} rows, {r['labels']} labels, {r['folds']} folds, inputs: "
            f"{' + '.join(r['modalities'])}; blend: {r['method']}. "
            + (f"Skipped: {', '.join(r['skipped'])}." if r["skipped"] else ""), "",
            "| model | samples-F1 | ± fold std | micro-F1 | macro-F1 | weight | train s |",
            "|---|---|---|---|---|---|---|"]
    rows = [f"| {'**blend**' if m == 'blend' else m} | {v['samples']:.4f} | {v['samples_std']:.4f} | "
            f"{v['micro']:.4f} | {v['macro']:.4f} | {r['weights'].get(m, '')} | "
            f"{r['stages_s'].get(f'train {m}', r['stages_s'].get('blend', 0)):.1f} |"
            for m, v in r["scores"].items()]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items())
    checks_ = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in r["checks"].items())
    return head + rows + ["", f"Stage wall times (s): {stages}; total {r['total_s']:.1f}.",
                          f"Checks: {checks_}.", ""]


def _history(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Previous runs from real.json plus this one (the last :data:`HISTORY`)."""
    _, js = report_paths()
    old = json.loads(js.read_text()).get("history", []) if js.exists() else []
    now = {"time": doc["time"], "cold": doc["cold"], "total_s": doc["total_s"],
           "datasets_s": {d: r.get("total_s", 0.0) for d, r in doc["datasets"].items()}}
    return (old + [now])[-HISTORY:]


# ----------------------------------------------------------------------------------- cli


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--datasets``, ``--models``, ``--shared``, ``--cold``, ``--reuse``."""
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated data config names")
    p.add_argument("--models", default=None, help="comma-separated member configs (default: per dataset)")
    p.add_argument("--shared", default="../shared/data", help="folder holding <dataset>/ folders")
    p.add_argument("--cold", action="store_true", help="delete cached embeddings first (time a cold run)")
    p.add_argument("--reuse", action="store_true", help="keep finished member folds instead of retraining")


def run(args: argparse.Namespace) -> int:
    """Benchmark every dataset, write reports/bench/real.{md,json}, print the tables."""
    from mmfold.cpu import encoders as embeddings

    start = time.perf_counter()
    datasets = {}
    for data in args.datasets.split(","):
        if not (Path(args.shared) / data).exists():
            datasets[data] = {"error": f"{Path(args.shared) / data} not found"}
            continue
        if args.cold:
            for f in paths.cache_dir(data).glob("emb_*.npy"):
                f.unlink()
        print(f"== {data}", flush=True)
        datasets[data] = bench_dataset(data, args)
    doc = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{platform.machine()}, {available_cores()} cores",
           "total_s": round(time.perf_counter() - start, 1), "cold": bool(embeddings.COMPUTE_COUNT),
           "embeddings_computed": dict(embeddings.COMPUTE_COUNT), "datasets": datasets}
    doc["history"] = _history(doc)
    md, js = report_paths()
    fileio.write_json(js, doc)
    fileio.write_text(md, render(doc))
    print(render(doc))
    return 0
