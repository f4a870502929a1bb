"""The data layer: real quirky CSVs load, every bad input gives a clear, row-naming error."""

from pathlib import Path

import pytest

from mmfold.config import DataConfig, load_config
from mmfold.data.competition import load_competition, load_folds, read_table
from mmfold.errors import DataError
from tests.conftest import SHARED, needs_shared, write_competition


def _cfg(name: str = "tiny", **kw) -> DataConfig:
    return load_config(name, None, [f"data.{k}={v}" for k, v in kw.items()]).data


def _rewrite(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new, 1))


@needs_shared
def test_comp5329_real_csvs_load_with_quirky_rows_intact() -> None:
    cfg = DataConfig(name="comp5329", root=str(SHARED / "comp5329"), image_dir=None)
    comp = load_competition(cfg, use_saved=False)
    assert (len(comp.train), len(comp.test)) == (24000, 10000)
    assert len(comp.classes) == 18 and comp.classes[:3] == ["1", "2", "3"] and "12" not in comp.classes
    train = comp.train.set_index("id")
    assert train.loc["24624.jpg", "caption"].count("\n") == 14
    assert comp.test.set_index("id").loc["36889.jpg", "caption"] == 'Stop sign with added war" annotation at an intersection."'
    assert "Unnamed: 3" not in comp.train.columns
    # unquoted commas in captions (no trailing comma on those lines) are joined back
    assert train.loc["18112.jpg", "caption"] == "A small hand is forming thethumbs up, signal."
    assert train.loc["27167.jpg", "caption"].endswith("St, along with a sign saying there is a $350 penalty is you honk.")
    assert comp.y().sum(0)[comp.classes.index("14")] == 202


