"""Every command a message suggests pastes and runs (issue 23, item 3).

With a data YAML given by path, messages used to say ``make predict DATA=mycomp`` (no such
config), ``make train MODEL=x FORCE=1`` (no DATA=: it would run on demo) and named only the
first of several models. Hints are now built by :mod:`mmfold.hints`; these tests paste the
suggested commands into ``make`` and check that they fix what the message was about.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_competition
from mmfold import hints
from mmfold.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_a_hint_repeats_the_data_argument_and_every_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    yml = tmp_path / "my comps" / "mycomp.yaml"
    yml.parent.mkdir()
    yml.write_text("data: {root: input/x}\n")
    monkeypatch.setenv(hints.DATA_ENV, str(yml))
    cmd = hints.make("predict", "mycomp", model=["a", "b", "a"])
    assert shlex.split(cmd) == ["make", "predict", f"DATA={yml}", "MODEL=a,b"]
    assert hints.make("train", "mycomp", model="a", fold=2, force=True).endswith("MODEL=a FOLD=2 FORCE=1")
    assert hints.make("train", "other") == "make train DATA=other"  # another dataset keeps its name


def _suggested(message: str, target: str) -> list[str]:
    """The ``make <target> ...`` command a message suggests, as argv."""
    found = re.search(rf"make {target} [^`)\n]*", message)
    assert found, f"no `make {target}` in: {message}"
    return shlex.split(found.group(0).strip())


def _paste(argv: list[str], project: Path) -> subprocess.CompletedProcess:
    """Run a suggested make command from the repo, on the test's project."""
    env = {**os.environ, "MMFOLD_HOME": str(project), "PY": str(REPO / ".venv" / "bin" / "python")}
    env.pop(hints.DATA_ENV, None)
    return subprocess.run([*argv, "-s", "-C", str(REPO)], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def own_comp(project: Path) -> Path:
    """A competition whose data YAML and model YAMLs live in ``<project>/comp/``, trained."""
    write_competition(project, name="mycomp")
    (project / "configs" / "data" / "mycomp.yaml").unlink()
    yml = project / "comp" / "mycomp.yaml"
    (yml.parent / "models").mkdir(parents=True)
    yml.write_text(yaml.safe_dump({"data": {"root": "input/mycomp", "image_dir": "images", "models": ["lr_a", "lr_b"]},
                                   "folds": {"n_splits": 3}}))
    for name, c in (("lr_a", 1.0), ("lr_b", 3.0)):
        doc = {"model": {"kind": "tfidf_linear", "params": {"min_df": 1, "head": "logreg", "head_params": {"C": c}}}}
        (yml.parent / "models" / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    assert main(["folds", "--data", str(yml)]) == 0
    assert main(["train", "--data", str(yml)]) == 0
    return yml


@pytest.mark.slow
def test_a_new_test_set_hint_predicts_every_model(own_comp: Path, project: Path, capsys) -> None:
    test_csv = project / "input" / "mycomp" / "test.csv"
    test_csv.write_text("\n".join(test_csv.read_text().splitlines()[:-2]) + "\n")  # the test set changed
    capsys.readouterr()
    assert main(["blend", "--data", str(own_comp), "blend.n_trials=2"]) == 2
    argv = _suggested(capsys.readouterr().err, "predict")
    assert f"DATA={own_comp}" in argv and "MODEL=lr_a,lr_b" in argv
    done = _paste(argv, project)
    assert done.returncode == 0, done.stderr
    assert main(["blend", "--data", str(own_comp), "blend.n_trials=2"]) == 0


@pytest.mark.slow
def test_a_stale_model_hint_retrains_it_on_this_competition(own_comp: Path, project: Path, capsys) -> None:
    yml = own_comp.parent / "models" / "lr_b.yaml"
    yml.write_text(yml.read_text().replace("C: 3.0", "C: 5.0"))
    capsys.readouterr()
    assert main(["blend", "--data", str(own_comp), "blend.n_trials=2"]) == 2
    argv = _suggested(capsys.readouterr().err, "train")
    assert f"DATA={own_comp}" in argv and "MODEL=lr_b" in argv and "FORCE=1" in argv
    done = _paste(argv, project)
    assert done.returncode == 0, done.stderr
    assert main(["blend", "--data", str(own_comp), "blend.n_trials=2"]) == 0
