"""`make train RAY=...` (issue 27): every (model, fold, seed) of a run as one Ray task.

On one local Ray instance (2 CPUs, loopback only, started once for the module), tiny data and
tiny models: the probabilities equal those of `make train` without Ray bit for bit, a worker
SIGKILLed mid-fold is retried and resumes from its last.pt to the same probabilities, Ctrl-C
leaves every fold resumable, folds already done are skipped, and a second driver on the same
data set refuses. The refusals need no Ray instance and run without ray installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mmfold import paths
from mmfold.cli import main
from mmfold.config import ConfigError, load_config
from mmfold.train.ray_runner import LEASE_FILE, driver_lease, import_ray, lease_path, start_local, task_resources
from tests.conftest import captured, write_competition

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'mmfold[ray]')")
TORCH = ["train.epochs=2", "train.progress=false", "train.threads=1", "train.batch_size=16"]
SEEDED = "text_seeds"  # demo_text trained with train.seeds: [1, 2]: one Ray task per seed
# tfidf_lr with the lbfgs solver: a deterministic CPU member on the tiny data
MEMBER = "tfidf_lbfgs"


@pytest.fixture
def folded(project: Path) -> Path:
    """A captions-only competition of 3 folds (90 rows), a seeded copy of demo_text and a
    deterministic CPU member."""
    write_competition(project, n_train=90, n_test=10, images=False)
    doc = yaml.safe_load((project / "configs" / "models" / "demo_text.yaml").read_text())
    doc["train"]["seeds"] = [1, 2]
    (project / "configs" / "models" / f"{SEEDED}.yaml").write_text(yaml.safe_dump(doc))
    doc = yaml.safe_load((project / "configs" / "models" / "tfidf_lr.yaml").read_text())
    doc["model"]["params"]["head_params"] = {"C": 2.0, "solver": "lbfgs"}
    (project / "configs" / "models" / f"{MEMBER}.yaml").write_text(yaml.safe_dump(doc))
    assert main(["folds", "--data", "tiny"]) == 0
    return project


@pytest.fixture(scope="module")
def ray_local() -> Iterator[object]:
    """One local Ray instance for the module (2 CPUs, bound to 127.0.0.1); `--ray local` joins it."""
    ray = import_ray(local=True)
    start_local(ray, num_cpus=2, namespace="mmfold-tests")
    yield ray
    ray.shutdown()


def _collected(models: list[str]) -> dict[str, pd.DataFrame]:
    """Each model's collected OOF and test probabilities, read back."""
    out = {}
    for m in models:
        out[f"{m} oof"] = pd.read_parquet(paths.oof_file("tiny", m))
        out[f"{m} test"] = pd.read_parquet(paths.test_pred_file("tiny", m))
    return out


def _start_pids(out: str) -> list[int]:
    """The worker pid of every ``ray: start`` line, in order."""
    return [int(m) for m in re.findall(r"^ray: start .* \(pid (\d+)\)$", out, flags=re.M)]


def _forget_training(project: Path) -> None:
    """Remove every trained fold and collected file (the folds file stays)."""
    shutil.rmtree(project / "runs", ignore_errors=True)
    shutil.rmtree(project / "oof", ignore_errors=True)


def _when(condition: Callable[[], bool], action: Callable[[], None], timeout_s: float = 900) -> threading.Thread:
    """Run ``action`` in a thread as soon as ``condition`` holds (polled every 10 ms)."""
    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                action()
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _trained_an_epoch(model: str, fold: int) -> Callable[[], bool]:
    """The fold logged an epoch (its last.pt is saved before the log line) and is not done."""
    rd = paths.run_dir("tiny", model, fold)
    return lambda: (rd / "log.jsonl").exists() and not (rd / "done.json").exists()


# ------------------------------------------------------------------ the same numbers as make train


