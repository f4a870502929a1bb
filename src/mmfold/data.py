"""Reading a competition: robust CSV parsing, validation with row-level errors, folds lookup.

Real competition files are messy (spreadsheet re-saves, trailing commas, captions with
newlines and stray quotes, BOMs). This module turns them into one clean :class:`Competition`
or fails with a message naming the file and rows, so no later stage has to guess.
"""

from __future__ import annotations

import csv
import io as _io
import json
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from mmfold import paths
from mmfold.config import DataConfig
from mmfold.errors import DataError

MAX_LISTED = 10  # rows named in an error message before "... and N more"


def _listing(items: list) -> str:
    """First few offending items, then a count, so errors stay readable on 30k rows."""
    head = ", ".join(str(i) for i in items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return head + (f" ... and {more} more" if more > 0 else "")


def read_table(path: Path, encoding: str = "utf-8") -> pd.DataFrame:
    """Read a competition CSV as strings, tolerating what spreadsheets do to free text.

    Handles a BOM, CRLF, quoted captions with embedded newlines, a trailing comma on every
    line (an empty ``Unnamed: N`` column, dropped), unquoted commas inside the last column
    (the overflow is joined back into it, as COMP5329's captions need) and quotes left
    unescaped inside quoted fields (repaired the way COMP5329 competitors did by hand).

    Raises:
        DataError: missing file, wrong encoding or broken quoting, naming the line.
    """
    if not path.exists():
        raise DataError(f"{path}: file not found")
    text = _decode(path, encoding)
    escape = None
    if _quote_error(text):
        text, escape = _repair_quotes(text), "\\"
        err = _quote_error(text, escape)
        if err:
            raise DataError(f"{path}: cannot parse CSV: {err}")
    try:
        df = _parse(text, escape)
    except pd.errors.ParserError:
        df = _parse_overflow(text, escape, path)
    return _fold_trailing(df)


def _decode(path: Path, encoding: str) -> str:
    """Decode bytes (BOM stripped), naming the line of the first undecodable byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig" if encoding.lower() in ("utf-8", "utf8") else encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: bytes that are not valid {encoding} ({e.reason}); "
            f"set data.encoding=latin-1 (or the file's real encoding) to read it"
        ) from e


def _quote_error(text: str, escapechar: str | None = None) -> str | None:
    """First quoting error as 'line N: reason' (the csv module is strict, pandas is not)."""
    reader = csv.reader(_io.StringIO(text), strict=True, escapechar=escapechar)
    try:
        for _ in reader:
            pass
    except csv.Error as e:
        return f"line {reader.line_num}: {e}"
    return None


def _parse(text: str, escapechar: str | None = None) -> pd.DataFrame:
    """pandas C parser, everything as strings, no NA guessing (a caption 'NA' stays 'NA')."""
    return pd.read_csv(_io.StringIO(text), dtype=str, keep_default_na=False, escapechar=escapechar)


def _parse_overflow(text: str, escapechar: str | None, path: Path) -> pd.DataFrame:
    """Lines with more fields than the header: join the overflow into the last column."""
    width = len(next(csv.reader(_io.StringIO(text))))
    merged: list[int] = []

    def fold(fields: list[str]) -> list[str]:
        merged.append(len(merged))
        return fields[: width - 1] + [",".join(fields[width - 1 :])]

    df = pd.read_csv(_io.StringIO(text), dtype=str, keep_default_na=False, escapechar=escapechar,
                     engine="python", on_bad_lines=fold)
    warnings.warn(f"{path}: {len(merged)} line(s) had unquoted commas in the last column; joined back")
    return df


_INNER_QUOTE = re.compile(r'(?<=[^,\n"])"(?=[^,\n"])')


def _repair_quotes(text: str) -> str:
    """Escape quotes that sit inside a field (not next to a comma or line end)."""
    return _INNER_QUOTE.sub(r'\\"', text.replace("\\", "\\\\"))


def _fold_trailing(df: pd.DataFrame) -> pd.DataFrame:
    """Fold trailing ``Unnamed: N`` columns (trailing commas, unquoted commas) into the last
    named column, then drop them: free text is always the last column in these files."""
    df.columns = [c.strip() for c in df.columns]
    extra = [c for c in df.columns if c.startswith("Unnamed:")]
    named = [c for c in df.columns if c not in extra]
    if extra and named and list(df.columns[-len(extra):]) == extra:
        last = named[-1]
        for c in extra:
            has = df[c] != ""
            df.loc[has, last] = df.loc[has, last] + "," + df.loc[has, c]
        df = df.drop(columns=extra)
    return df


def split_labels(cell: str, sep: str) -> list[str]:
    """Label tokens of one cell; stray/double separators and spaces are ignored."""
    return [t.strip() for t in str(cell).split(sep) if t.strip()]


def sort_classes(tokens: set[str]) -> list[str]:
    """Numeric tokens sort numerically (2 before 10), others alphabetically."""
    if all(re.fullmatch(r"-?\d+", t) for t in tokens):
        return sorted(tokens, key=int)
    return sorted(tokens)


@dataclass
class Competition:
    """A validated competition: train/test tables, label vocabulary, image locations."""

    cfg: DataConfig
    train: pd.DataFrame
    test: pd.DataFrame | None
    classes: list[str]

    @property
    def has_images(self) -> bool:
        """Whether the data config names an image folder."""
        return bool(self.cfg.image_dir)

    @property
    def has_captions(self) -> bool:
        """Whether the data config names a caption column."""
        return bool(self.cfg.caption_col)

    @cached_property
    def _class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def y(self) -> np.ndarray:
        """0/1 label matrix ``(n_train, n_classes)`` in train order."""
        out = np.zeros((len(self.train), len(self.classes)), dtype=np.uint8)
        idx = self._class_index
        for row, labels in enumerate(self.train["labels"]):
            out[row, [idx[t] for t in labels]] = 1
        return out

    def image_path(self, image_id: str) -> Path:
        """Image file of an id (``image_ext`` is appended when the id has no suffix)."""
        name = image_id if not self.cfg.image_ext or Path(image_id).suffix else image_id + self.cfg.image_ext
        return paths.resolve(self.cfg.root) / str(self.cfg.image_dir) / name

    def ids(self, split: str) -> list[str]:
        """Ids of ``train`` or ``test`` in file order."""
        df = self.train if split == "train" else self.test
        return [] if df is None else df["id"].tolist()

    def verify_images(self) -> None:
        """Decode-check every image; raise naming each unreadable file.

        Grayscale, CMYK, RGBA and 16-bit files are fine (converted to RGB later); only files
        PIL cannot decode at all are errors.
        """
        from PIL import Image

        bad = []
        for split in ("train", "test"):
            for image_id in self.ids(split):
                path = self.image_path(image_id)
                try:
                    with Image.open(path) as im:
                        im.verify()
                except Exception as e:  # PIL raises many types for corrupt files
                    bad.append(f"{path} ({type(e).__name__}: {e})")
        if bad:
            raise DataError(f"{len(bad)} unreadable image(s): {_listing(bad)}")


def load_competition(
    cfg: DataConfig, classes: list[str] | None = None, use_saved: bool = True
) -> Competition:
    """Read and validate train/test as the data config describes.

    The label vocabulary comes from ``classes`` if given, else from the one saved with the
    folds (``folds/<data>.labels.json``, unless ``use_saved`` is False), else from train. A saved vocabulary that the train
    file no longer matches is an error, since OOF columns would silently shift.

    Raises:
        DataError: with the file and the offending rows.
    """
    root = paths.resolve(cfg.root)
    if not root.exists():
        raise DataError(f"data folder {root} not found (set data.root=... or run `make demo-data`)")
    train = _load_split(cfg, root / cfg.train_csv, labelled=True)
    test = _load_split(cfg, root / cfg.test_csv, labelled=False) if cfg.test_csv else None
    classes = classes or (use_saved and saved_classes(cfg.name)) or sort_classes({t for ls in train["labels"] for t in ls})
    comp = Competition(cfg=cfg, train=train, test=test, classes=classes)
    _check_labels(comp, train, root / cfg.train_csv, "are not in the label vocabulary")
    if test is not None and "labels" in test:
        _check_labels(comp, test, root / str(cfg.test_csv), "never occur in train")
    _check_overlap(comp)
    if comp.has_images:
        _check_images_exist(comp)
    return comp


def _load_split(cfg: DataConfig, path: Path, labelled: bool) -> pd.DataFrame:
    """One CSV -> ``id``, ``caption``, ``labels`` (+ extra columns), validated."""
    df = read_table(path, cfg.encoding)
    need = [cfg.id_col] + ([cfg.label_col] if labelled else []) + ([cfg.caption_col] if cfg.caption_col else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)} (see configs/data/{cfg.name}.yaml)")
    out = pd.DataFrame({"id": df[cfg.id_col].str.strip()})
    out["caption"] = df[cfg.caption_col].str.strip() if cfg.caption_col else ""
    if cfg.label_col in df.columns:
        out["labels"] = [split_labels(c, cfg.label_sep) for c in df[cfg.label_col]]
    known = {cfg.id_col, cfg.label_col, cfg.caption_col}
    out = pd.concat([out, df[[c for c in df.columns if c not in known]]], axis=1)
    _check_ids(out, path)
    if labelled and not cfg.allow_empty_labels:
        _check_nonempty(out, path)
    return out.reset_index(drop=True)


def _rows(mask: pd.Series | np.ndarray, df: pd.DataFrame) -> list[str]:
    """'row N (id X)' descriptions; rows are 1-based data rows (header excluded)."""
    return [f"row {i + 1} (id {df['id'].iloc[i]!r})" for i in np.flatnonzero(np.asarray(mask))]


def _check_ids(df: pd.DataFrame, path: Path) -> None:
    """Ids must be non-empty and unique: every artifact is keyed by id."""
    empty = df["id"] == ""
    if empty.any():
        raise DataError(f"{path}: empty id in {_listing(_rows(empty, df))}")
    dup = df["id"].duplicated(keep=False)
    if dup.any():
        raise DataError(f"{path}: duplicate ids in {_listing(_rows(dup, df))}")


def _check_nonempty(df: pd.DataFrame, path: Path) -> None:
    """Every train row needs a label unless the config allows empty label lists."""
    empty = df["labels"].map(len) == 0
    if empty.any():
        raise DataError(
            f"{path}: empty label list in {_listing(_rows(empty, df))} "
            "(set data.allow_empty_labels=true if that is a valid answer)"
        )


def _check_labels(comp: Competition, df: pd.DataFrame, path: Path, why: str) -> None:
    """Labels outside the vocabulary would have no column; name them and their rows."""
    known = set(comp.classes)
    bad = df["labels"].map(lambda ls: any(t not in known for t in ls))
    if bad.any():
        tokens = sorted({t for ls in df["labels"][bad] for t in ls if t not in known})
        raise DataError(f"{path}: labels {tokens} {why}: {_listing(_rows(bad, df))}")


def _check_overlap(comp: Competition) -> None:
    """A test id that is also a train id makes OOF and test rows ambiguous."""
    if comp.test is None:
        return
    both = sorted(set(comp.train["id"]) & set(comp.test["id"]))
    if both:
        raise DataError(f"{comp.cfg.test_csv}: {len(both)} test id(s) also in train: {_listing(both)}")


def _check_images_exist(comp: Competition) -> None:
    """Missing or zero-byte image files, named; cheap (stat only)."""
    bad = []
    for split in ("train", "test"):
        for image_id in comp.ids(split):
            p = comp.image_path(image_id)
            if not p.is_file():
                bad.append(f"{p} (missing)")
            elif p.stat().st_size == 0:
                bad.append(f"{p} (zero bytes)")
    if bad:
        raise DataError(f"{len(bad)} image problem(s): {_listing(bad)}")


def saved_classes(data: str) -> list[str] | None:
    """The vocabulary saved with the folds, if folds were made."""
    path = paths.labels_file(data)
    return json.loads(path.read_text())["classes"] if path.exists() else None


def load_folds(comp: Competition) -> np.ndarray:
    """Fold of each train row (train order), checked against the folds file.

    Raises:
        DataError: no folds yet, or a folds file that does not match this train set.
    """
    path = paths.folds_file(comp.cfg.name)
    if not path.exists():
        raise DataError(f"{path} not found: run `make folds DATA={comp.cfg.name}` first")
    folds = pd.read_csv(path, dtype={"ImageID": str})
    mapping = dict(zip(folds["ImageID"], folds["fold"].astype(int)))
    ids = comp.train["id"]
    missing = [i for i in ids if i not in mapping]
    extra = sorted(set(mapping) - set(ids))
    if missing or extra or len(folds) != len(ids):
        raise DataError(
            f"{path} does not match {comp.cfg.train_csv}: "
            f"{len(missing)} train ids without a fold (first: {_listing(missing)}), "
            f"{len(extra)} fold ids not in train (first: {_listing(extra)}); "
            "was it made for another dataset? Re-run `make folds FORCE=1`"
        )
    return ids.map(mapping).to_numpy(dtype=np.int64)


def warn(msg: str) -> None:
    """User-facing warning (printed once per message)."""
    warnings.warn(msg, stacklevel=2)
