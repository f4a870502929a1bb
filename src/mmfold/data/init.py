"""``mmfold init DIR``: describe a competition folder as a commented ``configs/data/<name>.yaml``.

A data YAML written by hand is where a competition first goes wrong (the last user trial got
the label separator and the image extension wrong). This command reads the folder (train and
test CSVs, a sample submission, an image folder, zips of them), infers each ``data.*`` setting
from the files, prints what it inferred and why, and writes the YAML once, with the reason
beside every value. Where the files allow two readings (two label-like columns, two
separators, ids that match no image) it stops with a message naming the flag that decides:
a wrong guess would cost a training run, a question costs one more command. The first rows it
prints are read back through ``load_config`` + ``load_competition``: what every stage reads.

Inference is a table of steps (:data:`STEPS`), and each column role (id, labels, caption) is a
row of :data:`ROLES`: candidates by content, narrowed by named rules, never by position alone.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import pandas as pd
import yaml

from mmfold import fileio, hints, paths
from mmfold.config import (
    Config,
    ConfigError,
    DataConfig,
    FoldsConfig,
    config_from_dict,
    configs_dir,
    load_config,
)
from mmfold.data.competition import (
    IMAGE_EXTS,
    Competition,
    image_path,
    load_competition,
    read_table,
    sort_classes,
    split_labels,
)
from mmfold.errors import UserError
from mmfold.metrics import OPTIMISED

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # a data config's name: a plain file stem
SEPARATORS = (" ", "|", ",", ";")  # label separators real competitions use
SEP_NAMES = {"space": " ", "pipe": "|", "comma": ",", "semicolon": ";", "tab": "\t"}  # --sep pipe
NONE = "none"  # a flag value meaning "this competition has none" (--caption none)
SAMPLED_IDS = 100  # ids of train (and of test) checked against each candidate image folder
PREVIEW_ROWS = (3, 2)  # train rows, test rows printed as read back
MAX_REPEATED_CELLS = 0.01  # share of cells repeating a token that a label column may have
MIN_LABEL_USES = 2.0  # a label column's tokens occur at least this often on average
MIN_CAPTION_WORDS = 3.0  # free text: at least this many words a cell on average
MAX_LISTED = 5  # names listed in a message

# names of the columns that play each role (case-insensitive)
ID_NAME = re.compile(r"id$|^(image|img|file|filename|file_name|fname|path|image_?path|image_?name)$", re.IGNORECASE)
LABEL_NAME = re.compile(r"label|tag|class|categor|target|attribute|predict|answer|topic|genre", re.IGNORECASE)
CAPTION_NAME = re.compile(r"caption|text|desc|title|sentence|comment|question|prompt|summary|review", re.IGNORECASE)

# CSV file roles, in the order a name is tried (``sample_submission.csv`` is no test file)
FILE_ROLES: tuple[tuple[str, str, re.Pattern[str]], ...] = (
    ("sample_submission", "--sample", re.compile(r"sample|submission", re.IGNORECASE)),
    ("test_csv", "--test", re.compile(r"(?<![a-z])test", re.IGNORECASE)),  # not "latest"
    ("train_csv", "--train", re.compile(r"(?<![a-z])train", re.IGNORECASE)),  # not "pretrained"
)


@dataclass(frozen=True)
class Finding:
    """One inferred ``data.*`` setting: its value and why (printed, and the YAML's comment)."""

    key: str
    value: Any
    why: str


@dataclass
class Folder:
    """The inference's state: the folder, what the user fixed, the tables, the findings."""

    root: Path
    given: dict[str, Any]
    found: dict[str, Finding] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # train_csv / test_csv / sample_submission
    notes: list[str] = field(default_factory=list)  # unzipped archives, CSVs not read

    def add(self, key: str, value: Any, why: str) -> None:
        """Record a finding (a value the user gave says so)."""
        self.found[key] = Finding(key, value, why)

    def value(self, key: str) -> Any:
        """A finding's value (None when not found)."""
        return self.found[key].value if key in self.found else None

    @property
    def train(self) -> pd.DataFrame:
        """The train table."""
        return self.tables["train_csv"]

    @property
    def test(self) -> pd.DataFrame | None:
        """The test table, if the competition has one."""
        return self.tables.get("test_csv")

    def file(self, key: str) -> str:
        """A file finding's name, for messages."""
        return str(self.value(key))


# --- archives ------------------------------------------------------------------------------------


def unzip_all(root: Path) -> list[str]:
    """Unzip every ``*.zip`` in ``root`` beside itself (a zip inside one too), never over
    anything that exists; return what was done, one line per archive.

    Each top-level entry of an archive is extracted into a hidden temp folder beside it and
    renamed into place, so a crash leaves no half-extracted folder under the real name, and a
    name that exists is left as it is (the archive's copy is not extracted).
    """
    notes, done = [], set()
    while todo := sorted(p for p in root.glob("*.zip") if p not in done):
        for archive in todo:
            done.add(archive)
            notes.append(unzip_beside(archive))
    return notes


def unzip_beside(archive: Path) -> str:
    """Extract ``archive`` into its folder (see :func:`unzip_all`); a line saying what happened.

    Raises:
        UserError: an archive that is not a zip, or whose entries would land outside its folder.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            plan = _zip_plan(zf, archive)
            todo = {top: members for top, members in plan.items() if not (archive.parent / top).exists()}
            if todo:
                _extract(zf, archive, todo)
    except zipfile.BadZipFile as e:
        raise UserError(f"{archive}: not a readable zip ({e}); download it again or unzip it yourself") from e
    kept = sorted(set(plan) - set(todo))
    made = f"unzipped {', '.join(sorted(todo))}" if todo else "nothing unzipped"
    return f"{archive.name}: {made}" + (f" ({', '.join(kept)} exist: left as they are)" if kept else "")


def _zip_plan(zf: zipfile.ZipFile, archive: Path) -> dict[str, list[zipfile.ZipInfo]]:
    """Top-level name -> its members. Loose image files are wrapped in a folder named like the
    archive (``images.zip`` of ``1.jpg, 2.jpg`` -> ``images/``), so they never spill beside the CSVs."""
    members = [m for m in zf.infolist() if not _junk(m.filename)]
    for m in members:
        parts = PurePosixPath(m.filename).parts
        if m.filename.startswith("/") or ".." in parts or not parts:
            raise UserError(f"{archive}: entry {m.filename!r} would be written outside {archive.parent}; not unzipped")
    plan: dict[str, list[zipfile.ZipInfo]] = {}
    for m in members:
        plan.setdefault(PurePosixPath(m.filename).parts[0], []).append(m)
    loose = [top for top, ms in plan.items() if len(ms) == 1 and not ms[0].is_dir() and "/" not in ms[0].filename]
    if len(loose) == len(plan) > 1 and all(t.lower().endswith(IMAGE_EXTS) for t in loose):
        return {archive.name[: -len(".zip")]: members}
    return plan


def _junk(name: str) -> bool:
    """macOS resource forks and folders that zips made on a Mac carry."""
    return name.startswith("__MACOSX/") or PurePosixPath(name).name.startswith("._")


def _extract(zf: zipfile.ZipFile, archive: Path, todo: dict[str, list[zipfile.ZipInfo]]) -> None:
    """Extract ``todo`` into a temp folder beside ``archive``, then rename each entry into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".tmp", dir=archive.parent))
    try:
        for top, members in todo.items():
            wrapped = PurePosixPath(members[0].filename).parts[0] != top
            for m in members:
                zf.extract(m, tmp / top if wrapped else tmp)
            _place(tmp / top, archive.parent / top)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _place(src: Path, dst: Path) -> None:
    """Move an extracted entry into place, never over an existing one (a file by ``link``,
    which fails on an existing name; a folder by ``rename``, which fails on a non-empty one)."""
    if dst.exists():
        return
    if src.is_dir():
        os.rename(src, dst)
    else:
        os.link(src, dst)


