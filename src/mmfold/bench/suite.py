"""``mmfold bench``: speed and quality benchmarks, each against a baseline run in the same process.

Machines are noisy, so every section measures its own baseline next to the thing it tests and
reports a ratio. Sections are registered by name -> ``"module:function"``; each function takes
``quick: bool`` and returns a JSON-able dict. Results: ``reports/bench/bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from typing import Any

import numpy as np

from mmfold import fileio, paths

BENCH_SECTIONS: dict[str, str] = {
    "folds": "mmfold.bench.suite:bench_folds",
    "thresholds": "mmfold.bench.thresholds:benchmark",
    "decoders": "mmfold.bench.decoders:benchmark",
    "cache": "mmfold.bench.cache:benchmark",
    "scale": "mmfold.bench.scale:benchmark",
    "deep_speed": "mmfold.bench.deep_speed:benchmark",
    "hub_load": "mmfold.bench.hub_load:benchmark",
}


def bench_folds(quick: bool = False) -> dict[str, Any]:
    """Time fold assignment on a synthetic 100,000 x 100 label table (target: < 60 s)."""
    from mmfold.config import FoldsConfig
    from mmfold.data.folds import assign_folds, fold_summary

    n, L = (10_000, 20) if quick else (100_000, 100)
    rng = np.random.default_rng(0)
    y = (rng.random((n, L)) < rng.uniform(0.001, 0.2, L)).astype(np.uint8)
    start = time.perf_counter()
    fold = assign_folds(y, FoldsConfig(n_splits=5, seed=42))
    seconds = time.perf_counter() - start
    _, worst, _ = fold_summary(y, fold, [str(i) for i in range(L)])
    return {"rows": n, "labels": L, "seconds": round(seconds, 2), "target_s": 60,
            "worst_rate_deviation": round(worst, 5), "ok": seconds < 60,
            "headline": f"{seconds:.1f} s for {n:,} rows x {L} labels, 5 folds", "target": "< 60 s"}


def _call(spec: str, quick: bool) -> dict[str, Any]:
    """Import ``module:function`` and run it, timing the whole section."""
    module, func = spec.split(":")
    start = time.perf_counter()
    result = getattr(importlib.import_module(module), func)(quick=quick)
    return {**result, "section_wall_s": round(time.perf_counter() - start, 2)}


def summary(results: dict[str, dict]) -> list[str]:
    """One row per section: its headline result, the target it is held to, and whether it met it.

    Speed targets are checked here, where the ratio is measured, and not in tests (a busy
    machine makes timing assertions fail at random). Sections opt in by returning
    ``headline`` / ``target`` / ``ok``; the rest show a dash.
    """
    def cell(res: dict, key: str) -> str:
        value = res.get(key)
        return "–" if value is None else ("yes" if value else "NO") if isinstance(value, bool) else str(value)

    rows = [f"| {name} | {cell(res, 'headline')} | {cell(res, 'target')} | {cell(res, 'ok')} |"
            for name, res in results.items()]
    return ["| section | result | target | ok |", "|---|---|---|---|", *rows, ""]


def to_markdown(results: dict[str, dict]) -> str:
    """The summary table, then one table per section: key | value."""
    lines = ["# mmfold benchmarks", "", f"machine: {platform.machine()}, {platform.processor() or 'cpu'}", ""]
    lines += summary(results)
    for name, res in results.items():
        lines += [f"## {name}", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |" for k, v in res.items()]
        lines.append("")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmfold bench`` options."""
    p.add_argument("--sections", nargs="*", default=list(BENCH_SECTIONS), choices=list(BENCH_SECTIONS))
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--out", default="reports/bench/bench", help="output path stem")


def run(args: argparse.Namespace) -> int:
    """Run the chosen sections and write JSON + markdown."""
    results = {}
    for name in args.sections:
        print(f"bench {name} ...", flush=True)
        results[name] = _call(BENCH_SECTIONS[name], args.quick)
        print(json.dumps(results[name], indent=1))
    stem = paths.resolve(args.out)
    fileio.write_json(stem.with_suffix(".json"), results)
    fileio.write_text(stem.with_suffix(".md"), to_markdown(results))
    print(f"wrote {stem}.json and {stem}.md")
    return 0
