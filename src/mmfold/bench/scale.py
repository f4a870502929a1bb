"""Scale benchmark: folds, collect, thresholds and blend on a large synthetic competition.

Each stage runs as its own ``python -m mmfold`` process (as a user runs it), and its wall time
and peak RSS are read from ``os.wait4``'s resource usage, so one stage's memory never hides
another's. The default size is 200,000 rows x 200 labels; the target is < 8 GiB per stage.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mmfold import fileio, paths

GIB = 1024**3


def _labels(n: int, n_labels: int, rng: np.random.Generator) -> np.ndarray:
    """Imbalanced 0/1 matrix with at least one label per row."""
    y = rng.random((n, n_labels)) < rng.uniform(0.002, 0.1, n_labels)
    y[np.arange(n), rng.integers(0, n_labels, n)] = True
    return y


def write_project(root: Path, n: int, n_labels: int, n_test: int) -> None:
    """A text-only competition + config + a synthetic model yaml under ``root``."""
    rng = np.random.default_rng(0)
    y = _labels(n, n_labels, rng)
    labels = [" ".join(str(j) for j in np.flatnonzero(r)) for r in y]
    data = root / "input" / "scale"
    data.mkdir(parents=True)
    pd.DataFrame({"ImageID": [f"{i}.jpg" for i in range(n)], "Labels": labels, "Caption": "x"}).to_csv(data / "train.csv", index=False)
    pd.DataFrame({"ImageID": [f"t{i}.jpg" for i in range(n_test)], "Caption": "x"}).to_csv(data / "test.csv", index=False)
    cfg_dir = root / "configs"
    (cfg_dir / "data").mkdir(parents=True)
    (cfg_dir / "models").mkdir()
    data_cfg = {"data": {"root": "input/scale", "image_dir": None, "models": ["synth_a", "synth_b"]}, "blend": {"method": "mean"}}
    (cfg_dir / "data" / "scale.yaml").write_text(yaml.safe_dump(data_cfg))
    for m in ("synth_a", "synth_b"):
        (cfg_dir / "models" / f"{m}.yaml").write_text(yaml.safe_dump({"model": {"kind": "synthetic"}}))


def write_fold_outputs(root: Path, model: str, seed: int) -> None:
    """Per-fold oof/test parquet + done.json, as a trained model would leave them."""
    from mmfold.config import load_config, save_config
    from mmfold.data.competition import load_competition, load_folds
    from mmfold.artifacts.manifest import fingerprints
    from mmfold.artifacts import predictions

    os.environ["MMFOLD_HOME"] = str(root)
    cfg = load_config("scale", model)
    comp = load_competition(cfg.data)
    fold_of_row, y = load_folds(comp), comp.y()
    rng = np.random.default_rng(seed)
    hashes = fingerprints(cfg, comp)
    for k in range(int(fold_of_row.max()) + 1):
        rows = np.flatnonzero(fold_of_row == k)
        probs = np.clip(0.6 * y[rows] + rng.random((len(rows), y.shape[1]), dtype=np.float32) * 0.5, 0, 1)
        rd = paths.run_dir("scale", model, k)
        predictions.write_fold_oof(rd, comp.train["id"].iloc[rows], probs, comp.classes, k, f"{model} fold {k}")
        test = rng.random((len(comp.test), y.shape[1]), dtype=np.float32)
        predictions.write_fold_test(rd, comp.test["id"], test, comp.classes, f"{model} fold {k} test")
        save_config(cfg, rd / "config.yaml")  # collect checks what each fold was trained with
        fileio.write_json(rd / "done.json", {"fold": k, "hashes": hashes, "train_time_s": 0.0})


def measure(cmd: list[str], root: Path) -> dict[str, float]:
    """Run one stage in ``root`` as its own process; return its wall seconds and peak RSS
    (GiB) from ``wait4``. stderr goes to a file, not a pipe: a stage printing progress bars
    would fill a pipe nobody reads before ``wait4`` returns, and hang."""
    env = {**os.environ, "MMFOLD_HOME": str(root)}
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed: {err.read().decode(errors='replace')[-2000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 3)}


def fit_thresholds_stage() -> None:
    """Stage body, run in its own process: fit per-label thresholds on one collected OOF."""
    from mmfold.artifacts.predictions import read_oof
    from mmfold.config import load_config
    from mmfold.data.competition import load_competition, load_folds
    from mmfold.ensemble.thresholds import ThresholdOptimizer

    comp = load_competition(load_config("scale").data)
    probs = read_oof("scale", "synth_a", comp.ids("train"), comp.classes, load_folds(comp)).astype(np.float32)
    ThresholdOptimizer().fit(probs, comp.y())


def benchmark(quick: bool = False) -> dict[str, Any]:
    """Time and peak RSS of each stage at 200,000 x 200 (quick: 20,000 x 50)."""
    n, n_labels, n_test = (20_000, 50, 2_000) if quick else (200_000, 200, 20_000)
    mm = [sys.executable, "-m", "mmfold"]
    with tempfile.TemporaryDirectory(prefix="mmfold-scale-") as tmp:
        root = Path(tmp)
        old_home = os.environ.get("MMFOLD_HOME")
        write_project(root, n, n_labels, n_test)
        stages = {"folds": measure(mm + ["folds", "--data", "scale"], root)}
        for seed, m in enumerate(("synth_a", "synth_b")):
            write_fold_outputs(root, m, seed)
        stages["collect"] = measure(mm + ["collect", "--data", "scale"], root)
        stages["thresholds"] = measure([sys.executable, "-c", "from mmfold.bench.scale import fit_thresholds_stage as f; f()"], root)
        stages["blend"] = measure(mm + ["blend", "--data", "scale", "--name", "scale", "blend.method=mean"], root)
        _restore_home(old_home)
    peak = max(s["peak_rss_gib"] for s in stages.values())
    return {"rows": n, "labels": n_labels, "test_rows": n_test, "stages": stages,
            "max_peak_rss_gib": peak, "target_gib": 8, "ok": peak < 8}


def _restore_home(old: str | None) -> None:
    """Put ``MMFOLD_HOME`` back as it was before the benchmark."""
    if old is None:
        os.environ.pop("MMFOLD_HOME", None)
    else:
        os.environ["MMFOLD_HOME"] = old