# --- files ---------------------------------------------------------------------------------------


def _files(folder: Folder) -> None:
    """Train, test and sample-submission CSVs, by file name (a table of name rules)."""
    csvs = sorted(p.name for p in folder.root.iterdir() if p.is_file() and p.suffix.lower() == ".csv")
    given = {folder.given[k] for k, _, _ in FILE_ROLES if folder.given.get(k)}
    roles: dict[str, list[str]] = {k: [] for k, _, _ in FILE_ROLES}
    for name in csvs:
        role = next((k for k, _, rx in FILE_ROLES if rx.search(name)), None)
        if role and name not in given:
            roles[role].append(name)
    for key, flag, _ in reversed(FILE_ROLES):  # train first: the other files are checked against it
        _file_role(folder, key, flag, roles[key])
    unread = [n for n in csvs if n not in {folder.value(k) for k, _, _ in FILE_ROLES}]
    if unread:
        folder.notes.append(f"not read: {', '.join(unread)} (not named like train, test or a sample submission)")


def _file_role(folder: Folder, key: str, flag: str, names: list[str]) -> None:
    """Decide one file role (given, the one candidate, none) and read its table."""
    what = key.removesuffix("_csv").replace("_", " ")
    if key in folder.given:
        name, why = folder.given[key], f"given ({flag})"
    elif len(names) > 1:
        raise UserError(f"{len(names)} CSVs in {folder.root} are named like the {what} file: {names}; "
                        f"pass {flag} FILE to say which")
    elif names:
        name, why = names[0], f"the one CSV named like the {what} file"
    elif key == "train_csv":
        raise UserError(f"no CSV in {folder.root} is named like a train file; pass --train FILE")
    else:
        name, why = None, f"no CSV named like a {what} file"
    if name is not None:
        folder.tables[key] = _read(folder, name, flag)
        why = f"`{name}` ({len(folder.tables[key]):,} rows): {why}"
    folder.add(key, name, why)


