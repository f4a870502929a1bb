"""Whose artifacts are whose (issue 23, items 2 and 10).

Two data YAMLs with one file name (``/a/data.yaml``, ``/b/data.yaml``) were both keyed ``data``:
following the messages (``FORCE=1`` twice) moved the first competition's folds and runs aside.
A key is now owned by the file whose folds made it; another file with that key is refused,
naming both and the ``data.name`` that gives it its own. Model YAMLs of a user's own live
beside their competition and are named by path (``MODEL=comp/models/m.yaml``) or by name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_competition
from mmfold import paths
from mmfold.cli import main
from mmfold.config import ConfigError, load_config, model_yaml


def _comp_yaml(project: Path, folder: str, name: str, **extra: object) -> Path:
    """A small competition ``input/<name>`` described by ``<project>/<folder>/data.yaml``."""
    write_competition(project, name=name, seed=len(name))
    (project / "configs" / "data" / f"{name}.yaml").unlink()
    yml = project / folder / "data.yaml"
    yml.parent.mkdir(parents=True, exist_ok=True)
    doc = {"data": {"root": f"input/{name}", "image_dir": "images", **extra}, "folds": {"n_splits": 3}}
    yml.write_text(yaml.safe_dump(doc))
    return yml


def _out(capsys: pytest.CaptureFixture) -> str:
    got = capsys.readouterr()
    return got.out + got.err


def test_two_yamls_with_one_file_name_are_refused_not_merged(project: Path, capsys) -> None:
    a, b = _comp_yaml(project, "a", "first"), _comp_yaml(project, "b", "second")
    assert main(["folds", "--data", str(a)]) == 0
    before = paths.folds_file("data").read_bytes()
    for force in ([], ["--force"]):  # what the old messages advised
        capsys.readouterr()
        assert main(["folds", "--data", str(b), *force]) == 2
        err = _out(capsys)
        assert str(a.resolve()) in err and str(b.resolve()) in err
        assert "data: {name: b_data}" in err and "FORCE" not in err
    assert paths.folds_file("data").read_bytes() == before
    assert not list((project / "folds").glob("*.bak"))
    assert main(["train", "--data", str(b), "--model", "tfidf_lr"]) == 2  # every stage, not only folds
    assert not (project / "runs").exists()


def test_the_suggested_data_name_gives_the_second_file_its_own_artifacts(project: Path) -> None:
    a, b = _comp_yaml(project, "a", "first"), _comp_yaml(project, "b", "second")
    assert main(["folds", "--data", str(a)]) == 0
    doc = yaml.safe_load(b.read_text())
    doc["data"]["name"] = "b_data"
    b.write_text(yaml.safe_dump(doc))
    assert load_config(str(b)).data.name == "b_data"
    assert main(["folds", "--data", str(b)]) == 0
    assert main(["train", "--data", str(b), "--model", "tfidf_lr"]) == 0
    assert paths.oof_file("b_data", "tfidf_lr").exists() and not paths.oof_file("data", "tfidf_lr").exists()
    assert main(["train", "--data", str(a), "--model", "tfidf_lr"]) == 0  # the first one is intact


def test_a_moved_competition_keeps_its_artifacts(project: Path, capsys) -> None:
    a = _comp_yaml(project, "a", "first")
    assert main(["folds", "--data", str(a)]) == 0
    moved = project / "moved" / "data.yaml"
    moved.parent.mkdir()
    shutil.move(a, moved)
    assert main(["train", "--data", str(moved), "--model", "tfidf_lr"]) == 0
    assert "takes them over" in _out(capsys)


def test_folds_made_before_owners_were_recorded_are_adopted(project: Path) -> None:
    a, b = _comp_yaml(project, "a", "first"), _comp_yaml(project, "b", "second")
    assert main(["folds", "--data", str(a)]) == 0
    paths.owner_file("data").unlink()  # as a checkout from before this record existed left it
    assert main(["train", "--data", str(a), "--model", "tfidf_lr"]) == 0
    assert main(["folds", "--data", str(b), "--force"]) == 2


def test_a_named_config_is_keyed_by_its_file_name(project: Path) -> None:
    write_competition(project)
    yml = project / "configs" / "data" / "tiny.yaml"
    doc = yaml.safe_load(yml.read_text())
    doc["data"]["name"] = "other"
    yml.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="keyed by its file name"):
        load_config("tiny")


# ------------------------------------------------------------------ item 10: MODEL= a YAML path

def _own_model(folder: Path, name: str = "my_lr") -> Path:
    """A user's own model YAML (a TF-IDF member) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"model": {"kind": "tfidf_linear", "params": {"head": "logreg", "min_df": 1}}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    return folder / f"{name}.yaml"


@pytest.mark.parametrize("where", ["models", "."])
def test_model_yaml_beside_the_competition_by_path_and_by_name(project: Path, where: str) -> None:
    a = _comp_yaml(project, "comp", "first")
    mine = _own_model(a.parent / where)
    assert main(["folds", "--data", str(a)]) == 0
    assert main(["train", "--data", str(a), "--model", str(mine)]) == 0
    assert paths.oof_file("data", "my_lr").exists()
    assert model_yaml("my_lr", str(a)).resolve() == mine.resolve()
    assert main(["collect", "--data", str(a), "--model", "my_lr"]) == 0
    assert main(["blend", "--data", str(a), "--models", "my_lr", "blend.n_trials=2"]) == 0


def test_a_model_yaml_its_name_cannot_find_is_refused(project: Path, tmp_path: Path, capsys) -> None:
    a = _comp_yaml(project, "comp", "first")
    stray = _own_model(tmp_path / "elsewhere")
    assert main(["folds", "--data", str(a)]) == 0
    assert main(["train", "--data", str(a), "--model", str(stray)]) == 2
    err = _out(capsys)
    assert "keep it where its name 'my_lr' finds it" in err and "Traceback" not in err
    assert not (project / "runs").exists()


def test_one_model_name_in_two_places_is_refused(project: Path) -> None:
    a = _comp_yaml(project, "comp", "first")
    _own_model(a.parent, "tfidf_lr")  # also in configs/models/
    with pytest.raises(ConfigError, match="defined twice"):
        load_config(str(a), "tfidf_lr")
