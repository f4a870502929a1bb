"""Quirks of real competition files that used to pass silently or fail misleadingly.

Each test names the quirk; every one of them failed on the reader before it was fixed.
"""

from __future__ import annotations

import io
import itertools
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from mmfold.data import competition as data_mod
from mmfold import paths
from mmfold.cli import main
from mmfold.config import load_config
from mmfold.data.competition import load_competition, load_folds
from mmfold.errors import DataError

CAPTIONS = ["a dog runs", "two cats", "a red car", "people walk", "a bird sits"]
LABELS = ["1", "2 3", "3", "1 4", "2"]


def _cfg(name: str, **kw: object):
    return load_config(name, None, [f"data.{k}={v}" for k, v in kw.items()]).data


def _write_config(project: Path, name: str, **data: object) -> None:
    cfg = {"data": {"root": f"input/{name}", "test_csv": None, "image_dir": None, **data}, "folds": {"n_splits": 3}}
    (project / "configs" / "data" / f"{name}.yaml").write_text(yaml.safe_dump(cfg))


def _write_csv(project: Path, name: str, text: str, file: str = "train.csv", raw: bytes | None = None) -> Path:
    folder = project / "input" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file).write_bytes(raw if raw is not None else text.encode())
    return folder


def _jpeg(seed: int = 0, size: int = 48) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# 1. unquoted commas on any row, the first and the last included ---------------------------


@pytest.mark.parametrize("style", ["lf", "crlf_bom", "no_final_newline"])
@pytest.mark.parametrize("extra", [1, 3])
@pytest.mark.parametrize("row", [0, 2, 4])
def test_unquoted_commas_on_any_row_parse_like_the_others(project: Path, row: int, extra: int, style: str) -> None:
    captions = list(CAPTIONS)
    captions[row] = "a dog" + ", and more" * extra
    lines = ["ImageID,Labels,Caption"] + [f"{i}.jpg,{l},{c}" for i, (l, c) in enumerate(zip(LABELS, captions))]
    nl = "\r\n" if style == "crlf_bom" else "\n"
    text = nl.join(lines) + ("" if style == "no_final_newline" else nl)
    raw = ("\ufeff" + text).encode() if style == "crlf_bom" else text.encode()
    _write_csv(project, "q", text, raw=raw)
    _write_config(project, "q")
    with pytest.warns(UserWarning, match=rf"1 line\(s\) had unquoted commas.*line {row + 2}"):
        comp = load_competition(_cfg("q"))
    assert comp.train["id"].tolist() == [f"{i}.jpg" for i in range(5)]
    assert comp.train["labels"].tolist() == [l.split() for l in LABELS]
    assert comp.train["caption"].tolist() == captions
    assert comp.classes == ["1", "2", "3", "4"]


def test_trailing_comma_on_data_rows_but_not_header(project: Path) -> None:
    _write_csv(project, "q", "ImageID,Labels,Caption\n0.jpg,1,a dog,\n1.jpg,2,a cat,\n")
    _write_config(project, "q")
    comp = load_competition(_cfg("q"))
    assert comp.train["caption"].tolist() == ["a dog", "a cat"]
    assert comp.train["labels"].tolist() == [["1"], ["2"]]


def test_overflow_into_a_label_column_stops_naming_file_and_line(project: Path) -> None:
    _write_csv(project, "q", "ImageID,Caption,Labels\n0.jpg,a dog, a cat,1\n1.jpg,ok,2\n")
    _write_config(project, "q")
    with pytest.raises(DataError, match=r"train.csv: line 2: .*Labels.*not free text.*quote"):
        load_competition(_cfg("q"))


# 3. ids with a dot, and a hint for the right image_ext --------------------------------------


def _image_competition(project: Path, ids: list[str], files: list[str], **data: object) -> None:
    folder = _write_csv(project, "im", "ImageID,Labels,Caption\n" + "".join(f"{i},1 2,cap {i}\n" for i in ids))
    (folder / "images").mkdir()
    for k, f in enumerate(files):
        (folder / "images" / f).write_bytes(_jpeg(k))
    _write_config(project, "im", image_dir="images", **data)


