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
    """The owner record of a data YAML: its absolute, resolved path."""
    return str(Path(yaml_path).expanduser().resolve())


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
    if not Path(owner).exists():
        print(f"note: the artifacts keyed '{key}' were made from {owner}, which is gone; {mine} takes them over")
        claim(key, yaml_path)
        return
    raise UserError(
        f"{mine} and {owner} both key their artifacts '{key}' (folds/{key}.csv, runs/{key}/, "
        f"oof/{key}/, submissions/{key}/), which belong to {owner}. Give this file a key of its own: "
        f"add `data: {{name: {suggest_key(Path(mine))}}}` to {mine} (or rename it)")


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