@needs_ray
@pytest.mark.slow
def test_ray_gives_the_probabilities_of_a_plain_run_bit_for_bit(folded: Path, ray_local, capsys) -> None:
    models = [MEMBER, "demo_text", SEEDED]
    args = ["train", "--data", "tiny", "--model", ",".join(models), *TORCH]
    assert main(args) == 0
    plain = _collected(models)
    _forget_training(folded)
    capsys.readouterr()
    assert main([*args, "--ray", "local"]) == 0
    out = captured(capsys)
    for name, frame in _collected(models).items():
        pd.testing.assert_frame_equal(frame, plain[name], check_exact=True, obj=name)
    # one task per (model, fold, seed), a line for each start and finish on the driver
    assert "ray: submitted 12 task(s) of 3 model(s)" in out, out
    assert "at most 2 running at once" in out, out  # never more tasks than the instance's 2 CPUs
    for unit in (f"{MEMBER} fold 0", "demo_text fold 2", f"{SEEDED} fold 1 seed 2"):
        assert f"ray: start {unit} on 127.0.0.1" in out and f"ray: done {unit} in" in out, out
    assert "training this seed again" not in out  # the driver's merge reloads each seed, never trains
    assert not lease_path("tiny").exists()  # the driver's lease ends with it
    pids = _start_pids(out)
    assert len(pids) == 12 and len(set(pids)) == 12, out  # every unit in a fresh worker process


@needs_ray
def test_tasks_write_into_the_project_whatever_folder_their_workers_start_in(folded: Path, ray_local,
                                                                            monkeypatch) -> None:
    """The project named relatively (``make train`` leaves MMFOLD_HOME unset: the shell's
    folder): a worker started elsewhere (a cluster node's `ray start` folder) must not write the
    run's files (the attempt counts) relative to its own folder."""
    import os

    worker_cwd = Path(ray_local.get(ray_local.remote(lambda: os.getcwd()).remote()))
    shell = folded / "notebooks" / "day1"  # the driver's folder, two below the project
    shell.mkdir(parents=True)
    monkeypatch.chdir(shell)
    monkeypatch.setenv("MMFOLD_HOME", "../..")
    elsewhere = (worker_cwd / "../..").resolve()  # where a worker would read "../.." from
    assert elsewhere != folded.resolve()
    assert main(["train", "--data", "tiny", "--model", MEMBER, "--ray", "local"]) == 0
    assert not list((elsewhere / "runs").glob("*/.ray-attempts-*"))
    assert (folded / "oof" / "tiny" / f"{MEMBER}.parquet").exists()


@needs_ray
def test_folds_already_done_are_skipped_and_a_member_asks_for_no_gpu(folded: Path, ray_local, capsys) -> None:
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "--fold", "0", "--fold", "1"]) == 0
    before = {k: paths.run_dir("tiny", "tfidf_lr", k).joinpath("done.json").stat().st_mtime_ns for k in (0, 1)}
    capsys.readouterr()
    # a GPU request a CPU member drops: on this GPU-less instance the task would never start otherwise
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "--ray", "local",
                 "train.resources={num_gpus: 1, num_cpus: 1}"]) == 0
    out = captured(capsys)
    assert "tfidf_lr fold 0: done already" in out and "tfidf_lr fold 1: done already" in out, out
    assert "ray: submitted 1 task(s)" in out and "ray: start tfidf_lr fold 2" in out, out
    assert "ray: start tfidf_lr fold 0" not in out
    assert before == {k: paths.run_dir("tiny", "tfidf_lr", k).joinpath("done.json").stat().st_mtime_ns for k in (0, 1)}
    assert paths.oof_file("tiny", "tfidf_lr").exists()  # the last fold done: collected on the driver


@needs_ray
def test_a_fold_that_fails_is_not_retried_and_the_others_go_on(folded: Path, ray_local, capsys) -> None:
    """An error a fold raises itself (here: its lock held elsewhere) is reported once, not
    retried; the other folds finish; the model is not collected; the run fails with it."""
    from mmfold import fileio
    from mmfold.train.runner import fold_lock

    with fileio.file_lock(fold_lock("tiny", "tfidf_lr", 1)):
        assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "--ray", "local"]) == 2
    out = captured(capsys)
    assert "ray: failed tfidf_lr fold 1:" in out and "is locked by" in out, out
    assert "ray: retry" not in out and "ray: done tfidf_lr fold 0" in out and "ray: done tfidf_lr fold 2" in out, out
    assert not paths.oof_file("tiny", "tfidf_lr").exists()
    assert not lease_path("tiny").exists()


# ------------------------------------------------------------------ a dying worker, Ctrl-C


