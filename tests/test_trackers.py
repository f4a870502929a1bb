"""Experiment tracking (``train.trackers``, issue 26 part 3): what TensorBoard and MLflow hold is
read back with their own readers and checked against ``log.jsonl`` and the blend's log row; a
resumed fold continues its run; ``mmfold tensorboard`` serves a dataset's runs.

W&B is not installed here (its wheel and service are heavy), so it is tested only for the
one-line error naming its pin.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmfold.cli import main
from mmfold.config import learning_diff, load_config
from tests.conftest import write_competition

TEXT = ["--model", "demo_text", "--fold", "0", "--no-collect", "train.epochs=2", "train.batch_size=16",
        "train.progress=false", "train.select_threshold=global"]
# tracker key -> the log.jsonl key it must equal
FROM_LOG = {"train/loss": "train_loss", "valid/loss": "valid_loss", "valid/f1_at_0.5": "valid_f1_half",
            "valid/f1_selected": "valid_f1", "valid/f1_best": "best_f1", "time/epoch_s": "time_s",
            "time/images_per_s": "images_per_s", "lr/head": "lr", "lr/head_no_decay": "lr"}


@pytest.fixture
def tracked(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny competition (captions only) and its folds; MLflow's default local store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    write_competition(project, images=False)
    assert main(["folds", "--data", "tiny"]) == 0
    return project


def mlflow_client(project: Path):
    """MLflow's client on the project's file store."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=(project / "mlruns").resolve().as_uri())


def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's EventAccumulator on one run folder: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_points(folder: Path) -> list[tuple[str, int]]:
    """Every (tag, step) written to a run folder, across all its event files (duplicates kept,
    which the accumulator would hide)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    out = []
    for f in sorted(folder.glob("events.out.tfevents.*")):
        for raw in RawEventFileLoader(str(f)).Load():
            event = Event.FromString(raw)
            out += [(v.tag, event.step) for v in event.summary.value]
    return out


def f32(x: float) -> float:
    """A number as TensorBoard stores a scalar (float32)."""
    return float(np.float32(x))


@pytest.mark.slow
def test_a_stopped_and_resumed_fold_is_one_run_whose_numbers_are_its_log(tracked: Path) -> None:
    trackers = "train.trackers=[tensorboard,mlflow]"
    assert main(["train", "--data", "tiny", *TEXT, trackers, "train.stop_after_epochs=1"]) == 130
    fold = tracked / "runs" / "tiny" / "demo_text" / "fold0"
    first_id = json.loads((fold / "tracking.json").read_text())["mlflow"]
    assert main(["train", "--data", "tiny", *TEXT, trackers]) == 0  # resumes epoch 1
    rows = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]

    # TensorBoard: runs/<data>/<model>/fold<k>/tb, steps 0..1 once each over two sessions' files
    tb = fold / "tb"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2
    points = tb_points(tb)
    assert not [p for p, n in Counter(points).items() if n > 1]
    scalars = tb_scalars(tb)
    for key, col in FROM_LOG.items():
        assert scalars[key] == [(r["epoch"], f32(r[col])) for r in rows], key
    assert len(list(tb.glob("*/hparams.yml"))) == 1  # the config logged once, not again on resume

    # MLflow: one run for the fold, continued, nested under its model's run, numbers = log.jsonl
    client = mlflow_client(tracked)
    exp = client.get_experiment_by_name("mmfold-tiny")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`mmfold.kind` = 'fold'")
    assert [r.info.run_id for r in runs] == [first_id]
    run = runs[0]
    assert run.info.run_name == "demo_text/fold0"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "demo_text" and parent.data.tags["mmfold.kind"] == "model"
    for key, col in FROM_LOG.items():
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted((m.step, m.value) for m in history) == [(r["epoch"], r[col]) for r in rows], key
    cfg = load_config("tiny", "demo_text", TEXT[5:])
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["train.select_threshold"] == "global"
    assert run.data.params["model.name"] == "demo_text"
    assert run.data.params["train.stop_after_epochs"] == "1"  # the first session's config, kept


def test_trackers_change_nothing_a_fold_learns() -> None:
    plain = load_config("demo", None, []).to_dict()
    tracked = load_config("demo", None, ["train.trackers=[tensorboard,mlflow]"]).to_dict()
    assert learning_diff(plain, tracked) == {}
    from mmfold.artifacts.manifest import learning_view

    assert learning_view(plain) == learning_view(tracked)


def test_a_missing_tracker_is_one_line_naming_its_pin(tracked: Path, capsys) -> None:
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    capsys.readouterr()
    assert main(["train", "--data", "tiny", *TEXT, "train.trackers=[wandb]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mmfold train: error: train.trackers: wandb is not installed: pip install 'wandb==0.31.0'"
    assert not (tracked / "runs" / "tiny" / "demo_text" / "fold0" / "last.pt").exists()
    assert main(["train", "--data", "tiny", *TEXT, "train.trackers=[tensorbord]"]) == 2
    assert "unknown tracker 'tensorbord'; known: ['tensorboard', 'mlflow', 'wandb']" in capsys.readouterr().err


def test_the_blend_logs_its_honest_cv_weights_and_thresholds(tracked: Path) -> None:
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr"]) == 0
    assert main(["blend", "--data", "tiny", "--models", "tfidf_lr", "--name", "b1", "blend.method=mean",
                 "train.trackers=[tensorboard,mlflow]"]) == 0
    row = pd.read_csv(tracked / "submissions" / "tiny" / "log.csv", dtype=str).iloc[-1]
    report = json.loads((tracked / "reports" / "tiny" / "blend_b1.json").read_text())
    expected = {f"cv/{k}": float(row[k]) for k in ("cv_mean", "cv_std", "cv_in_sample", "best_single_cv")}
    expected |= {f"weight/{m}": float(w) for m, w in json.loads(row["weights"]).items()}
    expected |= {f"threshold/{c}": v["threshold"] for c, v in report["per_label"].items()}
    assert len(expected) == 4 + 1 + 4

    scalars = tb_scalars(tracked / "runs" / "tiny" / "_blend" / "b1" / "tb")
    assert scalars == {k: [(0, f32(v))] for k, v in expected.items()}

    client = mlflow_client(tracked)
    exp = client.get_experiment_by_name("mmfold-tiny")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`mmfold.kind` = 'blend'")
    assert run.info.run_name == "blend/b1"
    assert run.data.metrics == expected
    assert run.data.params["models"] == "tfidf_lr" and run.data.params["method"] == "mean"


def test_tensorboard_serves_the_datasets_runs(tracked: Path) -> None:
    """``mmfold tensorboard --data tiny``: the URL it prints answers with the dataset's runs."""
    from mmfold.ensemble.blend import _blend_tensorboard

    _blend_tensorboard("tiny", "b1", tracked / "runs" / "tiny" / "_blend" / "b1", {"cv/cv_mean": 0.5}, {})
    proc = subprocess.Popen([sys.executable, "-m", "mmfold", "tensorboard", "--data", "tiny", "--port", "0"],
                            cwd=tracked, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("TensorBoard at http://"), line
        url = line.split()[2]
        with urllib.request.urlopen(url + "data/runs", timeout=30) as answer:
            assert json.loads(answer.read()) == ["_blend/b1/tb"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_tensorboard_without_runs_says_how_to_make_them(tracked: Path, capsys) -> None:
    assert main(["tensorboard", "--data", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "no TensorBoard runs under" in err
    assert "make train DATA=tiny ARGS='train.trackers=[tensorboard]'" in err
