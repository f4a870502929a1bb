"""Fault injection (``pytest -m faults``): kills, bad input, concurrency. Nothing may be lost.

The kill test SIGKILLs ``mmfold train`` at seeded random moments (while importing, mid-epoch,
mid-checkpoint, mid-prediction, mid-collect), checks after every kill that each artifact on
disk loads, resumes, and requires the final OOF/test probabilities to equal an uninterrupted
run's exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from mmfold import fileio, paths
from mmfold.cli import main
from mmfold.config import load_config
from mmfold.data.competition import load_competition, load_folds
from mmfold.train.runner import fold_lock, run_fold
from tests.conftest import write_competition

pytestmark = pytest.mark.faults

TINY_FUSION = {
    "model": {"kind": "fusion", "params": {
        "backbone": "test_resnet", "pretrained": False, "text_encoder": "lstm", "hidden": 32,
        "lstm": {"embed_dim": 16, "hidden": 16, "layers": 1, "vocab_size": 200, "min_freq": 1}}},
    "train": {"epochs": 3, "batch_size": 8, "image_size": 32, "max_len": 12, "ema": 0.9, "progress": False},
}


def _mmfold(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mmfold", *args]


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "MMFOLD_HOME": str(root), "OMP_NUM_THREADS": "1"}


def _setup(root: Path) -> None:
    """Tiny competition, folds and the tiny fusion model under ``root``."""
    (root / "configs" / "models").mkdir(parents=True, exist_ok=True)
    write_competition(root)
    (root / "configs" / "models" / "tf.yaml").write_text(yaml.safe_dump(TINY_FUSION))
    subprocess.run(_mmfold(root, "folds", "--data", "tiny"), env=_env(root), cwd=root, check=True, capture_output=True)


def check_artifacts(root: Path) -> int:
    """Load every artifact under runs/ and oof/; a half-written file fails here."""
    n = 0
    for p in (root / "runs").rglob("*"):
        if p.name.endswith(".tmp") or not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix == ".pt":
            torch.load(p, weights_only=True)
        elif p.suffix == ".parquet":
            pd.read_parquet(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            [json.loads(line) for line in p.read_text().splitlines()[:-1]]  # last line may be cut
        n += 1
    for p in (root / "oof").rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            pd.read_parquet(p) if p.suffix == ".parquet" else json.loads(p.read_text())
    return n


def _temps(root: Path) -> list[Path]:
    """Temp files of atomic writes under runs/ and oof/ (a killed writer leaves them)."""
    return [p for d in ("runs", "oof") for p in (root / d).rglob(f".*{fileio.TEMP_SUFFIX}")]


def _timed_run(root: Path, cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` to completion; (seconds until the first run file appeared, total seconds).

    The kill schedule is scaled by these, so it interrupts the work itself on a fast CI box
    as on a slow laptop instead of relying on absolute timeouts.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(_mmfold(root, *cmd), env=_env(root), cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    while proc.poll() is None:
        if first is None and any(p.is_file() for p in (root / "runs").rglob("*") if not p.name.startswith(".")):
            first = time.perf_counter() - start
        time.sleep(0.01)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    total = time.perf_counter() - start
    return (first if first is not None else total / 2), total


def test_sigkill_anywhere_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for root in (clean, killed):
        _setup(root)
    cmd = ["train", "--data", "tiny", "--model", "tf"]
    startup, total = _timed_run(clean, cmd)
    work = max(total - startup, 0.5)

    rng = np.random.default_rng(0)
    kills, left_temps = 0, set()
    while True:
        proc = subprocess.Popen(_mmfold(killed, *cmd), env=_env(killed), cwd=killed,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Each timeout ends before the remaining work can finish (at most 0.3 of it per try),
        # so the first kills always land, anywhere from import to mid-prediction.
        timeout = 0.5 * startup + float(rng.uniform(0.05, 0.3)) * work if kills < 6 else 600
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            check_artifacts(killed)
            left_temps |= {p.name for p in _temps(killed)}
            continue
        assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        break
    assert kills >= 3, f"the schedule should interrupt the run several times (startup {startup:.1f}s, total {total:.1f}s)"
    assert not _temps(killed), f"temp files of killed writers were not swept: {_temps(killed)}"
    for name in ("tf.parquet", "tf.test.parquet"):
        a = pd.read_parquet(clean / "oof" / "tiny" / name)
        b = pd.read_parquet(killed / "oof" / "tiny" / name)
        pd.testing.assert_frame_equal(a, b)
    print(f"{kills} kills ({len(left_temps)} temp files left by them, all swept), "
          "resumed to identical OOF/test probabilities")


def test_blend_killed_during_study_resumes_and_keeps_log(project: Path) -> None:
    write_competition(project, n_train=60, n_test=10)
    env = _env(project)
    assert main(["folds", "--data", "tiny"]) == 0
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr"]) == 0
    assert main(["blend", "--data", "tiny", "--models", "tfidf_lr", "--name", "first", "blend.n_trials=5"]) == 0
    log = paths.submissions_dir("tiny") / "log.csv"
    before = log.read_text()
    proc = subprocess.Popen(_mmfold(project, "blend", "--data", "tiny", "--models", "tfidf_lr", "--name", "second",
                                    "blend.n_trials=400"), env=env, cwd=project,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert log.read_text().startswith(before)  # earlier rows intact whatever the kill hit
    pd.read_csv(log)
    r = subprocess.run(_mmfold(project, "blend", "--data", "tiny", "--models", "tfidf_lr", "--name", "third",
                               "blend.n_trials=20"), env=env, cwd=project, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    df = pd.read_csv(log)
    assert df["name"].tolist()[0] == "first" and df["name"].tolist()[-1] == "third"
    assert (paths.submissions_dir("tiny") / "first.csv").exists()


def test_second_trainer_on_same_fold_refuses(project: Path) -> None:
    write_competition(project)
    assert main(["folds", "--data", "tiny"]) == 0
    cfg = load_config("tiny", "tfidf_lr")
    comp = load_competition(cfg.data)
    with fileio.file_lock(fold_lock("tiny", "tfidf_lr", 0)):
        with pytest.raises(fileio.LockedError, match="another run on this fold"):
            run_fold(cfg, comp, load_folds(comp), 0)
    assert not (paths.run_dir("tiny", "tfidf_lr", 0) / "done.json").exists()


def test_resume_sweeps_temp_files_of_a_killed_writer(project: Path, capsys) -> None:
    write_competition(project)
    assert main(["folds", "--data", "tiny"]) == 0
    rd, oof_dir = paths.run_dir("tiny", "tfidf_lr", 0), paths.oof_dir("tiny")
    # what SIGKILL between mkstemp and rename leaves: a hidden temp beside the destination
    orphans = [rd / ".last.pt.k1ll3d.tmp", oof_dir / ".tfidf_lr.parquet.k1ll3d.tmp"]
    for p in orphans:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")
    other = oof_dir / ".other_model.parquet.x.tmp"  # another model's collect may be writing it
    other.write_bytes(b"not ours")
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr"]) == 0
    assert not any(p.exists() for p in orphans)
    assert other.exists()
    assert "removed 1 temp file(s) left by an interrupted run" in capsys.readouterr().out


def test_different_folds_side_by_side_and_collect_refuses_partial(project: Path, capsys) -> None:
    write_competition(project)
    assert main(["folds", "--data", "tiny"]) == 0
    env = _env(project)
    procs = [subprocess.Popen(_mmfold(project, "train", "--data", "tiny", "--model", "tfidf_lr", "--fold", str(k)),
                              env=env, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert any("collect waits" in o for o, _ in outs)
    assert main(["collect", "--data", "tiny", "--model", "tfidf_lr"]) == 2
    assert "folds [2] are not finished" in capsys.readouterr().err
    assert not paths.oof_file("tiny", "tfidf_lr").exists()
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "--fold", "2"]) == 0
    oof = pd.read_parquet(paths.oof_file("tiny", "tfidf_lr"))
    assert oof["id"].is_unique and len(oof) == 40


def test_stale_folds_are_detected_at_collect(project: Path, capsys) -> None:
    write_competition(project)
    assert main(["folds", "--data", "tiny"]) == 0
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr"]) == 0
    assert main(["folds", "--data", "tiny", "--force", "folds.seed=5"]) == 0
    assert main(["collect", "--data", "tiny", "--model", "tfidf_lr"]) == 2
    assert "stale: the folds file was rewritten" in capsys.readouterr().err


def test_changed_model_config_is_detected(project: Path, capsys) -> None:
    write_competition(project)
    assert main(["folds", "--data", "tiny"]) == 0
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr"]) == 0
    yml = project / "configs" / "models" / "tfidf_lr.yaml"
    yml.write_text(yml.read_text().replace("min_df: 2", "min_df: 1"))
    assert main(["blend", "--data", "tiny", "--models", "tfidf_lr", "blend.method=mean"]) == 2
    err = capsys.readouterr().err
    assert "its config changed" in err and "model.params.min_df: trained 2 -> now 1" in err


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "I;16", "P", "huge"])
def test_odd_image_modes_are_converted_not_failed(project: Path, mode: str) -> None:
    from mmfold.train.caches import image_cache

    data = write_competition(project, n_train=6, n_test=0)
    img = data / "images" / "0.jpg"
    if mode == "huge":
        Image.new("RGB", (5000, 4000), (10, 200, 30)).save(img)
    elif mode == "I;16":
        Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 200)).save(img.with_suffix(".png"))
        img.unlink()
        img.with_suffix(".png").rename(img)  # a PNG behind a .jpg name: PIL sniffs content
    else:
        Image.new(mode if mode != "P" else "P", (20, 12)).save(img, format="PNG" if mode in ("RGBA", "P") else "JPEG" if mode != "CMYK" else "JPEG")
    comp = load_competition(load_config("tiny").data)
    comp.verify_images()
    arr = image_cache(comp, "train", 16, progress=False)
    assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8
    if mode == "huge":
        assert tuple(arr[0, 8, 8]) == pytest.approx((10, 200, 30), abs=3)


def test_corrupt_image_names_file_and_writes_no_cache(project: Path) -> None:
    from mmfold.train.caches import image_cache
    from mmfold.errors import DataError

    data = write_competition(project, n_train=6, n_test=0)
    (data / "images" / "2.jpg").write_bytes(b"\xff\xd8\xff garbage")
    comp = load_competition(load_config("tiny").data)
    with pytest.raises(DataError, match="2.jpg"):
        image_cache(comp, "train", 16, progress=False)
    assert not [p for p in paths.cache_dir("tiny").glob("images_*") if not p.name.startswith(".")]


def test_empty_nan_and_huge_captions_train(project: Path) -> None:
    data = write_competition(project, n_train=30, n_test=5)
    lines = (data / "train.csv").read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ","          # empty caption
    lines[2] = lines[2].rsplit(",", 1)[0] + ",NaN"       # literal NaN stays text
    lines[3] = lines[3].rsplit(",", 1)[0] + "," + "word " * 20000  # 100k characters
    (data / "train.csv").write_text("\n".join(lines) + "\n")
    comp = load_competition(load_config("tiny").data)
    assert comp.train["caption"][0] == "" and comp.train["caption"][1] == "NaN"
    assert len(comp.train["caption"][2]) > 99_000
    assert main(["folds", "--data", "tiny"]) == 0
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr"]) == 0
    (project / "configs" / "models" / "tf.yaml").write_text(yaml.safe_dump(TINY_FUSION))
    assert main(["train", "--data", "tiny", "--model", "tf", "--fold", "0", "train.epochs=1"]) == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1.5, -0.1])
def test_oof_with_bad_values_is_refused(project: Path, capsys, bad: float) -> None:
    write_competition(project)
    assert main(["folds", "--data", "tiny"]) == 0
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr"]) == 0
    f = paths.oof_file("tiny", "tfidf_lr")
    df = pd.read_parquet(f)
    df.loc[3, "1"] = bad
    df.to_parquet(f, index=False)
    assert main(["blend", "--data", "tiny", "--models", "tfidf_lr", "blend.method=mean"]) == 2
    assert "tfidf_lr" in capsys.readouterr().err


def test_existing_submission_name_is_not_overwritten(project: Path, capsys) -> None:
    write_competition(project)
    assert main(["folds", "--data", "tiny"]) == 0
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr"]) == 0
    args = ["blend", "--data", "tiny", "--models", "tfidf_lr", "--name", "s", "blend.method=mean"]
    assert main(args) == 0
    sub = paths.submissions_dir("tiny") / "s.csv"
    first = sub.read_bytes()
    rows = len(pd.read_csv(paths.submissions_dir("tiny") / "log.csv"))
    assert main(args) == 2
    assert "s.csv" in capsys.readouterr().err
    assert sub.read_bytes() == first and len(pd.read_csv(paths.submissions_dir("tiny") / "log.csv")) == rows
