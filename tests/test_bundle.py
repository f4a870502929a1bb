"""An exported bundle where it is used: a notebook that was never set up for mmfold, a hidden
test set in another folder (issue 23, items 9 and 11).

The bundle checks its requirements before importing them and says how to install them (online
and from wheels); its messages name its own flags (``--images``, ``--sample``), never a project
setting it does not take or a file it deletes on exit; and a blend of data without a test set
(a code competition's normal case) is saved and logged, so it exports and re-submits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mmfold import paths
from mmfold.cli import main
from tests.conftest import install_demo, write_competition

TINY_MEMBER = {"model": {"kind": "tfidf_linear", "params": {"min_df": 1}}}


def _env() -> dict[str, str]:
    """The environment of a notebook: no project root, no path into this checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("MMFOLD_HOME", "PYTHONPATH")}


def _bundle(python: str | Path, bundle: Path, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """``python predict.py ARGS`` of ``bundle``, as a user runs it."""
    return subprocess.run([str(python), str(bundle / "predict.py"), *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300, check=False)


def _tiny_bundle(project: Path, elsewhere: Path, n_test: int = 12, sample: bool = False) -> tuple[Path, Path]:
    """The tiny competition (one CPU member, blend ``b``, with a sample submission if asked)
    exported and moved out of the project; returns (bundle, data folder)."""
    data = write_competition(project, n_test=n_test)
    if sample:
        test = pd.read_csv(data / "test.csv", dtype=str)
        pd.DataFrame({"Id": test["ImageID"][::-1], "Predicted": "1"}).to_csv(data / "sample_submission.csv",
                                                                             index=False)
        yml = project / "configs" / "data" / "tiny.yaml"
        doc = yaml.safe_load(yml.read_text())
        doc["data"]["sample_submission"] = "sample_submission.csv"
        yml.write_text(yaml.safe_dump(doc))
    (project / "configs" / "models" / "t_lr.yaml").write_text(yaml.safe_dump(TINY_MEMBER))
    assert main(["folds", "--data", "tiny"]) == 0
    assert main(["train", "--data", "tiny", "--model", "t_lr"]) == 0
    assert main(["blend", "--data", "tiny", "--name", "b", "--models", "t_lr", "blend.n_trials=2"]) == 0
    assert main(["export", "--data", "tiny", "--name", "b", "--out", str(project / "bundle")]) == 0
    return Path(shutil.move(str(project / "bundle"), elsewhere / "bundle")), data


def _hidden_test(data: Path, where: Path, images: str | None) -> Path:
    """The test CSV copied to ``where`` (a hidden test set's folder), its images into
    ``where/<images>`` when given."""
    where.mkdir(parents=True)
    shutil.copy(data / "test.csv", where / "test.csv")
    if images:
        (where / images).mkdir()
        for i in pd.read_csv(data / "test.csv", dtype=str)["ImageID"]:
            shutil.copy(data / "images" / i, where / images / i)
    return where / "test.csv"


# ---------------------------------------------------------------- item 9: requirements first


def test_a_bundle_under_a_bare_python_names_what_is_missing_and_how_to_install(
        project: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A python without the pinned packages (a fresh venv, no pip) gets one message: what is
    missing, pinned, and the install commands online and from wheels; no traceback."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    bundle, data = _tiny_bundle(project, elsewhere)
    bare = elsewhere / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    python = bare / "bin" / "python"
    r = _bundle(python, bundle, "--test", data / "test.csv", "--out", elsewhere / "sub.csv", cwd=elsewhere)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "ModuleNotFoundError" not in r.stderr, r.stderr
    pins = (bundle / "requirements.txt").read_text()
    numpy_pin = next(line for line in pins.splitlines() if line.startswith("numpy=="))
    assert "missing packages this bundle needs:" in r.stderr and numpy_pin in r.stderr and "skops==" in r.stderr
    assert f"-m pip install -r {bundle / 'requirements.txt'}" in r.stderr
    assert "--no-index --find-links" in r.stderr and "Offline notebooks" in r.stderr
    assert not (elsewhere / "sub.csv").exists()
    readme = (bundle / "README.md").read_text()  # how to carry wheels into an offline notebook
    assert "pip download" in readme and "--no-index --find-links /kaggle/input/" in readme
    assert "dataset" in readme and "--images" in readme and "--sample" in readme
    assert "--sample CSV|none" in (bundle / "predict.py").read_text()


@pytest.mark.slow
def test_every_package_mmfold_imports_while_a_bundle_predicts_is_checked(
        project: Path, demo_template: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The requirement check must cover what predicting imports: run a bundle with a torch
    member and a CPU member, recording each third-party package mmfold's own modules import;
    every one is in ``bundle.REQUIRED`` and pinned in the bundle's requirements.txt."""
    from mmfold.bundle import REQUIRED, pinned_versions

    install_demo(project, demo_template)
    models = ["tfidf_lr", "demo_image"]
    assert main(["train", "--model", ",".join(models), "train.epochs=1", "train.progress=false"]) == 0
    assert main(["blend", "--name", "b", "--models", *models, "blend.n_trials=2"]) == 0
    assert main(["export", "--name", "b", "--out", str(project / "bundle")]) == 0
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    bundle = Path(shutil.move(str(project / "bundle"), elsewhere / "bundle"))
    seen = elsewhere / "imports.json"
    r = subprocess.run([sys.executable, "-c", TRACK_IMPORTS, str(bundle / "predict.py"), str(seen), "--test",
                        str(project / "input" / "demo" / "test.csv"), "--out", str(elsewhere / "sub.csv")],
                       cwd=bundle, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "sub.csv").read_bytes() == (paths.submissions_dir("demo") / "b.csv").read_bytes()
    doc = json.loads(seen.read_text())
    assert doc["mmfold"].startswith(str(bundle))  # the bundle's own copy ran
    assert {"numpy", "torch", "skops"} <= set(doc["imported"])  # the hook saw both kinds predict
    assert set(doc["imported"]) <= set(REQUIRED), set(doc["imported"]) - set(REQUIRED)
    pins = pinned_versions(bundle / "requirements.txt")
    assert all(d.lower() in pins for d in (REQUIRED[m] for m in doc["imported"])), pins


# Runs predict.py with an import hook: the top-level third-party packages that modules of
# mmfold import (directly, lazily or not), written as JSON with the mmfold that ran.
TRACK_IMPORTS = """
import builtins, json, runpy, sys
script, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
seen, real = set(), builtins.__import__
def hook(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and str((globals or {}).get("__name__", "")).split(".")[0] == "mmfold":
        seen.add(name.split(".")[0])
    return real(name, globals, locals, fromlist, level)
builtins.__import__ = hook
sys.argv = [script, *args]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
top = sorted(seen - set(sys.stdlib_module_names) - {"mmfold"})
json.dump({"imported": top, "mmfold": sys.modules["mmfold"].__file__}, open(out, "w"))
sys.exit(code)
"""


# ---------------------------------------------------------------- item 9: the bundle's own flags


def test_test_images_are_found_beside_a_hidden_test_file_or_named_with_images(
        project: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A hidden test set with its images in ``test_images/`` beside it predicts without
    ``--images``; a test file with no images beside it is refused naming ``--images`` (not a
    list in a file deleted on exit, nor a setting the bundle does not take)."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    bundle, data = _tiny_bundle(project, elsewhere)
    test = _hidden_test(data, elsewhere / "hidden", "test_images")
    r = _bundle(sys.executable, bundle, "--test", test, "--out", elsewhere / "sub.csv", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "sub.csv").read_bytes() == (paths.submissions_dir("tiny") / "b.csv").read_bytes()
    assert str(elsewhere / "hidden" / "test_images") in r.stdout  # says where it read them

    bare = _hidden_test(data, elsewhere / "bare", None)  # 12 images, none beside it
    r = _bundle(sys.executable, bundle, "--test", bare, "--out", elsewhere / "sub2.csv", cwd=elsewhere)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--images DIR" in r.stderr and "12 of 12" in r.stderr and str(elsewhere / "bare" / "images") in r.stderr
    assert "bad_images" not in r.stderr and "data." not in r.stderr, r.stderr
    r = _bundle(sys.executable, bundle, "--test", bare, "--images", elsewhere / "bare", "--out",
                elsewhere / "sub2.csv", cwd=elsewhere)
    assert r.returncode == 2 and f"--images {elsewhere / 'bare'}: 12 of 12 test images missing" in r.stderr, r.stderr
    r = _bundle(sys.executable, bundle, "--test", bare, "--images", elsewhere / "hidden" / "test_images", "--out",
                elsewhere / "sub2.csv", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "sub2.csv").read_bytes() == (elsewhere / "sub.csv").read_bytes()


def test_sample_submission_messages_name_the_bundles_sample_flag(
        project: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Where the data config names a sample submission: the one beside the hidden test file
    is followed; none beside it, or one of another test set, is refused naming ``--sample``
    (never ``data.sample_submission``); ``--sample none`` writes the default header."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    bundle, data = _tiny_bundle(project, elsewhere, sample=True)
    test = _hidden_test(data, elsewhere / "hidden", "images")
    shutil.copy(data / "sample_submission.csv", elsewhere / "hidden" / "sample_submission.csv")
    r = _bundle(sys.executable, bundle, "--test", test, "--out", elsewhere / "sub.csv", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "sub.csv").read_bytes() == (paths.submissions_dir("tiny") / "b.csv").read_bytes()

    (elsewhere / "hidden" / "sample_submission.csv").unlink()
    r = _bundle(sys.executable, bundle, "--test", test, "--out", elsewhere / "sub2.csv", cwd=elsewhere)
    assert r.returncode == 2 and "--sample FILE" in r.stderr and "--sample none" in r.stderr, r.stderr
    assert "data.sample_submission" not in r.stderr, r.stderr

    other = pd.read_csv(data / "sample_submission.csv", dtype=str).head(5)  # another test set's ids
    other.to_csv(elsewhere / "old_sample.csv", index=False)
    r = _bundle(sys.executable, bundle, "--test", test, "--sample", elsewhere / "old_sample.csv", "--out",
                elsewhere / "sub2.csv", cwd=elsewhere)
    assert r.returncode == 2 and "missing 7 test ids" in r.stderr and "--sample FILE" in r.stderr, r.stderr
    assert "data.sample_submission" not in r.stderr, r.stderr

    r = _bundle(sys.executable, bundle, "--test", test, "--sample", "none", "--out", elsewhere / "sub3.csv",
                cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    sub = pd.read_csv(elsewhere / "sub3.csv", dtype=str)
    assert list(sub.columns) == ["ImageID", "Labels"] and sub["ImageID"].tolist() == pd.read_csv(test)["ImageID"].tolist()


# ---------------------------------------------------------------- item 11: no test set


@pytest.mark.slow
def test_a_blend_without_a_test_set_exports_and_resubmits(
        project: Path, demo_template: Path, tmp_path_factory: pytest.TempPathFactory,
        capsys: pytest.CaptureFixture) -> None:
    """A code competition: train and blend with no test file, export, let the bundle predict
    the test set; ``blend --from`` on that test set (after ``predict --test``) writes the same
    submission. The blend is logged and its state saved though it wrote no submission."""
    from mmfold.ensemble.submission import read_log

    yml = project / "configs" / "data" / "demo.yaml"
    doc = yaml.safe_load(yml.read_text())
    doc["data"]["test_csv"] = None
    yml.write_text(yaml.safe_dump(doc))
    install_demo(project, demo_template)
    test = project / "input" / "demo" / "test.csv"
    assert main(["train", "--model", "tfidf_lr"]) == 0
    assert main(["blend", "--name", "cv", "--models", "tfidf_lr", "blend.n_trials=2"]) == 0
    out = capsys.readouterr().out
    assert "make export DATA=demo NAME=cv" in out
    assert not (paths.submissions_dir("demo") / "cv.csv").exists()
    row = read_log("demo").set_index("name").loc["cv"]
    assert row["cv_mean"] and "no test set" in row["note"]

    assert main(["export", "--name", "cv", "--out", str(project / "bundle")]) == 0
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    bundle = Path(shutil.move(str(project / "bundle"), elsewhere / "bundle"))
    r = _bundle(sys.executable, bundle, "--test", test, "--out", elsewhere / "sub.csv", cwd=elsewhere)
    assert r.returncode == 0, r.stderr

    assert main(["blend", "--from", "cv", "--name", "cv2"]) == 2  # still no test set: say how to give one
    assert "make predict DATA=demo TEST=" in capsys.readouterr().err
    assert main(["predict", "--test", str(test)]) == 0
    assert main(["blend", "--from", "cv", "--test", str(test), "--name", "cv2"]) == 0
    assert (elsewhere / "sub.csv").read_bytes() == (paths.submissions_dir("demo") / "cv2.csv").read_bytes()
