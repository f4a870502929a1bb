"""Reading a competition: robust CSV parsing, validation with row-level errors, folds lookup.

Real competition files are messy (spreadsheet re-saves, trailing commas, captions with
newlines and stray quotes, BOMs). This module turns them into one clean :class:`Competition`
or fails with a message naming the file and rows, so no later stage has to guess.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import re
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from mmfold import fileio as mmio
from mmfold import hints, paths
from mmfold.config import DataConfig, data_yaml
from mmfold.errors import DataError
from mmfold.machine import available_cores

MAX_LISTED = 10  # rows named in an error message before "... and N more"


def _listing(items: list) -> str:
    """First few offending items, then a count, so errors stay readable on 30k rows."""
    head = ", ".join(str(i) for i in items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return head + (f" ... and {more} more" if more > 0 else "")


Overflow = dict[int, tuple[int, list[str]]]  # data row -> (file line, its raw fields)


def read_table(path: Path, encoding: str = "utf-8") -> pd.DataFrame:
    """Read a competition CSV as strings, tolerating what spreadsheets do to free text.

    Handles a BOM, CRLF, quoted captions with embedded newlines, a trailing comma on every
    line (an empty ``Unnamed: N`` column, dropped), unquoted commas inside the last column
    (the overflow is joined back into it, as COMP5329's captions need, on any row: the first
    included) and quotes left unescaped inside quoted fields (repaired the way COMP5329
    competitors did by hand).

    Raises:
        DataError: missing file, wrong encoding or broken quoting, naming the line.
    """
    df, overflow = _read_table(path, encoding)
    _warn_overflow(path, df, overflow)
    return df


def _read_table(path: Path, encoding: str) -> tuple[pd.DataFrame, Overflow]:
    """:func:`read_table`, also returning the rows whose overflow was joined back.

    Rows are split by the ``csv`` module and fitted to the header here, not by pandas: pandas
    silently turns the first column into the index when the *first* data row has one field too
    many, which shifts every column (labels become caption words) without an error.
    """
    if not path.exists():
        raise DataError(f"{path}: file not found")
    records = _records(_decode(path, encoding), path)
    if not records:
        raise DataError(f"{path}: empty file (no header line)")
    header = _column_names(records[0][1])
    rows, overflow = _fit_rows(records[1:], len(header))
    df = pd.DataFrame(rows, columns=header, dtype=str) if rows else pd.DataFrame(columns=header, dtype=str)
    return _fold_trailing(df), overflow


def _warn_overflow(path: Path, df: pd.DataFrame, overflow: Overflow) -> None:
    """Say which lines had their extra fields joined back (a silent repair hides bad files)."""
    if overflow:
        lines = [line for line, _ in overflow.values()]
        warnings.warn(f"{path}: {len(lines)} line(s) had unquoted commas in the last column "
                      f"({df.columns[-1]!r}); joined back: line {_listing(lines)}")


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


def _records(text: str, path: Path) -> list[tuple[int, list[str]]]:
    """``(first line, fields)`` of every non-blank record; quotes repaired once if broken."""
    try:
        return _split_records(text, None)
    except csv.Error:
        pass
    try:
        return _split_records(_repair_quotes(text), "\\")
    except csv.Error as e:
        raise DataError(f"{path}: cannot parse CSV: {e}") from e


def _split_records(text: str, escapechar: str | None) -> list[tuple[int, list[str]]]:
    """Strict ``csv`` split (pandas is lenient about quoting, the csv module is not).

    Raises:
        csv.Error: the first quoting error, as 'line N: reason'.
    """
    reader = csv.reader(_io.StringIO(text), strict=True, escapechar=escapechar)
    out, start = [], 1
    try:
        for fields in reader:
            if fields and not (len(fields) == 1 and not fields[0].strip()):  # blank line
                out.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise csv.Error(f"line {reader.line_num}: {e}") from e
    return out


def _column_names(header: list[str]) -> list[str]:
    """Header names as pandas gives them: empty -> ``Unnamed: i``, repeats -> ``name.1``."""
    names: list[str] = []
    for i, name in enumerate(header):
        name = name or f"Unnamed: {i}"
        base, k = name, 0
        while name in names:
            k += 1
            name = f"{base}.{k}"
        names.append(name)
    return names


def _fit_rows(records: list[tuple[int, list[str]]], width: int) -> tuple[list[list[str]], Overflow]:
    """Fit every data row to the header the same way, whichever row it is.

    Trailing empty fields past the header are trailing commas (dropped); other extra fields
    are unquoted commas in the last column (joined back into it); missing fields are empty.
    """
    rows, overflow = [], {}
    for n, (line, fields) in enumerate(records):
        while len(fields) > width and fields[-1] == "":
            fields = fields[:-1]
        if len(fields) > width:
            overflow[n] = (line, fields)
            fields = fields[: width - 1] + [",".join(fields[width - 1 :])]
        rows.append(fields + [""] * (width - len(fields)))
    return rows, overflow


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
        """Image file of an id (see :func:`image_path`)."""
        return image_path(self.cfg, image_id)

    def ids(self, split: str) -> list[str]:
        """Ids of ``train`` or ``test`` in file order."""
        df = self.train if split == "train" else self.test
        return [] if df is None else df["id"].tolist()

    def verify_images(self) -> None:
        """Fully decode every train and test image once (cached); raise listing every bad one.

        Grayscale, CMYK, RGBA and 16-bit files are fine (converted to RGB later); files PIL
        cannot decode to the last byte (a truncated JPEG included) are errors, all named at
        once so one fix-and-rerun suffices.

        Raises:
            DataError: every missing, empty or undecodable image, and how to drop them.
        """
        bad = image_problems(self.cfg, self.ids("train") + self.ids("test"))
        if bad:
            raise DataError(_bad_images_message(self.cfg, bad, "unreadable image(s)") + DROP_HINT)

    def verify_test_images(self) -> None:
        """Fully decode every test image once (cached); raise listing every bad one.

        What a stage that writes test predictions for several models calls before writing
        anything: failing on the second model's decode, after the first model's test file was
        rewritten, would leave a blend's members predicting different test sets.

        Raises:
            DataError: every missing, empty or undecodable test image.
        """
        bad = image_problems(self.cfg, self.ids("test"))
        if bad:
            raise DataError(_bad_images_message(self.cfg, bad, "bad test image(s)") + TEST_HINT)


def load_competition(
    cfg: DataConfig, classes: list[str] | None = None, use_saved: bool = True
) -> Competition:
    """Read and validate train/test as the data config describes.

    The label vocabulary comes from ``classes`` if given, else from the one saved with the
    folds (``folds/<data>.labels.json``, unless ``use_saved`` is False), else from train. A saved vocabulary that the train
    file no longer matches is an error, since OOF columns would silently shift.
    With ``data.drop_bad_images``, train rows with a bad image are dropped here, the one place
    every stage reads the data through, so folds, training and blending see the same rows.

    Raises:
        DataError: with the file and the offending rows.
    """
    root = paths.resolve(cfg.root)
    if not root.exists():
        raise DataError(f"data folder {root} not found (set data.root=... or run `make demo-data`)")
    train = _load_split(cfg, root / cfg.train_csv, labelled=True)
    test = _load_split(cfg, root / cfg.test_csv, labelled=False) if cfg.test_csv else None
    if cfg.image_dir and cfg.drop_bad_images:
        train = _drop_bad_images(cfg, train, test, root / cfg.train_csv)
    classes = classes or (use_saved and saved_classes(cfg.name)) or sort_classes({t for ls in train["labels"] for t in ls})
    comp = Competition(cfg=cfg, train=train, test=test, classes=classes)
    _check_labels(comp, train, root / cfg.train_csv, "are not in the label vocabulary")
    if test is not None and "labels" in test:
        _check_labels(comp, test, root / str(cfg.test_csv), "never occur in train")
    _check_overlap(comp)
    if comp.has_images and not cfg.drop_bad_images:
        _check_images_exist(comp)
    return comp


def load_test_set(cfg: DataConfig, classes: list[str]) -> Competition:
    """A competition of the test set alone (no train rows): what predicting from saved models
    needs where ``train.csv`` is absent (an exported bundle in a code competition).

    Raises:
        DataError: no test file, or a malformed one or missing images (named).
    """
    if not cfg.test_csv:
        raise DataError("no test file given (data.test_csv)")
    path = paths.resolve(cfg.root) / cfg.test_csv
    if not path.exists():
        raise DataError(f"test file {path} not found")
    test = _load_split(cfg, path, labelled=False)
    if test.empty:
        raise DataError(f"{path}: no rows below the header: nothing to predict")
    train = pd.DataFrame({"id": pd.Series(dtype=str), "caption": pd.Series(dtype=str), "labels": pd.Series(dtype=object)})
    comp = Competition(cfg=cfg, train=train, test=test, classes=list(classes))
    if comp.has_images:
        _check_images_exist(comp)
    return comp


def _load_split(cfg: DataConfig, path: Path, labelled: bool) -> pd.DataFrame:
    """One CSV -> ``id``, ``caption``, ``labels`` (+ extra columns), validated."""
    df, overflow = _read_table(path, cfg.encoding)
    need = [cfg.id_col] + ([cfg.label_col] if labelled else []) + ([cfg.caption_col] if cfg.caption_col else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        setting = {cfg.id_col: "data.id_col", cfg.label_col: "data.label_col", cfg.caption_col: "data.caption_col"}
        named = ", ".join(f"{c!r} ({setting[c]})" for c in missing)
        raise DataError(f"{path}: missing column(s) {named}; found {list(df.columns)}: set "
                        f"{'/'.join(setting[c] for c in missing)} in {data_yaml(hints.data_argument(cfg.name))}")
    if overflow:
        _check_overflow(cfg, df, overflow, path)
        _warn_overflow(path, df, overflow)
    out = pd.DataFrame({"id": df[cfg.id_col].str.strip()})
    out["caption"] = df[cfg.caption_col].fillna("").str.strip() if cfg.caption_col else ""
    if cfg.label_col in df.columns:
        out["labels"] = [split_labels(c, cfg.label_sep) for c in df[cfg.label_col]]
    known = {cfg.id_col, cfg.label_col, cfg.caption_col}
    out = pd.concat([out, df[[c for c in df.columns if c not in known]]], axis=1)
    _check_ids(out, path)
    if cfg.caption_col:
        _warn_empty_captions(out, cfg.caption_col, path)
    if labelled:
        _warn_label_quirks(out["labels"], cfg.label_sep, path)
        if not cfg.allow_empty_labels:
            _check_nonempty(out, path)
    return out.reset_index(drop=True)


def _check_overflow(cfg: DataConfig, df: pd.DataFrame, overflow: Overflow, path: Path) -> None:
    """Rows with extra fields were joined into the last column: refuse where that is wrong.

    Joining is right for free text (a caption) and for a comma-separated label list in the
    last column; it is wrong when the commas are in a comma-separated label list *before*
    the last column, or when the last column is an id or a label list split on other
    characters (the extra commas came from elsewhere in the row and cannot be placed).
    """
    last = df.columns[-1]
    if cfg.label_sep == "," and cfg.label_col in df.columns and last != cfg.label_col:
        _check_comma_labels(cfg, df, overflow, path)
    if last == cfg.id_col or (last == cfg.label_col and cfg.label_sep != ","):
        lines = [line for line, _ in overflow.values()]
        raise DataError(
            f"{path}: line {_listing(lines)}: more fields than the header, and the last column {last!r} "
            "is not free text, so the extra commas cannot be joined back into it; quote the field that "
            'contains commas ("a, b")'
        )


def _check_comma_labels(cfg: DataConfig, df: pd.DataFrame, overflow: Overflow, path: Path) -> None:
    """An unquoted ``red,blue`` label cell spills its labels into the next columns.

    Told apart from a caption's unquoted comma by what follows the label field: a token that
    is a label elsewhere in the file.
    """
    at = list(df.columns).index(cfg.label_col)
    vocab = {t for cell in df[cfg.label_col] for t in split_labels(cell, ",")}
    hits = [line for line, raw in overflow.values() if raw[at + 1].strip() in vocab]
    if hits:
        raise DataError(
            f"{path}: line {_listing(hits)}: the label list has commas but is not quoted, so the CSV "
            f"splits it into columns (labels spill into {df.columns[at + 1]!r}); quote the "
            f'{cfg.label_col} cell ("red,blue") or use another data.label_sep'
        )


SEPARATORS = (" ", "|", ",", ";")  # label separators a file may really use
SEP_SHARE = 0.5  # a separator is suspected when at least this share of labels contains it


def _warn_label_quirks(labels: pd.Series, sep: str, path: Path) -> None:
    """Warn about label sets that parse but are almost certainly not what was meant."""
    tokens = {t for ls in labels for t in ls}
    variants = _case_variants(tokens)
    if variants:
        warnings.warn(f"{path}: labels that differ only in case or spaces are separate classes: "
                      f"{_listing(variants)}; make them identical in the file if they mean the same")
    hint = _separator_hint(tokens, sep)
    if hint:
        warnings.warn(f"{path}: {hint}")


def _case_variants(tokens: set[str]) -> list[list[str]]:
    """Groups of labels equal up to case and whitespace (``Red Circle`` / ``red  circle``)."""
    groups: dict[str, list[str]] = {}
    for t in tokens:
        groups.setdefault(" ".join(t.casefold().split()), []).append(t)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def _separator_hint(tokens: set[str], sep: str) -> str | None:
    """The separator the labels seem to use instead of ``sep``, as a message, or None.

    With the wrong separator each cell is one label, so the labels are combinations
    (``blue|red``, 72 of them from 9 real ones) and most contain the real separator.
    """
    for c in SEPARATORS:
        having = sorted(t for t in tokens if c != sep and c in t)
        if len(having) < max(2, SEP_SHARE * len(tokens)):
            continue
        parts = {p.strip() for t in having for p in t.split(c) if p.strip()}
        if c == " " and not _looks_combined(having, parts, tokens):
            continue
        return (f"{len(having)} of {len(tokens)} labels contain {c!r} (e.g. {having[0]!r}; split on it they "
                f"are {len(parts)} labels): the labels look {c!r}-separated, but data.label_sep={sep!r}; "
                f"set data.label_sep={c!r}")
    return None


def _looks_combined(having: list[str], parts: set[str], tokens: set[str]) -> bool:
    """Spaces inside labels are legitimate (``Red Circle``); they separate labels only when
    the pieces are shared (half as many pieces as labels) or are labels on their own."""
    return 2 * len(parts) <= len(having) or 2 * len(parts & tokens) >= len(parts)


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


def _warn_empty_captions(df: pd.DataFrame, col: str, path: Path) -> None:
    """Empty captions (nothing, spaces, ``""``) are read as no text; say which rows.

    Not an error (a text model gives them its prior, an image model does not care), but a
    silent one hides a broken export or a wrong ``data.caption_col``.
    """
    empty = df["caption"] == ""
    if not empty.any():
        return
    hint = ("; set data.caption_col=null if this competition has no captions" if empty.all()
            else "; they are read as no text")
    warnings.warn(f"{path}: {int(empty.sum())} empty caption(s) in column {col!r}: "
                  f"{_listing(_rows(empty, df))}{hint}")


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


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_CHECK_FILE = "image_check.json"  # in paths.cache_dir(data): decode results per file
IMAGE_CHECK_VERSION = 1  # bump when what counts as a bad image changes
BAD_IMAGES_FILE = "bad_images.txt"  # in paths.cache_dir(data): the full list, when long
MAX_DECODE_THREADS = 8  # PIL decodes without the GIL; more threads than this only thrash
DROP_HINT = ("; fix or remove those files, or set data.drop_bad_images=true to drop their train rows "
             "(a bad test image stays an error: every test id must be submitted)")
TEST_HINT = ("; every test id must be submitted, so fix or replace these files "
             "(data.drop_bad_images drops train rows only)")


def image_path(cfg: DataConfig, image_id: str) -> Path:
    """Image file of an id: ``data.image_ext`` is appended unless the id already ends with it
    or with a known image extension (any case).

    Known extensions, not ``Path.suffix``, decide: ids with a dot (``img.tr00000``) have a
    "suffix" that is no extension, and must still get ``image_ext``.
    """
    ext = cfg.image_ext
    done = not ext or image_id.lower().endswith((ext.lower(), *IMAGE_EXTS))
    return paths.resolve(cfg.root) / str(cfg.image_dir) / (image_id if done else image_id + ext)


def _check_images_exist(comp: Competition) -> None:
    """Missing or zero-byte image files, named; cheap (stat only) while every file is there.

    Once one is missing the load fails anyway, so (unless ``data.check_images=false``) every
    other file is decoded too (cached) and the one error names the truncated and undecodable
    ones as well: naming only the missing file would cost the user a second fix-and-rerun.
    """
    ids = comp.ids("train") + comp.ids("test")
    _, bad = _stat_images({i: comp.image_path(i) for i in ids})
    if bad and comp.cfg.check_images:
        bad = image_problems(comp.cfg, ids)
    if bad:
        raise DataError(_bad_images_message(comp.cfg, bad, "image problem(s)") + DROP_HINT)


def _stat_images(files: dict[str, Path]) -> tuple[dict[str, tuple[str, int, int]], dict[str, str]]:
    """``(id -> (absolute path, size, mtime_ns))`` of files to decode, and ``id -> problem``
    for missing or empty ones (in id order)."""
    stats, bad, missing = {}, {}, []
    for i, p in files.items():
        try:
            st = p.stat()
        except OSError:
            missing.append(i)
            continue
        if st.st_size == 0 or not stat.S_ISREG(st.st_mode):
            bad[i] = f"{p} ({'zero bytes' if stat.S_ISREG(st.st_mode) else 'not a file'})"
        else:
            stats[i] = (str(p.absolute()), st.st_size, st.st_mtime_ns)
    bad.update(_missing_reasons({i: files[i] for i in missing}))
    return stats, {i: bad[i] for i in files if i in bad}


def _missing_reasons(files: dict[str, Path]) -> dict[str, str]:
    """``path (missing)``, naming a file with the same name plus an image extension if one
    exists beside it: the usual cause is a wrong or unset ``data.image_ext``."""
    listings: dict[Path, dict[str, str]] = {}
    out = {}
    for i, p in files.items():
        if p.parent not in listings:
            names = os.listdir(p.parent) if p.parent.is_dir() else []
            listings[p.parent] = {n.lower(): n for n in names}
        base = Path(i).name
        found = [f for e in IMAGE_EXTS if (f := listings[p.parent].get((base + e).lower())) and f.startswith(base)]
        hint = f"; {found[0]} exists: set data.image_ext={found[0][len(base):]}" if found else ""
        out[i] = f"{p} (missing{hint})"
    return out


def image_problems(cfg: DataConfig, ids: list[str]) -> dict[str, str]:
    """``id -> 'path (problem)'`` for every image that is missing, empty or does not decode.

    A real decode (PIL's ``verify()`` reads headers only) is what catches a JPEG missing its
    last bytes. Each file is decoded once: results are cached by (path, size, mtime) in
    ``cache/<data>/image_check.json``, so a re-run only stats the files.
    """
    files = {i: image_path(cfg, i) for i in ids}
    stats, bad = _stat_images(files)
    cache_file = paths.cache_dir(cfg.name) / IMAGE_CHECK_FILE
    cache = _read_check_cache(cache_file)
    todo = [i for i, (key, size, mtime) in stats.items() if cache.get(key, [])[:2] != [size, mtime]]
    if todo:
        workers = max(1, min(len(todo), available_cores(), MAX_DECODE_THREADS))
        with ThreadPoolExecutor(workers) as pool:
            problems = list(pool.map(_decode_problem, [files[i] for i in todo]))
        for i, problem in zip(todo, problems):
            key, size, mtime = stats[i]
            cache[key] = [size, mtime, problem]
        mmio.write_text(cache_file, json.dumps({"version": IMAGE_CHECK_VERSION, "files": cache}))
    bad.update({i: f"{files[i]} ({cache[key][2]})" for i, (key, _, _) in stats.items() if cache[key][2]})
    return {i: bad[i] for i in files if i in bad}


def _decode_problem(path: Path) -> str | None:
    """Why ``path`` does not decode to the last byte, or None if it does."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft(im.mode, (1, 1))  # JPEG: decode at 1/8 scale; every byte is still read
            im.load()
    except Exception as e:  # PIL raises many types for corrupt files
        return f"{type(e).__name__}: {e}"
    return None


def _read_check_cache(path: Path) -> dict[str, list]:
    """Cached decode results, or nothing if the cache is absent, unreadable or outdated."""
    try:
        blob = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(blob, dict) and blob.get("version") == IMAGE_CHECK_VERSION
    return blob.get("files", {}) if ok else {}


def _bad_images_message(cfg: DataConfig, bad: dict[str, str], what: str) -> str:
    """``N <what>: first ten``, and a file listing all of them when there are more."""
    items = list(bad.values())
    msg = f"{len(items)} {what}: {_listing(items)}"
    if len(items) > MAX_LISTED:
        listed = mmio.write_text(paths.cache_dir(cfg.name) / BAD_IMAGES_FILE, "\n".join(items) + "\n")
        msg += f" (all listed in {listed})"
    return msg


def _drop_bad_images(cfg: DataConfig, train: pd.DataFrame, test: pd.DataFrame | None, path: Path) -> pd.DataFrame:
    """Train rows without a bad image (``data.drop_bad_images``), warning which were dropped.

    Raises:
        DataError: a bad test image (every test id must be submitted), or no good train image.
    """
    test_ids = [] if test is None else test["id"].tolist()
    bad = image_problems(cfg, train["id"].tolist() + test_ids)
    bad_test = {i: bad.pop(i) for i in test_ids if i in bad}
    if bad_test:
        raise DataError(_bad_images_message(cfg, bad_test, "bad test image(s)") + TEST_HINT)
    drop = train["id"].isin(list(bad))
    if drop.all():
        raise DataError(f"{path}: every train image is bad ({_listing(list(bad.values()))}); "
                        "check data.root, data.image_dir and data.image_ext")
    if drop.any():
        warnings.warn(f"{path}: dropped " + _bad_images_message(
            cfg, bad, "train row(s) whose image is bad (data.drop_bad_images=true)"))
    return train[~drop].reset_index(drop=True)


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
        raise DataError(f"{path} not found: run `{hints.make('folds', comp.cfg.name)}` first")
    folds = pd.read_csv(path, dtype={"ImageID": str})
    mapping = dict(zip(folds["ImageID"], folds["fold"].astype(int)))
    ids = comp.train["id"]
    missing = [i for i in ids if i not in mapping]
    extra = sorted(set(mapping) - set(ids))
    if missing or extra or len(folds) != len(ids):
        why = ("not one of its ids is in train: was it made for another dataset?" if len(extra) == len(mapping)
               else "did the train file change?")
        raise DataError(
            f"{path} does not match {comp.cfg.train_csv}: "
            f"{len(missing)} train ids without a fold (first: {_listing(missing)}), "
            f"{len(extra)} fold ids not in train (first: {_listing(extra)}); "
            f"{why} Re-make them (the old ones are kept): {hints.make('folds', comp.cfg.name, force=True)}"
        )
    return ids.map(mapping).to_numpy(dtype=np.int64)


def warn(msg: str) -> None:
    """User-facing warning (printed once per message)."""
    warnings.warn(msg, stacklevel=2)
