"""``mmfold bench-predict``: what a new test set costs without retraining, and the offline bundle.

On a dataset whose members are trained and collected (``make train DATA=comp5329``), in a
scratch project in a temporary folder that links the trained folds' files read-only (so
nothing of the user's project is written: no submission, log row, collected or fold file):

1. blend the members and log the blend (the submission a user would make);
2. write a *new* test set: the data's test rows in reverse order (another file, another key);
3. ``mmfold predict`` it, model by model, every fold from its saved state, timed: the
   baseline is what training those folds cost (``done.json``, the same machine), and the
   check is that every row's probabilities equal the training run's for that id;
4. ``blend --from`` the logged blend on it (no re-tuning), then ``export`` the blend and run
   the bundle's ``predict.py`` on the new test set in a fresh process: its size, its time and
   whether its submission is byte-identical to ``blend --from``'s.

Written to ``reports/bench/predict.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mmfold import fileio, paths
from mmfold.bench.deep import fold_cost, machine
from mmfold.bench.scale import measure


@contextlib.contextmanager
def project(root: Path) -> Iterator[Path]:
    """Run mmfold with ``root`` as the project (``$MMFOLD_HOME`` and the working directory)."""
    old_home, old_cwd = os.environ.get("MMFOLD_HOME"), Path.cwd()
    os.environ["MMFOLD_HOME"] = str(root)
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(old_cwd)
        if old_home is None:
            os.environ.pop("MMFOLD_HOME", None)
        else:
            os.environ["MMFOLD_HOME"] = old_home


def scratch_project(data: str, models: list[str], root: Path) -> Path:
    """A project at ``root`` that shares nothing writable with the user's: configs (the data
    config's paths made absolute), folds and collected files copied; each fold's files and
    ``weights/`` linked read-only (new files land in ``root``); an empty cache, so the new
    test set is embedded and tokenized from scratch as a truly new one would be."""
    src = paths.root()
    shutil.copytree(src / "configs", root / "configs")
    data_yaml = root / "configs" / "data" / f"{data}.yaml"
    doc = yaml.safe_load(data_yaml.read_text())
    doc["data"]["root"] = str(paths.resolve(doc["data"]["root"]).resolve())
    fileio.write_text(data_yaml, yaml.safe_dump(doc, sort_keys=False))
    (root / "folds").mkdir()
    for f in (src / "folds").glob(f"{data}.*"):
        shutil.copy2(f, root / "folds" / f.name)
    (root / "oof" / data).mkdir(parents=True)
    for m in models:
        for f in paths.oof_dir(data).glob(f"{m}.*"):
            shutil.copy2(f, root / "oof" / data / f.name)
        for fold in sorted(paths.run_dir(data, m, 0).parent.glob("fold*")):
            if fold.is_dir() and fold.name[len("fold"):].isdigit():
                (root / "runs" / data / m / fold.name).mkdir(parents=True)
                for f in fold.iterdir():
                    if f.is_file() and not f.name.startswith(("test-", ".")):
                        (root / "runs" / data / m / fold.name / f.name).symlink_to(f.resolve())
    if (src / "weights").exists():
        (root / "weights").symlink_to((src / "weights").resolve())
    return root


def reversed_test(comp_test_csv: Path, out: Path) -> Path:
    """The test CSV with its rows in reverse order: same rows, a different file and key."""
    text = comp_test_csv.read_text(encoding="utf-8")
    header, *rows = text.splitlines(keepends=True)
    rows[-1] = rows[-1] if rows[-1].endswith("\n") else rows[-1] + "\n"
    fileio.write_text(out, header + "".join(reversed(rows)))
    return out


def cli(*argv: str) -> float:
    """Seconds one ``mmfold`` command took in its own process in the current project, as a
    user runs it (interpreter start and imports included); a failure stops the benchmark."""
    return measure([sys.executable, "-m", "mmfold", *argv], paths.root())["seconds"]


def bench_models(data: str, models: list[str], test: Path, ids: list[str], classes: list[str],
                 n_folds: int) -> list[dict[str, Any]]:
    """Predict the new test set model by model (forced: a previous run's files don't count),
    and compare every row with the training run's probabilities for that id."""
    from mmfold.artifacts.predictions import read_test

    rows = []
    for m in models:
        before = read_test(data, m, ids, classes)  # the collected test set training wrote
        seconds = cli("predict", "--data", data, "--model", m, "--test", str(test), "--force")
        after = read_test(data, m, ids, classes)  # now the new test set's, same ids reversed
        cost = fold_cost(data, m, list(range(n_folds)))
        rows.append({"model": m, "predict_s": round(seconds, 1), "retrain_s": cost["train_s"],
                     "retrain_over_predict": round(cost["train_s"] / max(seconds, 1e-9), 1),
                     "max_abs_diff_vs_training": float(np.abs(after - before).max())})
    return rows


