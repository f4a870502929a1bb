"""``make train GPUS=N``: the Makefile's Accelerate launch line, run as it is, with 2 CPU processes.

The command is not retyped here: ``make -n`` prints what the Makefile's ``LAUNCH`` builds for
``GPUS=2`` and that line is run in an isolated project (``MMFOLD_HOME``), so a change to the
Makefile is what gets tested. On a machine without GPUs, ``accelerate launch --multi_gpu`` still
starts one process per ``--num_processes`` (torch elastic) and the engine's ``Accelerator(cpu=True)``
joins them over gloo, so no CPU-specific flag is needed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mmfold.cli import main
from tests.conftest import write_competition
from tests.test_faults import TINY_FUSION

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def makefile_train_command(gpus: int, **variables: str) -> list[str]:
    """The ``mmfold train`` line ``make train GPUS=<gpus>`` would run (``make -n``: nothing runs,
    not even the ``setup`` prerequisite, whose lines are skipped)."""
    assigns = [f"GPUS={gpus}", f"PY={sys.executable}", *(f"{k}={v}" for k, v in variables.items())]
    out = subprocess.run(["make", "-n", "-s", "--no-print-directory", "-C", str(REPO), "train", *assigns],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    lines = [line for line in out.splitlines() if " -m mmfold train " in line]
    assert len(lines) == 1, out
    return shlex.split(lines[0])


def test_makefile_gpus_line_is_the_accelerate_launch() -> None:
    cmd = makefile_train_command(3, DATA="demo", MODEL="m", FOLD="1")
    assert cmd[:8] == [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "3",
                       "-m", "mmfold"]
    assert cmd[8:] == ["train", "--data", "demo", "--model", "m", "--fold", "1"]


def test_make_train_gpus_2_on_cpu_trains_one_fold_with_two_ranks(project: Path) -> None:
    """Both ranks train fold 0, rank 0 alone writes: the fold's OOF has each of its ids once."""
    write_competition(project)
    (project / "configs" / "models" / "tf.yaml").write_text(yaml.safe_dump(TINY_FUSION))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMFOLD_HOME": str(project),
           "HF_HOME": str(project / ".hf"),  # no user `accelerate config` file changes the launch
           "CUDA_VISIBLE_DEVICES": ""}  # the CPU (gloo) path even on a machine with one GPU
    assert main(["folds", "--data", "tiny"]) == 0  # in process: the project fixture set MMFOLD_HOME
    cmd = makefile_train_command(2, DATA="tiny", MODEL="tf", FOLD="0", ARGS="train.threads=1 train.epochs=1")
    res = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rd = project / "runs" / "tiny" / "tf" / "fold0"
    oof = pd.read_parquet(rd / "oof.parquet")
    folds = pd.read_csv(project / "folds" / "tiny.csv")
    assert oof["id"].is_unique and set(oof["id"]) == set(folds.loc[folds["fold"] == 0, "ImageID"])
    assert json.loads((rd / "done.json").read_text())["num_processes"] == 2
    assert res.stdout.count("tf fold 0: samples-F1") == 1  # one rank reports
    assert not (rd.parent / "fold1").exists()  # FOLD=0 only