@needs_ray
@pytest.mark.slow
def test_a_worker_killed_mid_fold_is_retried_and_resumes_from_its_checkpoint(folded: Path, ray_local, capsys) -> None:
    args = ["train", "--data", "tiny", "--model", "demo_text", "--fold", "0", "--no-collect", *TORCH,
            "train.epochs=12"]
    assert main(args) == 0
    rd = paths.run_dir("tiny", "demo_text", 0)
    plain = [pd.read_parquet(rd / f) for f in ("oof.parquet", "test.parquet")]
    _forget_training(folded)
    capsys.readouterr()
    lock = rd.with_name(".fold0.lock")  # the fold's flock file names the worker holding it: "pid N"
    killed: list[int] = []

    def kill_worker() -> None:
        pid = int(lock.read_text().split()[1])
        assert pid != os.getpid()  # a Ray worker, never this test's process
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    watcher = _when(_trained_an_epoch("demo_text", 0), kill_worker)
    assert main([*args, "--ray", "local"]) == 0
    watcher.join()
    out = captured(capsys)
    assert killed, out
    assert "ray: retry demo_text fold 0 (attempt 2 of 4)" in out and "resuming from its last.pt" in out, out
    assert json.loads((rd / "done.json").read_text())["fold"] == 0
    for name, frame in zip(("oof.parquet", "test.parquet"), plain, strict=True):
        pd.testing.assert_frame_equal(pd.read_parquet(rd / name), frame, check_exact=True, obj=name)


@needs_ray
@pytest.mark.slow
def test_ctrl_c_cancels_the_tasks_and_leaves_every_fold_resumable(folded: Path, ray_local, capsys) -> None:
    args = ["train", "--data", "tiny", "--model", "demo_text", "--ray", "local", *TORCH, "train.epochs=200"]
    # what an earlier test in this process may have left: Ctrl-C must raise here
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    watcher = _when(_trained_an_epoch("demo_text", 0), lambda: os.kill(os.getpid(), signal.SIGINT))
    assert main(args) == 130
    watcher.join()
    out = captured(capsys)
    assert "ray: stopping: cancelling" in out, out
    assert "Traceback" not in out, out
    assert (paths.run_dir("tiny", "demo_text", 0) / "last.pt").exists(), out  # saved where it stood
    assert not any((paths.run_dir("tiny", "demo_text", k) / "done.json").exists() for k in range(3)), out
    assert not paths.oof_file("tiny", "demo_text").exists()  # nothing collected
    assert not lease_path("tiny").exists()
    # the next run resumes where the folds stood (patience may change on resume) and finishes,
    # in fresh workers: a Ctrl-C that landed inside a worker's `import torch` left it unusable
    assert main([*args, "train.patience=1"]) == 0
    again = captured(capsys)
    assert paths.oof_file("tiny", "demo_text").exists(), again
    assert not set(_start_pids(out)) & set(_start_pids(again)), (out, again)


# ------------------------------------------------------------------ one driver per data set


def test_a_second_driver_on_the_same_data_refuses(folded: Path, capsys) -> None:
    with driver_lease("tiny", "local"):
        assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "--ray", "local"]) == 2
    err = capsys.readouterr().err
    assert "another Ray driver" in err and f"pid {os.getpid()}" in err and "one driver per data set" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not paths.run_dir("tiny", "tfidf_lr", 0).exists()  # refused before anything was touched
    assert not lease_path("tiny").exists()


def test_a_dead_drivers_lease_is_taken_over(folded: Path, capsys) -> None:
    """A driver killed with -9 leaves its lease: on its own host its dead pid frees it at once
    (elsewhere, a heartbeat older than 60 s does). Done folds are skipped: no Ray is started."""
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr"]) == 0
    path = lease_path("tiny")
    # a pid above any pid_max: no such process
    stale = {"host": socket.gethostname(), "pid": 999_999_999, "token": "x", "heartbeat": time.time(), "started": "?"}
    far = {**stale, "host": "another-node", "pid": 1, "heartbeat": time.time() - 3600}
    capsys.readouterr()
    for record in (stale, far):
        path.write_text(json.dumps(record))
        assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "--ray", "local"]) == 0
        out = captured(capsys)
        assert "took over the lease of a driver that is gone" in out and "fold 2: done already" in out, out
        assert "ray: submitted" not in out
        assert not path.exists()
    live_elsewhere = {**far, "heartbeat": time.time()}
    path.write_text(json.dumps(live_elsewhere))
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "--ray", "local"]) == 2
    assert "another-node pid 1" in capsys.readouterr().err
    assert path.name == LEASE_FILE