def test_image_ext_applies_to_ids_with_a_dot(project: Path) -> None:
    ids = ["img.tr00000", "img.tr00001", "photo.JPG", "pic.png"]
    _image_competition(project, ids, ["img.tr00000.jpg", "img.tr00001.jpg", "photo.JPG", "pic.png"], image_ext=".jpg")
    comp = load_competition(_cfg("im"))
    assert [comp.image_path(i).name for i in ids] == ["img.tr00000.jpg", "img.tr00001.jpg", "photo.JPG", "pic.png"]
    comp.verify_images()


@pytest.mark.parametrize("image_ext", ["", ".jpg"])
def test_missing_image_names_the_extension_that_exists(project: Path, image_ext: str) -> None:
    _image_competition(project, ["img_tr00000", "img_tr00001"], ["img_tr00000.png", "img_tr00001.png"], image_ext=image_ext)
    name = "img_tr00000" + image_ext
    with pytest.raises(DataError, match=rf"{name} \(missing; img_tr00000.png exists: set data.image_ext=.png\)"):
        load_competition(_cfg("im"))


# 4. label quirks: case/space variants, a wrong separator, unquoted comma-separated labels ---


def _labels_competition(project: Path, cells: list[str], **data: object) -> None:
    body = "".join(f'{i}.jpg,"{c}",caption {i}\n' for i, c in enumerate(cells))
    _write_csv(project, "lab", "ImageID,Labels,Caption\n" + body)
    _write_config(project, "lab", **data)


def test_labels_differing_only_in_case_or_spaces_are_named(project: Path) -> None:
    cells = ["Red Circle|STRIPED", "red circle", " Striped |Blue", "Blue", "red  circle|blue"]
    _labels_competition(project, cells, label_sep="|")
    with pytest.warns(UserWarning, match=r"differ only in case or spaces") as rec:
        load_competition(_cfg("lab"))
    msg = next(str(w.message) for w in rec if "differ only" in str(w.message))
    assert "['Red Circle', 'red  circle', 'red circle']" in msg
    assert "['STRIPED', 'Striped']" in msg and "['Blue', 'blue']" in msg


def _combination_cells(sep: str, n_rows: int = 200) -> list[str]:
    rng = np.random.default_rng(0)
    names = ["red", "blue", "green", "circle", "square", "star", "big", "small", "dotted"]
    return [sep.join(sorted(rng.choice(names, int(rng.integers(1, 4)), replace=False))) for _ in range(n_rows)]


@pytest.mark.parametrize(("written", "configured"), [("|", " "), (" ", "|"), (";", " "), (",", "|")])
def test_wrong_label_separator_is_named(project: Path, written: str, configured: str) -> None:
    _labels_competition(project, _combination_cells(written), label_sep=configured)
    quoted = re.escape(repr(written))
    with pytest.warns(UserWarning, match=rf"look {quoted}-separated.*set data.label_sep={quoted}"):
        comp = load_competition(_cfg("lab"))
    assert len(comp.classes) > 9


@pytest.mark.parametrize("sep", ["|", " "])
def test_right_label_separator_gives_no_warning(project: Path, sep: str) -> None:
    _labels_competition(project, _combination_cells(sep), label_sep=sep)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_competition(_cfg("lab")).classes) == 9


def test_labels_with_spaces_inside_are_not_a_separator_problem(project: Path) -> None:
    cells = [f"{c} {s}" for c, s in itertools.product(["Red", "Blue", "Dark Green"], ["Circle", "Square", "Star"])]
    _labels_competition(project, cells * 3, label_sep="|")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_competition(_cfg("lab")).classes) == 9


def test_unquoted_comma_separated_labels_are_explained(project: Path) -> None:
    text = "ImageID,Labels,Caption\n0.jpg,red,blue,a caption\n1.jpg,blue,other\n2.jpg,green,x\n3.jpg,red,z\n"
    _write_csv(project, "lab", text)
    _write_config(project, "lab", label_sep=",")
    with pytest.raises(DataError, match=r"train.csv: line 2: .*label list has commas but is not quoted.*data.label_sep"):
        load_competition(_cfg("lab"))