def test_bom_crlf_trailing_spaces_and_stray_separators(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_bytes('\ufeffImageID,Labels,Caption\r\n a.jpg , 1  2 ,"two\nlines"\r\nb.jpg,3,ok\r\n'.encode())
    df = read_table(p)
    assert list(df.columns) == ["ImageID", "Labels", "Caption"]
    cfg = DataConfig(name="t", root=str(tmp_path), train_csv="t.csv", test_csv=None, image_dir=None)
    comp = load_competition(cfg)
    assert comp.train["id"].tolist() == ["a.jpg", "b.jpg"]
    assert comp.train["labels"][0] == ["1", "2"] and comp.train["caption"][0] == "two\nlines"


def test_unescaped_quotes_inside_quoted_field_are_repaired(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text('ImageID,Labels,Caption\na.jpg,1,"A "big" dog, running"\nb.jpg,2,plain\n')
    df = read_table(p)
    assert df["Caption"].tolist() == ['A "big" dog, running', "plain"]


def test_string_and_int_labels(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("ImageID,Labels,Caption\na,cat dog,x\nb,dog,y\nc,10 2,z\n")
    cfg = DataConfig(name="t", root=str(tmp_path), train_csv="t.csv", test_csv=None, image_dir=None)
    assert load_competition(cfg).classes == ["10", "2", "cat", "dog"]  # mixed -> alphabetical
    (tmp_path / "t.csv").write_text("ImageID,Labels,Caption\na,10 2,x\nb,1,y\n")
    assert load_competition(cfg).classes == ["1", "2", "10"]  # ints -> numeric order


def test_non_utf8_names_line(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_bytes(b"ImageID,Labels,Caption\na,1,ok\nb,1,caf\xe9\n")
    with pytest.raises(DataError, match=r"t.csv: line 3: .*data.encoding=latin-1"):
        read_table(tmp_path / "t.csv")
    assert read_table(tmp_path / "t.csv", encoding="latin-1")["Caption"][1] == "café"


def test_unquoted_commas_in_caption_are_joined_back(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("ImageID,Labels,Caption\na,1,ok\nb,1,x, y,z\n")
    with pytest.warns(UserWarning, match="1 line"):
        df = read_table(tmp_path / "t.csv")
    assert df["Caption"].tolist() == ["ok", "x, y,z"]


def test_broken_quoting_names_line(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text('ImageID,Labels,Caption\na,1,ok\nb,1,"never closed\n')
    with pytest.raises(DataError, match=r"t.csv: cannot parse CSV: line 3"):
        read_table(tmp_path / "t.csv")


def test_duplicate_ids_named(tiny: Path) -> None:
    _rewrite(tiny / "train.csv", "1.jpg,", "0.jpg,")
    with pytest.raises(DataError, match=r"duplicate ids in row 1 \(id '0.jpg'\), row 2 \(id '0.jpg'\)"):
        load_competition(_cfg())


def test_a_test_file_with_a_header_only_is_refused_for_prediction(tiny: Path) -> None:
    """Training may run without test rows; predicting them is an error naming the file, not a
    crash in predict or the bundle."""
    from mmfold.data.competition import load_test_set

    (tiny / "test.csv").write_text("ImageID,Caption\n")
    comp = load_competition(_cfg())
    assert comp.test is not None and comp.test.empty
    with pytest.raises(DataError, match=r"test.csv: no rows below the header: nothing to predict"):
        load_test_set(_cfg(), comp.classes)


def test_empty_labels_error_or_policy(tiny: Path) -> None:
    lines = (tiny / "train.csv").read_text().splitlines()
    lines[3] = "2.jpg,,no labels here"
    (tiny / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"empty label list in row 3 \(id '2.jpg'\).*allow_empty_labels"):
        load_competition(_cfg())
    comp = load_competition(_cfg(allow_empty_labels="true"))
    assert comp.y()[2].sum() == 0


def test_missing_and_zero_byte_and_corrupt_images(tiny: Path) -> None:
    (tiny / "images" / "3.jpg").unlink()
    (tiny / "images" / "5.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 image problem.*3.jpg \(missing\).*5.jpg \(zero bytes\)"):
        load_competition(_cfg())
    (tiny / "images" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tiny / "images" / "5.jpg").write_bytes((tiny / "images" / "6.jpg").read_bytes())
    comp = load_competition(_cfg())
    with pytest.raises(DataError, match=r"1 unreadable image.*3.jpg"):
        comp.verify_images()


def test_test_file_missing_columns_and_unseen_labels(tiny: Path) -> None:
    (tiny / "test.csv").write_text("ImageID\n40.jpg\n")
    with pytest.raises(DataError, match=r"test.csv: missing column\(s\) 'Caption' \(data.caption_col\)"):
        load_competition(_cfg())
    (tiny / "test.csv").write_text("ImageID,Labels,Caption\n40.jpg,1 99,x\n41.jpg,2,y\n")
    with pytest.raises(DataError, match=r"labels \['99'\] never occur in train: row 1 \(id '40.jpg'\)"):
        load_competition(_cfg())


def test_test_ids_overlapping_train(tiny: Path) -> None:
    _rewrite(tiny / "test.csv", "40.jpg,", "7.jpg,")
    with pytest.raises(DataError, match=r"test id\(s\) also in train: 7.jpg"):
        load_competition(_cfg())


def test_optional_caption_and_images(project: Path) -> None:
    data = write_competition(project, "noimg", images=False)
    comp = load_competition(_cfg("noimg"))
    assert not comp.has_images and comp.has_captions
    comp = load_competition(_cfg("noimg", caption_col="null"))
    assert not comp.has_captions and (comp.train["caption"] == "").all()
    assert data.exists()


def test_saved_vocabulary_must_match_train(tiny: Path, project: Path) -> None:
    (project / "folds").mkdir()
    (project / "folds" / "tiny.labels.json").write_text('{"classes": ["1", "2"]}')
    with pytest.raises(DataError, match=r"labels \['3', '4'\] are not in the label vocabulary"):
        load_competition(_cfg())


def test_folds_file_from_another_dataset(tiny: Path, project: Path) -> None:
    comp = load_competition(_cfg())
    with pytest.raises(DataError, match="run `make folds DATA=tiny` first"):
        load_folds(comp)
    (project / "folds").mkdir()
    (project / "folds" / "tiny.csv").write_text("ImageID,fold\n" + "".join(f"x{i}.jpg,{i % 3}\n" for i in range(40)))
    with pytest.raises(DataError, match=r"40 train ids without a fold.*another dataset"):
        load_folds(comp)