def test_without_ray_installed_the_error_names_the_pin(folded: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "--ray", "local"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'ray[default]==" in err and len(err.strip().splitlines()) == 1, err
    assert not lease_path("tiny").exists()


def test_jobs_and_ray_together_are_refused(folded: Path, capsys) -> None:
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "--ray", "local", "--jobs", "2"]) == 2
    assert "--jobs and --ray" in capsys.readouterr().err


def test_resources_a_member_asks_for_cpus_only_and_typos_are_refused(folded: Path) -> None:
    gpu = ["train.resources={num_gpus: 1, num_cpus: 4}"]
    assert task_resources(load_config("tiny", "demo_text", gpu)) == {"num_gpus": 1, "num_cpus": 4}
    assert task_resources(load_config("tiny", "tfidf_lr", gpu)) == {"num_cpus": 4}
    assert task_resources(load_config("tiny", "tfidf_lr")) == {"num_cpus": 1}
    with pytest.raises(ConfigError, match="unknown \\['gpus'\\]"):
        task_resources(load_config("tiny", "demo_text", ["train.resources.gpus=1"]))
    # a member's own YAML may set its CPUs (train.resources reaches members)
    member = yaml.safe_load((folded / "configs" / "models" / "tfidf_lr.yaml").read_text())
    member["train"] = {"resources": {"num_cpus": 2}}
    (folded / "configs" / "models" / "tfidf_lr.yaml").write_text(yaml.safe_dump(member))
    from mmfold.train.runner import validate_model

    validate_model(load_config("tiny", "tfidf_lr"))


@needs_ray
def test_local_tasks_run_at_the_drivers_priority(ray_local) -> None:
    """Ray starts workers at niceness 15; beside any other work a local run's folds starved."""
    import os

    niceness = ray_local.remote(lambda: os.nice(0))
    assert ray_local.get(niceness.remote()) == os.nice(0)


@needs_ray
def test_a_request_no_node_of_a_local_instance_has_is_refused(folded: Path, ray_local, capsys) -> None:
    """A GPU asked of this GPU-less machine: Ray would keep the task waiting for ever."""
    assert main(["train", "--data", "tiny", "--model", "demo_text", "--ray", "local", "train.resources.num_gpus=1"]) == 2
    err = capsys.readouterr().err
    assert "model 'demo_text': train.resources" in err and "fits no node" in err and "num_gpus=0" in err, err
    assert not paths.run_dir("tiny", "demo_text", 0).exists() and not lease_path("tiny").exists()


def test_only_the_ray_runner_imports_ray_and_only_when_called() -> None:
    """`make train` without RAY= (and every other command) runs where ray is not installed."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "mmfold"
    found = []
    for path in src.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                found.append((path.name, id(node) in top))
    assert found and all(name == "ray_runner.py" and not at_top for name, at_top in found), found


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_a_task_runs_on_cores_no_other_task_holds(tmp_path: Path) -> None:
    """Ray counts CPUs but pins nothing: a one-CPU task on its own core sizes its thread pools
    (mmfold.machine) to that core, as a JOBS=N process does, instead of to the whole node."""
    from mmfold import fileio
    from mmfold.machine import available_cores, core_ids
    from mmfold.train.ray_runner import own_cores

    everything = core_ids()
    with fileio.file_lock(tmp_path / f"core{everything[0]}.lock"):  # another task holds the first core
        with own_cores(1, tmp_path) as mine:
            assert mine == [everything[1]] and core_ids() == mine and available_cores() == 1
        assert core_ids() == everything  # given back after the task
        with ExitStack() as stack:  # every core taken: the task runs unpinned rather than waiting
            for core in everything[1:]:
                stack.enter_context(fileio.file_lock(tmp_path / f"core{core}.lock"))
            with own_cores(1, tmp_path) as mine:
                assert mine == everything
