"""The entry point of an exported bundle (``python predict.py --test test.csv``): a test CSV
and its images in, the logged blend's submission out, offline.

It runs inside the folder :mod:`mmfold.export` made (``$MMFOLD_HOME`` is set to it; caches go
to ``--work`` or a temporary folder, so the bundle itself may be read-only). Every fold of
every member predicts the test set from its saved state through the same code as
``mmfold predict``, the folds are averaged as ``collect`` averages them, and the blend's saved
weights and thresholds make the decisions: on the test set the blend was made with, the
submission is byte-identical to the one ``mmfold blend`` wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from mmfold.errors import UserError


def home() -> Path:
    """The bundle folder: the one holding this package and ``bundle.json``."""
    return Path(__file__).resolve().parent.parent


def data_overrides(test: Path, images: str | None, sample: str | None) -> list[str]:
    """The bundle's data config pointed at the given test file (its folder is the data root,
    so images and a sample submission are found beside it unless given)."""
    test = test.expanduser().absolute()
    if not test.is_file():
        raise UserError(f"--test {test}: no such file")
    out = [f"data.root={test.parent}", f"data.test_csv={test.name}"]
    if images:
        out.append(f"data.image_dir={Path(images).expanduser().absolute()}")
    if sample:
        out.append(f"data.sample_submission={Path(sample).expanduser().absolute()}")
    return out


def member_probs(model: str, data_cfg: object, comp: object, data: str) -> np.ndarray:
    """One member's test probabilities: each fold predicts from its saved state (each seed's,
    averaged, for a multi-seed member), averaged as the collected file holds them."""
    from mmfold import paths
    from mmfold.config import config_from_dict
    from mmfold.train.predict import as_collected, predict_fold_dir

    dirs = sorted(paths.run_dir(data, model, 0).parent.glob("fold[0-9]*"), key=lambda d: int(d.name[4:]))
    cfg = config_from_dict(yaml.safe_load((dirs[0] / "config.yaml").read_text()))
    cfg.data = data_cfg
    return as_collected([predict_fold_dir(cfg, comp, rd) for rd in dirs])


def predict_bundle(test: Path, out: Path, images: str | None = None, sample: str | None = None) -> Path:
    """Write the submission for ``test`` to ``out``; returns ``out``."""
    from mmfold import paths
    from mmfold.config import load_config
    from mmfold.data.competition import load_test_set
    from mmfold.ensemble import submission
    from mmfold.ensemble.state import load_state

    manifest = json.loads((home() / "bundle.json").read_text())
    data = manifest["data"]
    cfg = load_config(data, None, data_overrides(test, images, sample))
    classes = json.loads(paths.labels_file(data).read_text())["classes"]
    comp = load_test_set(cfg.data, classes)
    state = load_state(data, manifest["blend"])
    fmt = submission.submission_format(comp)  # a bad sample submission fails before predicting
    stack = np.stack([member_probs(m, cfg.data, comp, data) for m in state.meta["models"]])
    df = submission.submission_frame(comp, state.predict(stack), classes, fmt)
    submission.validate_submission(df, comp, classes, fmt)
    return submission.write_submission(df, out)


def main(argv: list[str] | None = None) -> int:
    """``predict.py --test CSV [--images DIR] [--sample CSV] [--out CSV] [--work DIR]``."""
    p = argparse.ArgumentParser(prog="predict.py", description="offline submission from an mmfold bundle")
    p.add_argument("--test", required=True, help="the test CSV")
    p.add_argument("--images", help="the test images (default: the data config's image_dir beside the CSV)")
    p.add_argument("--sample", help="a sample submission whose header and order to follow")
    p.add_argument("--out", default="submission.csv", help="the submission to write (never overwritten)")
    p.add_argument("--work", help="folder for caches (default: a new temporary folder)")
    args = p.parse_args(argv)
    if not (home() / "bundle.json").exists():
        print(f"predict.py: {home()} is not a bundle made by `mmfold export` (no bundle.json)", file=sys.stderr)
        return 2
    os.environ["MMFOLD_HOME"] = str(home())
    started = time.perf_counter()
    # caches (token states, embeddings, image memmaps: gigabytes on a large test set) live in
    # --work if given (kept: a second run reuses them), else in a temporary folder removed after
    with contextlib.ExitStack() as stack:
        work = args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="mmfold-bundle-"))
        os.environ["MMFOLD_CACHE"] = str(Path(work) / "cache")
        try:
            path = predict_bundle(Path(args.test), Path(args.out).absolute(), args.images, args.sample)
        except UserError as e:
            print(f"predict.py: error: {e}", file=sys.stderr)
            return 2
    print(f"wrote {path} in {time.perf_counter() - started:.1f}s")
    return 0
