"""Fingerprints of everything a prediction depends on, so stale artifacts are caught.

Each fold's ``done.json`` and each collected ``oof/<data>/<model>.json`` store these hashes.
If the folds, the label vocabulary, the data files or the model's config change afterwards,
:func:`stale` says exactly which, and nothing stale is collected or blended.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mmfold import paths
from mmfold.config import RUN_LENGTH_KEYS, Config, flatten, stable_hash
from mmfold.data import Competition


def file_hash(path: Path) -> str:
    """Short sha256 of a file's bytes ('' if absent)."""
    if not path.exists():
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def model_config_hash(cfg: Config) -> str:
    """Hash of what changes a model's predictions: model + train sections, data columns.

    Run-length settings (epochs cap, progress bars, workers) are excluded, like for resume.
    """
    flat = {k: v for k, v in flatten(cfg.to_dict()).items() if k.split(".")[0] in ("model", "train")}
    flat = {k: v for k, v in flat.items() if k not in RUN_LENGTH_KEYS and k != "model.name"}
    cols = (cfg.data.id_col, cfg.data.label_col, cfg.data.caption_col, cfg.data.image_dir, cfg.data.label_sep)
    return stable_hash([flat, cols])


def data_fingerprints(comp: Competition) -> dict[str, str]:
    """Current hashes of the folds file, the label vocabulary and the data files."""
    d = comp.cfg
    root = paths.resolve(d.root)
    data = file_hash(root / d.train_csv) + (file_hash(root / d.test_csv) if d.test_csv else "")
    return {"folds": file_hash(paths.folds_file(d.name)), "labels": stable_hash(comp.classes), "data": data}


def fingerprints(cfg: Config, comp: Competition) -> dict[str, str]:
    """Current hashes of folds, labels, data files and the model config."""
    return {**data_fingerprints(comp), "config": model_config_hash(cfg)}


def check_fresh(model: str, comp: Competition) -> None:
    """Refuse a collected model whose inputs changed since it was trained.

    The saved hashes live in ``oof/<data>/<model>.json``; the config is compared only when
    the model's YAML still exists (a deleted config cannot be checked, the data can).

    Raises:
        UserError: naming the model and what changed.
    """
    import json

    from mmfold.config import load_config, model_yaml
    from mmfold.errors import UserError

    meta = paths.oof_meta_file(comp.cfg.name, model)
    if not meta.exists():
        raise UserError(f"{meta} missing: re-run `make collect MODEL={model}` (or retrain it)")
    saved = json.loads(meta.read_text()).get("hashes", {})
    current = data_fingerprints(comp)
    if model_yaml(model).exists() and "@" not in model:
        current["config"] = model_config_hash(load_config(comp.cfg.name, model))
    changed = stale(saved, current)
    if changed:
        raise UserError(f"model '{model}' is stale: {describe(changed)}; retrain it (make train MODEL={model} FORCE=1)")


def stale(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """Names of the fingerprints that changed (empty when the artifact is current)."""
    return [k for k in current if saved.get(k) != current[k]]


def describe(changed: list[str]) -> str:
    """Human explanation of what changed."""
    why = {
        "folds": "the folds file was rewritten",
        "labels": "the label vocabulary changed",
        "data": "train.csv/test.csv changed",
        "config": "the model's config changed",
    }
    return "; ".join(why[k] for k in changed)
