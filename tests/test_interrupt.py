"""Stopping ``mmfold train --jobs 2`` with real signals (issue 23, item 1).

A terminal's Ctrl-C is a SIGINT to the whole process group; ``kill <pid>`` a SIGTERM to the
parent alone. Either must cancel the queued folds, stop the running ones at their next
optimizer step with ``last.pt`` saved, collect nothing and exit 130 within seconds; the next
run resumes the stopped folds and finishes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmfold import paths
from mmfold.cli import main
from tests.conftest import write_competition

# Long enough that no fold can finish before the signal (about 0.2 s an epoch here); patience
# (a run-length key) ends the resumed runs once the score stops improving.
SLOW = ["--model", "demo_text", "train.epochs=300", "train.patience=0", "train.progress=false",
        "train.batch_size=16"]
STOP_WITHIN_S = 30.0  # the folds stop after one optimizer step; generous for a busy CPU


@pytest.fixture
def folded(project: Path) -> Path:
    """A captions-only competition of 3 folds, large enough for a few steps an epoch."""
    write_competition(project, n_train=300, n_test=10, images=False)
    assert main(["folds", "--data", "tiny"]) == 0
    return project


def _train(project: Path, *args: str) -> subprocess.Popen:
    """``mmfold train --data tiny`` in a process group of its own, as a terminal runs it."""
    env = {**os.environ, "MMFOLD_HOME": str(project), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mmfold", "train", "--data", "tiny", *args],
                            cwd=project, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _fold_dir(k: int) -> Path:
    return paths.run_dir("tiny", "demo_text", k)


def _wait_for_training(proc: subprocess.Popen, folds: list[int], timeout_s: float = 240) -> None:
    """Until each fold has logged an epoch (it is past its set-up, inside its training loop)."""
    deadline = time.monotonic() + timeout_s
    while not all((_fold_dir(k) / "log.jsonl").exists() for k in folds):
        if proc.poll() is not None:
            pytest.fail(f"train ended early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the folds never started training")
        time.sleep(0.05)


def _ended(proc: subprocess.Popen, timeout_s: float) -> tuple[int, str, float]:
    """Exit code, output and seconds taken; the group is killed when it overruns."""
    start = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"still running {timeout_s:.0f} s after the signal:\n{out[-3000:]}")
    return proc.returncode, out, time.monotonic() - start


def _stop(proc: subprocess.Popen, how: str) -> tuple[int, str]:
    """Send the signal as a user would; exit code and output, checked to come within seconds."""
    if how == "ctrl-c to the group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    code, out, took = _ended(proc, STOP_WITHIN_S + 60)
    assert took < STOP_WITHIN_S, (took, out)
    assert "interrupted" in out and "Traceback" not in out, out
    return code, out


def _stopped_resumably(k: int) -> bool:
    """The fold saved where it stood and is not done."""
    return (_fold_dir(k) / "last.pt").exists() and not (_fold_dir(k) / "done.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c to the group", "sigterm to the parent"])
def test_a_signal_stops_jobs_cancels_the_queue_and_the_run_resumes(folded: Path, how: str, capsys) -> None:
    proc = _train(folded, *SLOW, "--jobs", "2")
    _wait_for_training(proc, [0, 1])
    assert not any((_fold_dir(k) / "done.json").exists() for k in (0, 1)), "a fold finished too soon"
    code, out = _stop(proc, how)
    assert code == 130, out
    assert not paths.oof_file("tiny", "demo_text").exists()  # nothing collected
    assert _stopped_resumably(0) and _stopped_resumably(1), out
    queued = _fold_dir(2)
    assert not queued.exists() and not queued.with_name(".fold2.lock").exists(), out  # never started
    if how != "ctrl-c to the group":
        return  # the files are those of the Ctrl-C case
    # the next run resumes the stopped folds and finishes (patience may change on resume)
    capsys.readouterr()
    assert main(["train", "--data", "tiny", *SLOW, "train.patience=1"]) == 0
    out = capsys.readouterr()
    assert "resuming demo_text fold 0 from epoch" in out.out + out.err
    assert "resuming demo_text fold 1 from epoch" in out.out + out.err
    assert all((_fold_dir(k) / "done.json").exists() for k in range(3))
    assert paths.oof_file("tiny", "demo_text").exists()


@pytest.mark.slow
def test_sigterm_to_the_parent_stops_a_cpu_members_fit_within_seconds(folded: Path) -> None:
    """A CPU member's fit looks at no stop event: the parent passes the SIGTERM on to its
    workers (before, it waited for the running fits to end: minutes on real data)."""
    slow = {"model": {"kind": "tfidf_linear", "params": {
        "min_df": 1, "head": "mlp", "head_params": {"hidden": 8, "epochs": 1000000, "batch_size": 16}}}}
    (folded / "configs" / "models" / "slow_mlp.yaml").write_text(yaml.safe_dump(slow))
    proc = _train(folded, "--model", "slow_mlp", "--jobs", "2")
    runs = paths.root() / "runs" / "tiny" / "slow_mlp"
    deadline = time.monotonic() + 240
    while not all((runs / f".fold{k}.lock").exists() for k in (0, 1)):  # both fits under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
        time.sleep(0.05)
    time.sleep(2)
    code, out = _stop(proc, "sigterm to the parent")
    assert code == 130, out
    assert not paths.oof_file("tiny", "slow_mlp").exists() and not (runs / "fold2").exists(), out


@pytest.mark.slow
def test_sigterm_stops_a_single_process_as_ctrl_c_does(folded: Path) -> None:
    """Without ``--jobs``: SIGTERM stops the fold at its next step, resumable, exit 130."""
    proc = _train(folded, *SLOW)
    _wait_for_training(proc, [0])
    code, out = _stop(proc, "sigterm to the parent")
    assert code == 130, out
    assert _stopped_resumably(0) and not _fold_dir(1).exists(), out