def _read(folder: Folder, name: str, flag: str) -> pd.DataFrame:
    """A CSV as the pipeline reads it, quietly (the read-back prints its warnings once)."""
    path = folder.root / name
    if not path.is_file():
        raise UserError(f"{flag} {name}: no such file in {folder.root}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_table(path, folder.given.get("encoding", DataConfig.encoding))


# --- columns -------------------------------------------------------------------------------------

Predicate = Callable[[Folder, str], bool]


@dataclass(frozen=True)
class Role:
    """How one column role is found: which columns may play it, and the rules that narrow
    several candidates to one (each applied when it keeps at least one)."""

    key: str  # the data.* setting
    flag: str  # the flag that decides it
    what: str  # for messages
    candidate: Predicate
    rules: tuple[tuple[str, Predicate], ...]
    need_reason: bool = False  # the chosen column must satisfy a rule (an id is never "the only one left")
    optional: bool = False  # no candidate: the competition has none (null)


def _cells(folder: Folder, col: str) -> pd.Series:
    """A train column's cells, stripped."""
    return folder.train[col].fillna("").astype(str).str.strip()


def _in_test(folder: Folder, col: str) -> bool:
    """Whether test.csv (if any) has the column."""
    return folder.test is None or col in folder.test.columns


def _is_unique_id(folder: Folder, col: str) -> bool:
    """Unique, non-empty in every train row, and a column of test.csv too (test rows need ids)."""
    cells = _cells(folder, col)
    return bool(len(cells)) and (cells != "").all() and cells.is_unique and _in_test(folder, col)


@dataclass(frozen=True)
class LabelStats:
    """What a column's cells are when split into labels."""

    classes: list[str]
    rows: int
    empty: int  # cells with no label
    tokens: int
    repeated: int  # cells holding one token twice (a label list never does; prose does)

    @property
    def ints(self) -> bool:
        """Whether every label is an integer (sorted numerically, 2 before 10)."""
        return all(re.fullmatch(r"-?\d+", t) for t in self.classes)

    def looks_like_labels(self) -> bool:
        """Sets of tokens reused across rows: not prose (repeats within a cell), not ids (each
        token once), not mostly empty."""
        return (bool(self.classes) and self.repeated <= MAX_REPEATED_CELLS * self.rows
                and self.tokens >= MIN_LABEL_USES * len(self.classes) and 2 * self.empty <= self.rows)


def label_stats(cells: pd.Series, sep: str) -> LabelStats:
    """Split every cell on ``sep`` as the pipeline does (:func:`split_labels`)."""
    lists = [split_labels(c, sep) for c in cells]
    return LabelStats(classes=sort_classes({t for ls in lists for t in ls}), rows=len(lists),
                      empty=sum(not ls for ls in lists), tokens=sum(map(len, lists)),
                      repeated=sum(len(ls) != len(set(ls)) for ls in lists))


def separator_options(cells: pd.Series) -> list[str]:
    """The separators a label column may use: the non-space ones its cells hold (a space is
    legitimate inside a label, ``Red Circle|Blue``), else a space; several means ambiguous."""
    held = [s for s in SEPARATORS if cells.str.contains(s, regex=False).any()]
    marks = [s for s in held if s != " "]
    return marks or [" "]


def _label_like(folder: Folder, col: str) -> bool:
    """A column whose cells split (on the separator they hold) into reused label sets."""
    cells = _cells(folder, col)
    return label_stats(cells, separator_options(cells)[0]).looks_like_labels()


def _words(cells: pd.Series) -> float:
    """Mean words per non-empty cell."""
    full = cells[cells != ""]
    return float(full.str.split().map(len).mean()) if len(full) else 0.0


def _text_like(folder: Folder, col: str) -> bool:
    """Free text in train and test: several words a cell, mostly letters; or a column named
    like a caption that holds words."""
    if not _in_test(folder, col):
        return False
    cells = _cells(folder, col)
    has_letters = cells.str.contains(r"[^\W\d_]", regex=True).mean() >= 0.5
    named = bool(CAPTION_NAME.search(col))
    return bool(has_letters) and (named or _words(cells) >= MIN_CAPTION_WORDS)


def _sample_cols(folder: Folder) -> list[str]:
    """The sample submission's header (none without one)."""
    sample = folder.tables.get("sample_submission")
    return [] if sample is None else list(sample.columns)


def _free(role: Role) -> Predicate:
    """``role.candidate``, for columns no earlier role took."""
    def ok(folder: Folder, col: str) -> bool:
        taken = {folder.value(k) for k in ("id_col", "label_col")}
        return col not in taken and role.candidate(folder, col)
    return ok


ROLES: dict[str, Role] = {r.key: r for r in (
    Role("id_col", "--id", "id", _is_unique_id, rules=(
        ("named as in the sample submission", lambda f, c: c in _sample_cols(f)),
        ("named like an id", lambda f, c: bool(ID_NAME.search(c))),
        ("the first column", lambda f, c: c == f.train.columns[0]),
    ), need_reason=True),
    Role("label_col", "--labels", "label", _label_like, rules=(
        ("named as in the sample submission", lambda f, c: c in _sample_cols(f)),
        ("absent from the test file", lambda f, c: f.test is not None and c not in f.test.columns),
        ("named like labels", lambda f, c: bool(LABEL_NAME.search(c))),
        ("not named like a caption", lambda f, c: not CAPTION_NAME.search(c)),
    )),
    Role("caption_col", "--caption", "caption", _text_like, rules=(
        ("named like a caption", lambda f, c: bool(CAPTION_NAME.search(c))),
    ), optional=True),
)}


def pick_column(folder: Folder, role: Role) -> tuple[str | None, str]:
    """The column playing ``role`` and why; the user's choice wins but must exist.

    Raises:
        UserError: two columns fit equally (or none does), naming them and ``role.flag``.
    """
    train_file = folder.file("train_csv")
    if role.key in folder.given:
        col = folder.given[role.key]
        if col is not None and col not in folder.train.columns:
            raise UserError(f"{role.flag} {col}: {train_file} has no such column; its columns: {list(folder.train.columns)}")
        return col, f"given ({role.flag})"
    cands = [c for c in folder.train.columns if _free(role)(folder, c)]
    for _, keep in role.rules:
        kept = [c for c in cands if keep(folder, c)]
        cands = kept or cands
    reasons = [text for text, keep in role.rules if len(cands) == 1 and keep(folder, cands[0])]
    if len(cands) == 1 and (reasons or not role.need_reason):
        return cands[0], ", ".join(reasons) or f"the one {role.what}-like column"
    if not cands and role.optional:
        return None, f"no free-text column in {train_file}" + (" and the test file" if folder.test is not None else "")
    _ambiguous(folder, role, cands)


def _ambiguous(folder: Folder, role: Role, cands: list[str]) -> NoReturn:
    """Raise the message for ``role`` without one clear column: several fit, or none does."""
    train_file = folder.file("train_csv")
    if len(cands) > 1:
        raise UserError(f"{len(cands)} columns of {train_file} could be the {role.what} column: {cands}; "
                        f"pass {role.flag} COL to say which" + (f" (or {role.flag} none)" if role.optional else ""))
    raise UserError(f"no column of {train_file} looks like the {role.what} column ({_expectation(role)}); "
                    f"its columns: {list(folder.train.columns)}; pass {role.flag} COL")


def _expectation(role: Role) -> str:
    """What the role's candidates must be, for the message that none is."""
    return {"id_col": "a unique, non-empty value in every row, in the test file too, named like an id "
                      "or first",
            "label_col": "lists of labels reused across rows, split on one of ' ', '|', ',', ';'"}.get(role.key, "")


def _id(folder: Folder) -> None:
    """The id column."""
    col, why = pick_column(folder, ROLES["id_col"])
    folder.add("id_col", col, f"column `{col}`: {why}")


def _labels(folder: Folder) -> None:
    """The label column, its separator, and what its labels are (ints or strings)."""
    col, why = pick_column(folder, ROLES["label_col"])
    cells = _cells(folder, col)
    sep, sep_why = pick_separator(folder, cells)
    stats = label_stats(cells, sep)
    kind = "ints, sorted numerically" if stats.ints else "strings, sorted alphabetically"
    folder.add("label_col", col, f"column `{col}`, separator {sep!r}, {len(stats.classes):,} labels from "
                                 f"{stats.rows:,} rows ({kind}; {stats.tokens / max(stats.rows, 1):.1f} a row"
                                 f"{f', {stats.empty:,} rows without one' if stats.empty else ''}): {why}")
    folder.add("label_sep", sep, sep_why)


def pick_separator(folder: Folder, cells: pd.Series) -> tuple[str, str]:
    """The label separator and why.

    Raises:
        UserError: the cells hold two separators, or spaces that may be inside labels.
    """
    if "label_sep" in folder.given:
        return folder.given["label_sep"], f"{folder.given['label_sep']!r}: given (--sep)"
    options = separator_options(cells)
    if len(options) > 1:
        raise UserError(f"the label cells hold {len(options)} separators {options} (e.g. "
                        f"{_example(cells, options[1])!r}); pass --sep X to say which separates labels")
    sep = options[0]
    held = int(cells.str.contains(sep, regex=False).sum())
    if not held:
        return sep, f"{sep!r}: no cell holds more than one label (one label a row)"
    whole, split = cells[cells != ""].nunique(), len(label_stats(cells, sep).classes)
    if sep == " " and split >= whole:
        raise UserError(f"label cells hold spaces, but splitting on them gives no fewer labels ({split}) than there "
                        f"are distinct cells ({whole}), e.g. {_example(cells, ' ')!r}: if a cell is one label "
                        "with spaces in it, pass --sep '|' (any character no label holds); if spaces separate "
                        "labels, pass --sep ' '")
    return sep, f"{sep!r}: {held:,} of {len(cells):,} cells hold it" + ("" if sep == " " else ", and no other separator")


def _example(cells: pd.Series, sep: str) -> str:
    """The first cell holding ``sep``."""
    return next(c for c in cells if sep in c)


def _caption(folder: Folder) -> None:
    """The caption column, or none."""
    col, why = pick_column(folder, ROLES["caption_col"])
    if col is None:
        folder.add("caption_col", None, f"none: {why} (models read images only)")
        return
    words = _words(_cells(folder, col))
    folder.add("caption_col", col, f"column `{col}` ({words:.1f} words a row): {why}")


# --- images --------------------------------------------------------------------------------------


def image_folders(root: Path, depth: int = 2) -> dict[str, Counter]:
    """Folders (relative to ``root``, ``.`` included) holding image files -> their extensions.

    Hidden folders and ``__MACOSX`` are skipped; so are extensions of non-image files.
    """
    found: dict[str, Counter] = {}
    level = [root]
    for _ in range(depth + 1):
        below = []
        for d in level:
            exts, subdirs = _scan(d)
            below += subdirs
            if exts:
                found[d.relative_to(root).as_posix()] = exts
        level = below
    return found


def _scan(folder: Path) -> tuple[Counter, list[Path]]:
    """A folder's image extensions (counted, case kept: ``.JPG`` is not ``.jpg`` on Linux) and
    its subfolders (hidden ones and ``__MACOSX`` skipped)."""
    exts: Counter = Counter()
    subdirs = []
    with os.scandir(folder) as it:
        for e in it:
            if e.is_dir():
                if not e.name.startswith((".", "__MACOSX")):
                    subdirs.append(Path(e.path))
            elif e.name.lower().endswith(IMAGE_EXTS):
                exts[os.path.splitext(e.name)[1]] += 1
    return exts, subdirs


def _spread(ids: list[str], n: int) -> list[str]:
    """``n`` ids spread evenly over the list (first and last included): a sample that sees a
    change of naming half-way through the file."""
    if len(ids) <= n:
        return ids
    return [ids[round(i * (len(ids) - 1) / (n - 1))] for i in range(n)]


def _hits(root: Path, image_dir: str, ext: str, ids: list[str]) -> list[str]:
    """The sampled ids whose image exists under ``image_dir`` with ``ext``, as the pipeline
    would look for it (:func:`mmfold.data.competition.image_path`)."""
    cfg = DataConfig(root=str(root), image_dir=image_dir, image_ext=ext)
    return [i for i in ids if image_path(cfg, i).is_file()]


def _images(folder: Folder) -> None:
    """The image folder and extension, checked against a sample of train and test ids."""
    if folder.given.get("image_dir", "") is None:
        folder.add("image_dir", None, "none: given (--images none): models read captions only")
        folder.add("image_ext", "", "none: no images")
        return
    found = image_folders(folder.root)
    if "image_dir" in folder.given:
        name = folder.given["image_dir"]
        if not (folder.root / name).is_dir():
            raise UserError(f"--images {name}: no such folder in {folder.root}")
        found = {name: _scan(folder.root / name)[0]}
    if not found:
        folder.add("image_dir", None, f"none: no folder of images in {folder.root} (models read captions only)")
        folder.add("image_ext", "", "none: no images")
        return
    ids = _spread(_ids(folder.train, folder), SAMPLED_IDS) + _spread(_ids(folder.test, folder), SAMPLED_IDS)
    image_dir, ext, why = _match_images(folder, found, ids)
    folder.add("image_dir", image_dir, why)
    folder.add("image_ext", ext, "none: ids already end in an image extension" if not ext
               else f"`{ext}`: ids lack it; every sampled image is <id>{ext}")


def _ids(df: pd.DataFrame | None, folder: Folder) -> list[str]:
    """A table's ids, stripped as the pipeline strips them (none where the column is missing:
    the read-back names it)."""
    col = folder.value("id_col")
    return [] if df is None or col not in df.columns else df[col].fillna("").astype(str).str.strip().tolist()


def _match_images(folder: Folder, found: dict[str, Counter], ids: list[str]) -> tuple[str, str, str]:
    """(image_dir, image_ext, why): the one folder and extension that hold every sampled id.

    Raises:
        UserError: no folder holds them all, or two do (or two extensions), naming the flag.
    """
    exts = [folder.given["image_ext"]] if "image_ext" in folder.given else None
    hits = {(d, e): len(_hits(folder.root, d, e, ids)) for d, c in found.items() for e in exts or ["", *c]}
    full = [k for k, n in hits.items() if n == len(ids)]
    dirs = sorted({d for d, _ in full})
    if len(dirs) > 1:
        raise UserError(f"{len(dirs)} folders hold an image for every sampled id: {dirs}; pass --images DIR to say which")
    if not dirs:
        raise UserError(_no_match(folder, hits, ids))
    ext = _pick_ext(sorted(e for d, e in full if d == dirs[0]))
    files = " and ".join(folder.file(k) for k in ("train_csv", "test_csv") if folder.value(k))
    return dirs[0], ext, (f"folder `{dirs[0]}`: holds the image of each of {len(ids)} ids sampled from {files}"
                          + ("" if exts is None else " (--ext given)"))


def _pick_ext(exts: list[str]) -> str:
    """The extension to append: none if ids already carry theirs, else the one that works.

    Raises:
        UserError: ids without an extension that match two (``1.jpg`` and ``1.png`` both exist).
    """
    if "" in exts or len(exts) == 1:
        return "" if "" in exts else exts[0]
    raise UserError(f"the ids match images with {len(exts)} extensions {exts}; pass --ext EXT to say which")


def _no_match(folder: Folder, hits: dict[tuple[str, str], int], ids: list[str]) -> str:
    """The message for ids that match no image: the nearest folder, a missing file, the flags."""
    (d, e), n = max(hits.items(), key=lambda kv: kv[1])
    missing = next(i for i in ids if i not in set(_hits(folder.root, d, e, ids)))
    cfg = DataConfig(root=str(folder.root), image_dir=d, image_ext=e)
    where = "folder" if len(hits) == 1 else f"closest of {sorted({k for k, _ in hits})}"
    return (f"ids that match no image: {n} of {len(ids)} sampled ids have an image in `{d}` "
            f"({where}{f', extension {e}' if e else ''}; e.g. id {missing!r}: {image_path(cfg, missing)} is missing); "
            "pass --images DIR (the folder with every id's image), --ext EXT (the extension ids lack), "
            "or --images none to read captions only")


# --- the sample submission -----------------------------------------------------------------------


def _sample(folder: Folder) -> None:
    """The sample submission's header (two columns: ids, then labels) and its ids, checked
    against the test file the way ``make blend`` will read them."""
    sample = folder.tables.get("sample_submission")
    if sample is None:
        id_col, label_col = folder.value("id_col"), folder.value("label_col")
        folder.add("sample_submission", None, f"{folder.found['sample_submission'].why}: submissions are "
                                              f"`{id_col},{label_col}` in test file order")
        return
    name, cols = folder.file("sample_submission"), list(sample.columns)
    if len(cols) != 2:
        raise UserError(f"{name}: {len(cols)} columns {cols}; mmfold writes one id column and one label-list "
                        "column: pass --sample none to write id,labels instead")
    id_col = next((c for c in cols if c == folder.value("id_col")),
                  next((c for c in cols if c != folder.value("label_col")), cols[0]))
    ids = sample[id_col].fillna("").astype(str).str.strip()
    _check_sample_ids(folder, name, id_col, ids)
    label_col = next(c for c in cols if c != id_col)
    folder.add("sample_submission", name, f"header `{','.join(cols)}` (ids in `{id_col}`, labels in `{label_col}`"
                                          f"{f', {len(ids):,} rows: the test ids' if len(ids) else ''}); "
                                          f"{folder.found['sample_submission'].why}")


def _check_sample_ids(folder: Folder, name: str, id_col: str, ids: pd.Series) -> None:
    """A sample with rows must list the test ids, each once (else it is another test set's).

    Raises:
        UserError: no test file, or ids that differ, naming --sample.
    """
    if folder.test is None:
        raise UserError(f"{name}: a sample submission but no test file; pass --test FILE (or --sample none)")
    test = set(_ids(folder.test, folder))
    if len(ids) and (set(ids) != test or not ids.is_unique):
        odd = [i for i in ids if i not in test][:MAX_LISTED] or [i for i in test if i not in set(ids)][:MAX_LISTED]
        raise UserError(f"{name}: its `{id_col}` column does not list the ids of {folder.file('test_csv')} once each "
                        f"(e.g. {odd or 'duplicates'}); pass --sample FILE (this test set's) or --sample none")


# --- the steps, the YAML -------------------------------------------------------------------------

STEPS: tuple[Callable[[Folder], None], ...] = (_files, _id, _labels, _caption, _images, _sample)

# data keys in the order the YAML lists them, and what each line is about when printed
KEY_TOPICS = {"root": "folder", "train_csv": "train", "test_csv": "test", "sample_submission": "sample submission",
              "id_col": "id", "label_col": "labels", "label_sep": "separator", "caption_col": "captions",
              "image_dir": "images", "image_ext": "image extension", "metric": "metric"}


def infer(root: Path, given: dict[str, Any]) -> Folder:
    """Run every step on ``root`` (unzipping archives first)."""
    folder = Folder(root=root, given=dict(given))
    folder.notes += unzip_all(root)
    inner = _inner_root(root)
    if inner != root:  # a zip of `Dataset/`, as course competitions ship: the files are one level down
        folder.root, root = inner, inner
        folder.notes += [f"no CSV in the folder itself, one folder in it: described {inner.name}/"] + unzip_all(inner)
    value = given.get("root", root_value(root))
    folder.add("root", value, f"`{value}`: the competition folder" + ("" if Path(value).is_absolute() else
                                                                      " (relative to the project root)"))
    for step in STEPS:
        step(folder)
    return folder


def _inner_root(root: Path) -> Path:
    """``root``, or the one folder in it when ``root`` holds no CSV and no other folder (hidden
    ones and macOS's ``__MACOSX`` aside) and that folder holds CSVs."""
    entries = [p for p in root.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    dirs = [p for p in entries if p.is_dir()]
    if len(dirs) != 1 or any(p.is_file() and p.suffix.lower() == ".csv" for p in entries):
        return root
    return dirs[0] if any(p.suffix.lower() == ".csv" for p in dirs[0].iterdir()) else root


def root_value(root: Path) -> str:
    """``data.root`` as written: relative to the project root when inside it or one level up
    (``../shared/data/x``: the project's own convention), else absolute, so the YAML means
    the same folder wherever the command ran."""
    rel = os.path.relpath(root.absolute(), paths.root().absolute())
    return Path(rel).as_posix() if not rel.startswith(os.pardir + os.sep + os.pardir) else str(root.absolute())


def _scalar(value: Any) -> str:
    """A YAML scalar in flow style (``' '`` quoted, ``null``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix("...").strip()


def _comment(text: str) -> str:
    """A one-line YAML comment."""
    return "# " + " ".join(str(text).split())


def render_yaml(name: str, source: str, folder: Folder, extra: dict[str, dict[str, Any]]) -> str:
    """The commented YAML: every inferred ``data.*`` value with its reason, then the settings
    given on the command line, then the folds."""
    lines = [f"# {name}: written by `mmfold init {source}`; each value says why it was inferred.",
             f"# Check it, then: {hints.make('folds', name)}", "data:"]
    data = dict(extra.get("data", {}))
    for key in KEY_TOPICS:
        if key in folder.found:
            f = folder.found[key]
            lines.append(f"  {key}: {_scalar(f.value)}  {_comment(f.why)}")
        elif key == "metric" and key not in data:
            lines.append(f"  # metric: {DataConfig.metric}  # the default; set the competition's metric ({', '.join(OPTIMISED)})")
    lines += [f"  {k}: {_scalar(v)}  # given on the command line" for k, v in data.items() if k not in folder.found]
    if "models" not in data:
        lines.append(f"  # models: []  # what `{hints.make('train', name)}` trains (configs/models/*.yaml)")
    given_folds = extra.get("folds", {})
    folds = {"n_splits": FoldsConfig.n_splits, "seed": FoldsConfig.seed, **given_folds}
    lines.append("folds:  # multilabel-stratified; written once by make folds")
    lines += [f"  {k}: {_scalar(v)}  # " + ("given on the command line" if k in given_folds else "the default")
              for k, v in folds.items()]
    return "\n".join(lines) + "\n"


def yaml_path(name: str) -> Path:
    """``configs/data/<name>.yaml``; the name must be a plain file stem.

    Raises:
        UserError: a bad name, or a YAML that exists (init never overwrites one).
    """
    if not NAME_RE.fullmatch(name):
        raise UserError(f"bad data name {name!r}: use letters, digits and ._+- only (pass --name NAME)")
    path = configs_dir() / "data" / f"{name}.yaml"
    if path.exists():
        raise UserError(f"{path} exists; init never overwrites a data config (not even with --force): "
                        "pass --name NAME for a new one, or edit that file")
    return path


def init_folder(root: Path, name: str | None = None, given: dict[str, Any] | None = None,
                extra: dict[str, dict[str, Any]] | None = None, echo: Callable[[str], None] = print) -> Path:
    """Infer ``root``'s data config, write ``configs/data/<name>.yaml`` once, print what was
    inferred and the first rows as the pipeline reads them back; return the YAML's path.

    Args:
        root: The competition folder.
        name: The data config's name (default: the folder's name).
        given: ``data.*`` settings the user fixed (``id_col``, ``label_sep``, ``image_dir``...).
        extra: ``{"data": {...}, "folds": {...}}`` written as given (``metric``, ``n_splits``...).
        echo: Where the report goes.

    Raises:
        UserError: an ambiguity (naming the flag), an existing YAML, or files that do not read.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise UserError(f"{root}: no such folder (the competition's files: train/test CSVs, images)")
    name = name or root.absolute().name
    path = yaml_path(name)
    extra = extra or {"data": {}, "folds": {}}
    folder = infer(root, {**(given or {}), **extra.get("data", {})})  # data.encoding=... reads the CSVs too
    text = render_yaml(name, str(root), folder, extra)
    _check_yaml(text, path)
    fileio.write_new(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    _report(folder, extra, path, echo)
    comp = _read_back(name, path)
    _preview(comp, echo)
    echo(f"next: {hints.make('folds', name)}")
    return path


def _check_yaml(text: str, path: Path) -> Config:
    """The rendered YAML as the loader will merge it (a type error or unknown key is the
    user's override: say so before anything is written)."""
    try:
        return config_from_dict(yaml.safe_load(text))
    except ConfigError as e:
        raise UserError(f"{path} would not load: {e}") from e


def _report(folder: Folder, extra: dict[str, dict[str, Any]], path: Path, echo: Callable[[str], None]) -> None:
    """What was inferred and why, one line a setting."""
    echo(f"mmfold init: {folder.root} -> {path}")
    for note in folder.notes:
        echo(f"  {note}")
    for key, topic in KEY_TOPICS.items():
        if key in folder.found:
            echo(f"  {topic}: {folder.found[key].why}")
    metric = extra.get("data", {}).get("metric")
    echo(f"  metric: {metric} (given)" if metric else f"  metric: {DataConfig.metric} (the default: pass --metric)")
    folds = {"n_splits": FoldsConfig.n_splits, "seed": FoldsConfig.seed, **extra.get("folds", {})}
    echo(f"  folds: {folds['n_splits']} folds, seed {folds['seed']}")


def _read_back(name: str, path: Path) -> Competition:
    """The written YAML read as every stage reads it; a YAML that does not read is removed
    (it was this command's, just written) and the loader's message raised."""
    try:
        return load_competition(load_config(name).data)
    except UserError as e:
        path.unlink(missing_ok=True)
        raise UserError(f"{e}\n(the inferred {path} does not read, so it was not kept; pass the setting the "
                        "message names to init as key=value, e.g. data.allow_empty_labels=true)") from e


def _preview(comp: Competition, echo: Callable[[str], None]) -> None:
    """The first train and test rows as read: id, labels, caption, image file."""
    echo(f"first rows as the pipeline reads them ({len(comp.classes)} labels: {_short(comp.classes)}):")
    for split, n in zip(("train", "test"), PREVIEW_ROWS):
        df = comp.train if split == "train" else comp.test
        for _, row in ([] if df is None else df.head(n).iterrows()):
            parts = [f"{split:<5} id={row['id']!r}"]
            parts += [f"labels={row['labels']}"] if split == "train" else []
            parts += [f"caption={_cut(row['caption'])!r}"] if comp.has_captions else []
            parts += [f"image={comp.image_path(row['id'])}"] if comp.has_images else []
            echo("  " + "  ".join(parts))


def _short(items: list[str], n: int = 12) -> str:
    """The first few labels and a count."""
    return " ".join(items[:n]) + (f" ... (+{len(items) - n})" if len(items) > n else "")


def _cut(text: str, n: int = 60) -> str:
    """A caption shortened for one line."""
    return text if len(text) <= n else text[: n - 3] + "..."


# --- command line --------------------------------------------------------------------------------

# flag -> (data key, help); a value "none" means the competition has none (where null is allowed)
FLAGS: dict[str, tuple[str, str]] = {
    "--train": ("train_csv", "the train CSV (file name in DIR)"),
    "--test": ("test_csv", "the test CSV, or none"),
    "--sample": ("sample_submission", "the sample submission CSV, or none"),
    "--id": ("id_col", "the id column"),
    "--labels": ("label_col", "the label column"),
    "--caption": ("caption_col", "the caption column, or none"),
    "--sep": ("label_sep", "the label separator (a character, or space/pipe/comma/semicolon/tab)"),
    "--images": ("image_dir", "the image folder (relative to DIR), or none"),
    "--ext": ("image_ext", "the extension ids lack (.jpg), or none when they carry it"),
}
NULLABLE = {f.name for f in fields(DataConfig) if "None" in str(f.type)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``DIR``, ``--name``, ``--metric`` and one flag per setting an ambiguity may ask for;
    ``data.*`` / ``folds.*`` overrides are written into the YAML as given."""
    p.add_argument("dir", help="the competition folder (train/test CSVs, a sample submission, images, zips)")
    p.add_argument("--name", help="the data config's name (default: the folder's name)")
    p.add_argument("--metric", choices=OPTIMISED, help="the competition metric (default: samples)")
    for flag, (_, text) in FLAGS.items():
        p.add_argument(flag, help=text)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``data.*`` settings the flags fix (``none`` -> null, ``--sep pipe`` -> ``|``)."""
    out: dict[str, Any] = {}
    for flag, (key, _) in FLAGS.items():
        value = getattr(args, flag.lstrip("-"))
        if value is None:
            continue
        if value.lower() == NONE and key in NULLABLE | {"image_ext"}:
            value = None if key in NULLABLE else ""
        if key == "image_ext" and value and not value.startswith("."):
            value = "." + value  # --ext jpg: the pipeline appends the extension as given
        out[key] = SEP_NAMES.get(value, value) if key == "label_sep" else value
    return out


def split_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``data.k=v`` / ``folds.k=v`` -> ``{"data": {k: v}, "folds": {k: v}}`` (values as YAML).

    Raises:
        UserError: another section (init writes a data config: data and folds only).
    """
    out: dict[str, dict[str, Any]] = {"data": {}, "folds": {}}
    for item in items:
        key, _, raw = item.partition("=")
        section, _, sub = key.strip().partition(".")
        if section not in out or not sub or "." in sub:
            raise UserError(f"{item!r}: init writes data.* and folds.* settings (key=value); put others in the YAML")
        out[section][sub] = yaml.safe_load(raw) if raw else None
    return out


def _positionals(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The folder and the ``key=value`` overrides: argparse hands the first positional to the
    common ``overrides`` list, so they are told apart by the ``=``.

    Raises:
        UserError: not exactly one folder.
    """
    items = [*args.overrides, args.dir]
    dirs = [i for i in items if "=" not in i]
    if len(dirs) != 1:
        raise UserError(f"give one competition folder (got {dirs or 'none'}); settings go as key=value")
    return dirs[0], [i for i in items if "=" in i]


def run(args: argparse.Namespace) -> int:
    """Infer, write and read back the data config of a competition folder."""
    folder, overrides = _positionals(args)
    extra = split_overrides(overrides)
    if args.metric:
        extra["data"]["metric"] = args.metric
    init_folder(Path(folder), args.name, given_settings(args), extra)
    return 0