def bench_bundle(data: str, test: Path, images: Path | None, root: Path) -> dict[str, Any]:
    """Export the logged blend, run its ``predict.py`` in a fresh process on ``test``."""
    export_s = cli("export", "--data", data, "--name", "bench", "--out", str(root / "bundle"))
    size = sum(f.stat().st_size for f in (root / "bundle").rglob("*") if f.is_file())
    where = ["--images", str(images)] if images else []
    run_s = measure([sys.executable, str(root / "bundle" / "predict.py"), "--test", str(test), *where, "--out",
                     str(root / "bundle_submission.csv"), "--work", str(root / "bundle_work")], root)["seconds"]
    expected = paths.submissions_dir(data) / "bench_new.csv"
    return {"export_s": round(export_s, 1), "bundle_mb": round(size / 2**20, 1), "bundle_run_s": round(run_s, 1),
            "bundle_submission_identical": (root / "bundle_submission.csv").read_bytes() == expected.read_bytes()}


def benchmark(data: str, models: list[str] | None, trials: int) -> dict[str, Any]:
    """Every stage of the module docstring on ``data``; returns the report's document."""
    from mmfold.config import load_config
    from mmfold.data.competition import load_competition, load_folds

    base = load_config(data)
    models = models or list(base.data.models)
    missing = [m for m in models if not paths.oof_file(data, m).exists()]
    if missing:
        raise SystemExit(f"bench-predict: {missing} not collected; train them first (make train DATA={data})")
    comp = load_competition(base.data)
    n_folds = int(load_folds(comp).max()) + 1
    test_csv = paths.resolve(Path(comp.cfg.root) / comp.cfg.test_csv).resolve()
    images = paths.resolve(Path(comp.cfg.root) / comp.cfg.image_dir).resolve() if comp.cfg.image_dir else None
    with tempfile.TemporaryDirectory(prefix="mmfold-bench-predict-") as tmp, project(
            scratch_project(data, models, Path(tmp))) as root:
        blend_s = cli("blend", "--data", data, "--models", *models, "--name", "bench", f"blend.n_trials={trials}")
        test = reversed_test(test_csv, root / "new_test.csv")
        rows = bench_models(data, models, test, comp.ids("test"), comp.classes, n_folds)
        from_s = cli("blend", "--data", data, "--from", "bench", "--test", str(test), "--name", "bench_new")
        bundle = bench_bundle(data, test, images, root)
    predict_s, retrain_s = sum(r["predict_s"] for r in rows), sum(r["retrain_s"] for r in rows)
    return {"data": data, "machine": machine(), "train_rows": len(comp.train), "test_rows": len(comp.test),
            "folds": n_folds, "models": rows, "predict_all_s": round(predict_s, 1), "retrain_all_s": round(retrain_s, 1),
            "retrain_over_predict": round(retrain_s / max(predict_s, 1e-9), 1), "blend_s": round(blend_s, 1),
            "blend_from_s": round(from_s, 1), **bundle,
            "every_row_as_trained": all(r["max_abs_diff_vs_training"] <= 1e-6 for r in rows)}


def render(doc: dict[str, Any]) -> str:
    """The markdown report."""
    lines = [f"# bench-predict: a new test set without retraining ({doc['data']})", "",
             f"Machine: {doc['machine']}. {doc['train_rows']} train rows, {doc['folds']} folds; the new test "
             f"set is the {doc['test_rows']} test rows in reverse order (a new file, a new key).", "",
             "| model | predict (s) | retrain, recorded (s) | retrain / predict | max abs diff vs training |",
             "|---|---:|---:|---:|---:|"]
    for r in doc["models"]:
        lines.append(f"| {r['model']} | {r['predict_s']} | {r['retrain_s']} | {r['retrain_over_predict']}x | "
                     f"{r['max_abs_diff_vs_training']:.2g} |")
    lines += [f"| **all** | {doc['predict_all_s']} | {doc['retrain_all_s']} | {doc['retrain_over_predict']}x | |", "",
              f"- `blend --from` (re-submit the logged blend, no re-tuning): {doc['blend_from_s']} s "
              f"(the original blend: {doc['blend_s']} s)",
              f"- `export`: {doc['export_s']} s, bundle {doc['bundle_mb']} MB; the bundle's `predict.py` on the new "
              f"test set in a fresh process: {doc['bundle_run_s']} s; submission byte-identical to "
              f"`blend --from`'s: {doc['bundle_submission_identical']}",
              f"- every test row's probabilities equal the training run's for that id (<= 1e-6): "
              f"{doc['every_row_as_trained']}", ""]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmfold bench-predict`` options (``--data``: the CLI's own; ``make bench-predict``
    passes comp5329 unless DATA is given)."""
    p.add_argument("--models", nargs="*", help="collected models to use (default: data.models)")
    p.add_argument("--trials", type=int, default=30, help="Optuna trials of the blend that is exported")


def run(args: argparse.Namespace) -> int:
    """Benchmark, write reports/bench/predict.{json,md}, print the markdown."""
    doc = benchmark(args.data, args.models, args.trials)
    folder = paths.root() / "reports" / "bench"
    fileio.write_json(folder / "predict.json", doc)
    text = render(doc)
    fileio.write_text(folder / "predict.md", text)
    print(text)
    return 0
