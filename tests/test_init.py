"""``mmfold init DIR``: the data YAML inferred from a competition folder reads what a hand-written
one does (the three real datasets), handles the layouts real competitions use, and stops on an
ambiguity with the flag that decides it instead of guessing."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from mmfold.cli import main
from mmfold.config import load_config
from mmfold.data.competition import load_competition
from mmfold.data.init import unzip_beside
from mmfold.errors import UserError
from tests.conftest import SHARED, needs_shared

TAGS = ["Red Circle", "Blue Square", "green", "Yellow Star", "Big Cat"]


def _init(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run ``mmfold init`` and return (exit code, stdout, stderr)."""
    rc = main(["init", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _png(path: Path, seed: int) -> None:
    """A tiny real image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(path)


def _csv(path: Path, rows: list[dict]) -> None:
    """Write rows as a CSV (quoted where needed, as Kaggle's files are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)


def _tag_rows(n: int, start: int = 0, sep: str = "|") -> list[dict]:
    """``n`` rows of 1-2 string labels (with spaces inside) joined by ``sep``; every tag used."""
    return [{"Id": f"r{start + i}", "Tags": sep.join(TAGS[j % len(TAGS)] for j in range(i, i + 1 + i % 2))}
            for i in range(n)]


def _kaggle_layout(root: Path) -> Path:
    """A Kaggle-shaped folder: ``Id,Tags`` train with '|'-separated string labels, an ``Id``-only
    test, an ``Id,Predicted`` sample submission, images zipped as loose ``<id>.png`` files (ids
    carry no extension), no captions."""
    train, test = _tag_rows(30), [{"Id": f"r{i}"} for i in range(30, 40)]
    _csv(root / "train.csv", train)
    _csv(root / "test.csv", test)
    _csv(root / "sample_submission.csv", [{"Id": r["Id"], "Predicted": "green"} for r in test])
    with zipfile.ZipFile(root / "images.zip", "w") as zf:
        for i, row in enumerate(train + test):
            _png(root / "tmp.png", i)
            zf.write(root / "tmp.png", f"{row['Id']}.png")
    (root / "tmp.png").unlink()
    return root


def test_kaggle_layout_pipe_labels_id_predicted_zipped_images_no_captions(project: Path, capsys) -> None:
    comp_dir = _kaggle_layout(project / "input" / "leaves")
    rc, out, err = _init(capsys, comp_dir)
    assert rc == 0, err
    data = yaml.safe_load((project / "configs" / "data" / "leaves.yaml").read_text())["data"]  # name = folder's
    assert {k: data[k] for k in ("id_col", "label_col", "label_sep", "caption_col", "image_dir", "image_ext",
                                 "test_csv", "sample_submission")} == {
        "id_col": "Id", "label_col": "Tags", "label_sep": "|", "caption_col": None, "image_dir": "images",
        "image_ext": ".png", "test_csv": "test.csv", "sample_submission": "sample_submission.csv"}
    assert data["root"] == "input/leaves"  # inside the project: relative, so the project can move
    assert "labels: column `Tags`, separator '|', 5 labels from 30 rows (strings" in out
    assert "header `Id,Predicted`" in out and "unzipped images" in out
    assert "train id='r0'  labels=['Red Circle']  image=" in out  # the first rows, as read back
    comp = load_competition(load_config("leaves").data)
    assert comp.classes == sorted(TAGS) and comp.y().sum() == sum(1 + i % 2 for i in range(30))
    assert sorted(os.listdir(comp_dir / "images")) == sorted(f"r{i}.png" for i in range(40))
    assert not [n for n in os.listdir(comp_dir) if n.startswith(".")]  # no temp folder left behind


def test_a_zip_of_one_folder_is_described_from_inside_it(project: Path, capsys) -> None:
    """``Dataset.zip`` holding ``Dataset/{train,test}.csv`` and the images, as course
    competitions ship: the YAML's root is the folder the files are in, test set included."""
    shipped = _kaggle_layout(project / "input" / "staging" / "Dataset")
    comp_dir = project / "input" / "course"
    comp_dir.mkdir(parents=True)
    with zipfile.ZipFile(comp_dir / "Dataset.zip", "w") as zf:
        for f in sorted(shipped.rglob("*")):
            zf.write(f, f.relative_to(shipped.parent))
    rc, out, err = _init(capsys, comp_dir)
    assert rc == 0, err
    data = yaml.safe_load((project / "configs" / "data" / "course.yaml").read_text())["data"]
    assert data["root"] == "input/course/Dataset" and data["test_csv"] == "test.csv"
    assert data["sample_submission"] == "sample_submission.csv" and data["image_dir"] == "images"
    assert "described Dataset/" in out
    assert len(load_competition(load_config("course").data).test) == 10


def test_every_written_setting_carries_its_reason(project: Path, capsys) -> None:
    _init(capsys, _kaggle_layout(project / "input" / "leaves"), "--metric", "micro")
    text = (project / "configs" / "data" / "leaves.yaml").read_text()
    settings = [line for line in text.splitlines() if line.startswith("  ") and not line.lstrip().startswith("#")]
    assert settings and all("  # " in line for line in settings)
    assert load_config("leaves").data.metric == "micro" and load_config("leaves").folds.n_splits == 5


def test_ids_with_and_without_extensions_and_dotted_ids(project: Path, capsys) -> None:
    comp_dir = project / "input" / "mixed"
    ids = [f"p{i}.jpg" if i % 2 else f"img.p{i}" for i in range(24)]  # half carry .jpg; 'img.p0' has a dot
    _csv(comp_dir / "train.csv", [{"ImageID": i, "Labels": str(1 + k % 3), "Caption": f"a photo of thing {k}"}
                                  for k, i in enumerate(ids[:20])])
    _csv(comp_dir / "test.csv", [{"ImageID": i, "Caption": "another photo of a thing"} for i in ids[20:]])
    for k, i in enumerate(ids):
        _png(comp_dir / "images" / (i if i.endswith(".jpg") else i + ".jpg"), k)
    rc, out, err = _init(capsys, comp_dir)
    assert rc == 0, err
    cfg = load_config("mixed").data
    assert (cfg.image_dir, cfg.image_ext, cfg.caption_col) == ("images", ".jpg", "Caption")
    assert "one label a row" in out  # single-label cells: no separator to infer


def test_a_zip_never_unzips_over_an_existing_folder_and_a_zipped_csv_is_unzipped(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"mine")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as zf:
        zf.writestr("images/a.png", b"theirs")
        zf.writestr("images/b.png", b"theirs")
    with zipfile.ZipFile(tmp_path / "train.csv.zip", "w") as zf:
        zf.writestr("train.csv", "ImageID,Labels\n")
    assert "left as they are" in unzip_beside(tmp_path / "images.zip")
    assert (tmp_path / "images" / "a.png").read_bytes() == b"mine" and not (tmp_path / "images" / "b.png").exists()
    assert "unzipped train.csv" in unzip_beside(tmp_path / "train.csv.zip")
    assert (tmp_path / "train.csv").read_text() == "ImageID,Labels\n"
    assert "nothing unzipped" in unzip_beside(tmp_path / "train.csv.zip")  # a second run changes nothing


def test_a_zip_reaching_outside_its_folder_is_refused(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../outside.txt", b"x")
    with pytest.raises(UserError, match="outside"):
        unzip_beside(tmp_path / "evil.zip")
    assert not (tmp_path.parent / "outside.txt").exists()


def _two_label_columns(root: Path) -> Path:
    """Train with two label-like columns absent from test: which one is the target?"""
    rows = [{"ImageID": f"{i}.jpg", "Labels": f"{i % 3} {3 + i % 5}", "Tags": str(i % 4), "Caption": f"photo {i} of a cat"}
            for i in range(20)]
    _csv(root / "train.csv", rows)
    _csv(root / "test.csv", [{"ImageID": f"{i}.jpg", "Caption": "photo of a dog"} for i in range(20, 25)])
    return root


def test_two_candidate_label_columns_ask_for_labels_then_the_flag_decides(project: Path, capsys) -> None:
    comp_dir = _two_label_columns(project / "input" / "two")
    rc, _, err = _init(capsys, comp_dir)
    assert rc == 2 and "could be the label column: ['Labels', 'Tags']" in err and "--labels COL" in err
    assert not (project / "configs" / "data" / "two.yaml").exists()
    rc, out, err = _init(capsys, comp_dir, "--labels", "Tags")
    assert rc == 0, err
    assert load_config("two").data.label_col == "Tags" and "given (--labels)" in out


def test_ids_that_match_no_image_name_the_images_flag(project: Path, capsys) -> None:
    comp_dir = _two_label_columns(project / "input" / "noimg")
    for i in range(25):
        _png(comp_dir / "pictures" / f"img_{i}.jpg", i)  # another naming: no id has its image
    rc, _, err = _init(capsys, comp_dir, "--labels", "Labels")
    assert rc == 2 and "ids that match no image" in err and "--images DIR" in err and "--images none" in err
    assert "0 of 25 sampled ids" in err
    rc, out, err = _init(capsys, comp_dir, "--labels", "Labels", "--images", "none")
    assert rc == 0, err
    assert load_config("noimg").data.image_dir is None and "given (--images none)" in out


def test_a_sample_submission_of_another_test_set_and_two_image_folders_are_refused(project: Path, capsys) -> None:
    comp_dir = _kaggle_layout(project / "input" / "other")
    _csv(comp_dir / "sample_submission.csv", [{"Id": f"s{i}", "Predicted": "green"} for i in range(10)])
    rc, _, err = _init(capsys, comp_dir)
    assert rc == 2 and "does not list the ids of test.csv" in err and "--sample" in err
    shutil.copytree(comp_dir / "images", comp_dir / "images_small")  # extracted by the first run
    rc, _, err = _init(capsys, comp_dir, "--sample", "none")
    assert rc == 2 and "['images', 'images_small']" in err and "--images DIR" in err
    rc, _, err = _init(capsys, comp_dir, "--sample", "none", "--images", "images_small", "--caption", "none")
    assert rc == 0, err
    cfg = load_config("other").data
    assert (cfg.sample_submission, cfg.image_dir, cfg.image_ext) == (None, "images_small", ".png")


def test_two_separators_and_spaces_inside_labels_ask_for_sep(project: Path, capsys) -> None:
    both = project / "input" / "both"
    _csv(both / "train.csv", [{"Id": f"x{i}", "Tags": ["a|b", "c;d", "a", "b|c", "d"][i % 5]} for i in range(20)])
    rc, _, err = _init(capsys, both)
    assert rc == 2 and "2 separators" in err and "--sep" in err
    spaced = project / "input" / "spaced"
    _csv(spaced / "train.csv", [{"Id": f"x{i}", "Tags": ["Red Circle", "Blue Square", "Red Square"][i % 3]}
                                for i in range(20)])
    rc, _, err = _init(capsys, spaced)
    assert rc == 2 and "--sep '|'" in err and "--sep ' '" in err
    rc, _, err = _init(capsys, spaced, "--sep", "pipe")
    assert rc == 0, err
    assert load_competition(load_config("spaced").data).classes == ["Blue Square", "Red Circle", "Red Square"]


def test_two_train_files_and_no_train_file_name_the_train_flag(project: Path, capsys) -> None:
    comp_dir = project / "input" / "files"
    _csv(comp_dir / "train.csv", _tag_rows(10))
    _csv(comp_dir / "train_old.csv", _tag_rows(10))
    rc, _, err = _init(capsys, comp_dir)
    assert rc == 2 and "--train FILE" in err
    assert _init(capsys, comp_dir, "--train", "train.csv")[0] == 0
    _csv(project / "input" / "empty" / "data.csv", _tag_rows(10))
    rc, _, err = _init(capsys, project / "input" / "empty")
    assert rc == 2 and "no CSV" in err and "--train FILE" in err


def test_an_existing_yaml_is_never_overwritten(project: Path, capsys) -> None:
    comp_dir = _kaggle_layout(project / "input" / "demo")  # the shipped demo.yaml has this name
    before = (project / "configs" / "data" / "demo.yaml").read_text()
    rc, _, err = _init(capsys, comp_dir, "--force")
    assert rc == 2 and "never overwrites" in err and "--name" in err
    assert (project / "configs" / "data" / "demo.yaml").read_text() == before
    assert _init(capsys, comp_dir, "--name", "demo2")[0] == 0


def test_a_config_that_does_not_read_is_not_kept_and_the_named_setting_fixes_it(project: Path, capsys) -> None:
    comp_dir = project / "input" / "gaps"
    rows = _tag_rows(20)
    rows[3]["Tags"] = ""  # a row without labels: an answer in some competitions, an error in others
    _csv(comp_dir / "train.csv", rows)
    rc, _, err = _init(capsys, comp_dir)
    assert rc == 2 and "data.allow_empty_labels=true" in err and "not kept" in err
    assert not (project / "configs" / "data" / "gaps.yaml").exists()
    rc, _, err = _init(capsys, comp_dir, "data.allow_empty_labels=true")
    assert rc == 0, err
    assert load_config("gaps").data.allow_empty_labels is True


def _listing(root: Path) -> list[tuple[str, int]]:
    """Every file under ``root`` with its mtime: proof that nothing there was written."""
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


SHIPPED = {"comp5329": [], "coco_mini": ["folds.n_splits=3"], "fashion": []}  # coco_mini ships 3 folds


@needs_shared
@pytest.mark.filterwarnings("ignore:label .* has fewer positives")  # coco_mini's rare labels, as shipped
@pytest.mark.parametrize("name", list(SHIPPED))
def test_the_inferred_yaml_reads_the_shipped_configs_rows_labels_and_folds(project: Path, capsys, name: str) -> None:
    source, before = SHARED / name, _listing(SHARED / name)
    rc, _, err = _init(capsys, source, "--name", f"{name}_inferred", *SHIPPED[name])
    assert rc == 0, err
    shipped = load_config(name, None, [f"data.root={source}"])
    inferred = load_config(f"{name}_inferred")
    keys = ("train_csv", "test_csv", "id_col", "label_col", "caption_col", "label_sep", "image_dir", "image_ext")
    assert {k: getattr(inferred.data, k) for k in keys} == {k: getattr(shipped.data, k) for k in keys}
    a, b = (load_competition(c.data, use_saved=False) for c in (shipped, inferred))
    assert a.classes == b.classes and a.ids("train") == b.ids("train") and a.ids("test") == b.ids("test")
    assert a.train["caption"].tolist() == b.train["caption"].tolist() and (a.y() == b.y()).all()
    for data, extra in ((name, [f"data.root={source}"]), (f"{name}_inferred", [])):
        assert main(["folds", "--data", data, "data.check_images=false", *extra]) == 0
    folds = [pd.read_csv(project / "folds" / f"{d}.csv", dtype=str) for d in (name, f"{name}_inferred")]
    pd.testing.assert_frame_equal(folds[0], folds[1])
    labels = [yaml.safe_load((project / "folds" / f"{d}.labels.json").read_text()) for d in (name, f"{name}_inferred")]
    assert labels[0] == labels[1]
    assert _listing(source) == before  # nothing under ../shared was written