def test_unquoted_comma_separated_labels_in_the_last_column_are_joined_back(project: Path) -> None:
    _write_csv(project, "lab", "ImageID,Labels\n0.jpg,red,blue\n1.jpg,blue\n2.jpg,green,red,blue\n")
    _write_config(project, "lab", label_sep=",", caption_col=None)
    with pytest.warns(UserWarning, match="2 line"):
        comp = load_competition(_cfg("lab"))
    assert comp.train["id"].tolist() == ["0.jpg", "1.jpg", "2.jpg"]
    assert comp.train["labels"].tolist() == [["red", "blue"], ["blue"], ["green", "red", "blue"]]


# 5. a full decode of every image, cached; all bad files in one error; dropping bad train rows


def _break_images(tiny: Path) -> list[str]:
    """Truncate two JPEGs (PIL's verify() passes them) and garble a third."""
    img = tiny / "images"
    for name, cut in (("3.jpg", 2), ("8.jpg", 200)):
        (img / name).write_bytes(_jpeg(int(name[0]), size=64)[:-cut])
    (img / "41.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # a test image
    return ["3.jpg", "8.jpg", "41.jpg"]


def test_truncated_jpegs_are_all_listed_in_one_error(tiny: Path) -> None:
    bad = _break_images(tiny)
    comp = load_competition(load_config("tiny").data)
    with pytest.raises(DataError, match=r"3 unreadable image\(s\)") as err:
        comp.verify_images()
    msg = str(err.value)
    assert all(f"images/{b} (" in msg for b in bad) and "truncated" in msg
    assert "data.drop_bad_images=true" in msg


def test_image_check_is_cached_by_size_and_mtime(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    comp = load_competition(load_config("tiny").data)
    calls: list[Path] = []
    decode = data_mod._decode_problem
    monkeypatch.setattr(data_mod, "_decode_problem", lambda p: calls.append(p) or decode(p))
    comp.verify_images()
    assert len(calls) == 50 and any(paths.cache_dir("tiny").iterdir())
    calls.clear()
    comp.verify_images()
    assert calls == []
    (tiny / "images" / "5.jpg").write_bytes(_jpeg(5, size=64)[:-50])
    with pytest.raises(DataError, match=r"1 unreadable image\(s\).*5.jpg"):
        comp.verify_images()
    assert [p.name for p in calls] == ["5.jpg"]


def test_many_bad_images_all_listed_in_a_file(tiny: Path) -> None:
    for i in range(12):
        (tiny / "images" / f"{i}.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"12 unreadable image\(s\).*and 2 more") as err:
        load_competition(load_config("tiny").data).verify_images()
    listed = Path(str(err.value).split("all listed in ")[1].split(")")[0])
    names = sorted(Path(line.split(" (")[0]).name for line in listed.read_text().splitlines())
    assert names == sorted(f"{i}.jpg" for i in range(12))


def test_drop_bad_images_drops_train_rows_everywhere(tiny: Path, project: Path) -> None:
    _break_images(tiny)
    (tiny / "images" / "41.jpg").write_bytes(_jpeg(41))  # test images fine
    with pytest.warns(UserWarning, match=r"dropped 2 train row\(s\).*3.jpg.*8.jpg"):
        assert main(["folds", "--data", "tiny", "data.drop_bad_images=true"]) == 0
    folds = pd.read_csv(project / "folds" / "tiny.csv", dtype={"ImageID": str})
    assert len(folds) == 38 and not {"3.jpg", "8.jpg"} & set(folds["ImageID"])
    with pytest.warns(UserWarning, match="dropped 2 train row"):
        comp = load_competition(_cfg("tiny", drop_bad_images="true"))
    assert len(comp.train) == 38 and len(load_folds(comp)) == 38 and len(comp.y()) == 38
    assert main(["folds", "--data", "tiny"]) == 2  # without the flag: the folds exist ...
    with pytest.raises(DataError, match="does not match"):  # ... and do not match all rows
        load_folds(load_competition(_cfg("tiny")))


def test_drop_bad_images_still_refuses_bad_test_images(tiny: Path) -> None:
    _break_images(tiny)
    with pytest.raises(DataError, match=r"41.jpg.*every test id"):
        load_competition(_cfg("tiny", drop_bad_images="true"))
