"""Which data YAML a dataset's artifacts belong to, so two competitions never share a key.

Every artifact is keyed by the dataset's key (:func:`mmfold.paths.data_name`): the name of a
config in ``configs/data/``, or a YAML's ``data.name``, or its stem. ``/a/data.yaml`` and
``/b/data.yaml`` would both be ``data``: the second would read the first one's folds, and the
``FORCE=1`` a message advised would move them aside. So the folds step records the file that
owns a key (``folds/<key>.source``), and a config whose key another file owns is refused when it
loads, naming both files and how to give it a key of its own.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmfold import fileio, paths
from mmfold.errors import UserError


def source_of(yaml_path: Path) -> str:
    """The owner record of a data YAML: its path relative to the project root when it lies
    inside the project (a copied or moved project keeps its records), else its absolute path."""
    path, root = Path(yaml_path).expanduser().resolve(), paths.root().resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _located(source: str) -> Path:
    """Where a recorded owner is (relative records are under the project root)."""
    path = Path(source)
    return path if path.is_absolute() else (paths.root() / path).resolve()


def recorded_owner(key: str) -> str | None:
    """The data YAML recorded as owning ``key``'s artifacts, or None."""
    record = paths.owner_file(key)
    if not record.is_file():
        return None
    return record.read_text(encoding="utf-8").strip() or None


def claim(key: str, yaml_path: Path) -> None:
    """Record ``yaml_path`` as the owner of ``key``'s artifacts (written with its folds)."""
    record = paths.owner_file(key)
    record.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_text(record, source_of(yaml_path) + "\n")


def check_owner(key: str, yaml_path: Path) -> None:
    """Refuse a data YAML whose key names another file's artifacts.

    Artifacts made before owners were recorded (folds without a record) are adopted by the
    first file that uses them; a recorded owner that no longer exists (the folder was moved)
    hands its artifacts to the file now given, with a note.

    Raises:
        UserError: naming both files and the ``data.name`` that gives this one its own key.
    """
    owner, mine = recorded_owner(key), source_of(yaml_path)
    if owner == mine:
        return
    if owner is None:
        if paths.folds_file(key).exists():
            _adopt(key, yaml_path)
        return
    if not _located(owner).exists():
        print(f"note: the artifacts keyed '{key}' were made from {owner}, which is gone; {mine} takes them over")
        claim(key, yaml_path)
        return
    mine, owner = str(_located(mine)), str(_located(owner))
    way_out = (f"add `data: {{name: {suggest_key(Path(yaml_path))}}}` to {mine} (or rename it)"
               if Path(yaml_path).parent.resolve() != _named_dir()
               else "rename it")
    raise UserError(
        f"{mine} and {owner} both key their artifacts '{key}' (folds/{key}.csv, runs/{key}/, "
        f"oof/{key}/, submissions/{key}/), which belong to {owner}. Give this file a key of its own: {way_out}")


def _named_dir() -> Path:
    """``configs/data/``: a config there is keyed by its file name (no ``data.name``)."""
    return (paths.root() / "configs" / "data").resolve()


def _adopt(key: str, yaml_path: Path) -> None:
    """Claim folds made before owners were recorded; a read-only project (an exported bundle)
    is left as it is."""
    try:
        claim(key, yaml_path)
    except OSError:
        pass


def suggest_key(yaml_path: Path) -> str:
    """A free key for a data YAML: its folder's name and its stem (``b_data``), numbered if taken."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{yaml_path.parent.name}_{yaml_path.stem}").strip("_") or "data"
    key, n = base, 2
    while recorded_owner(key) is not None or paths.folds_file(key).exists():
        key, n = f"{base}{n}", n + 1
    return key
