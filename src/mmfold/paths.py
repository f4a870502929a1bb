"""Where every stage reads and writes: one function per artifact, relative to the project root.

The root is the current directory (the Makefile runs from the repo), or ``$MMFOLD_HOME``.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml


# Sweep trials and ablation variants are named ``<model>@<what>``: a run dir and OOF files of
# their own, never blended or reported as members.
VARIANT_SEP = "@"


def is_variant(model: str) -> bool:
    """True for a sweep trial's or an ablation variant's model name."""
    return VARIANT_SEP in model


def root() -> Path:
    """Project root: ``$MMFOLD_HOME`` if set, else the working directory."""
    return Path(os.environ.get("MMFOLD_HOME", "."))


def resolve(path: str | Path) -> Path:
    """A user-given relative path (e.g. ``data.root``) is relative to the project root."""
    return root() / path


def is_yaml_file(data: str) -> bool:
    """Whether a ``--data`` argument names a YAML file rather than a data config's name."""
    return data.endswith((".yaml", ".yml"))


def data_name(data: str) -> str:
    """The dataset's key in artifact paths: ``data`` itself, or for a data YAML given by path the
    ``data.name`` it declares, else its stem (``--data ~/comps/mycomp.yaml`` -> ``mycomp``), so
    every stage keys it the same way. Two files with one key are refused when a config loads
    (:func:`mmfold.config.check_owner`), never merged."""
    if not is_yaml_file(data):
        return data
    return declared_name(Path(data)) or Path(data).stem


def declared_name(path: Path) -> str | None:
    """The ``data.name`` a data YAML sets, or None (absent, unreadable: the loader reports it)."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    section = doc.get("data") if isinstance(doc, dict) else None
    name = section.get("name") if isinstance(section, dict) else None
    return name if isinstance(name, str) and name else None


def owner_file(data: str) -> Path:
    """``folds/<data>.source``: the data YAML whose artifacts these are (one file per key)."""
    return root() / "folds" / f"{data_name(data)}.source"


def folds_file(data: str) -> Path:
    """``folds/<data>.csv``: ImageID,fold, written once."""
    return root() / "folds" / f"{data_name(data)}.csv"


def labels_file(data: str) -> Path:
    """``folds/<data>.labels.json``: the label vocabulary, fixed when folds are made."""
    return root() / "folds" / f"{data_name(data)}.labels.json"


def run_dir(data: str, model: str, fold: int) -> Path:
    """``runs/<data>/<model>/fold<k>/``: one fold's checkpoints, log and predictions."""
    return root() / "runs" / data_name(data) / model / f"fold{fold}"


def oof_dir(data: str) -> Path:
    """``oof/<data>/``: collected out-of-fold and test probabilities per model."""
    return root() / "oof" / data_name(data)


def oof_file(data: str, model: str) -> Path:
    """``oof/<data>/<model>.parquet``: every train id once, with its fold."""
    return oof_dir(data) / f"{model}.parquet"


def test_pred_file(data: str, model: str) -> Path:
    """``oof/<data>/<model>.test.parquet``: test probabilities averaged over folds."""
    return oof_dir(data) / f"{model}.test.parquet"


def test_meta_file(data: str, model: str) -> Path:
    """``oof/<data>/<model>.test.json``: which test set the collected test file is for."""
    return oof_dir(data) / f"{model}.test.json"


def oof_meta_file(data: str, model: str) -> Path:
    """``oof/<data>/<model>.json``: CV metrics, params, train time, config, hashes."""
    return oof_dir(data) / f"{model}.json"


def submissions_dir(data: str) -> Path:
    """``submissions/<data>/``: submission CSVs and ``log.csv``."""
    return root() / "submissions" / data_name(data)


def reports_dir(data: str) -> Path:
    """``reports/<data>/``: markdown reports and plots."""
    return root() / "reports" / data_name(data)


def cache_dir(data: str) -> Path:
    """``cache/<data>/``: decoded-image memmaps, token ids, frozen embeddings; under
    ``$MMFOLD_CACHE`` when set (an exported bundle runs from a read-only folder)."""
    base = Path(os.environ["MMFOLD_CACHE"]) if os.environ.get("MMFOLD_CACHE") else root() / "cache"
    return base / data_name(data)


def sweeps_dir(data: str) -> Path:
    """``sweeps/<data>/``: one Optuna SQLite file per sweep study."""
    return root() / "sweeps" / data_name(data)


def weights_dir() -> Path:
    """``weights/``: offline pretrained weights made by ``make weights``."""
    return root() / "weights"
