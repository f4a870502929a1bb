"""The entry point of an exported bundle (``python predict.py --test test.csv``): a test CSV
and its images in, the logged blend's submission out, offline.

It runs inside the folder :mod:`mmfold.export` made (``$MMFOLD_HOME`` is set to it; caches go
to ``--work`` or a temporary folder, so the bundle itself may be read-only). Every fold of
every member predicts the test set from its saved state through the same code as
``mmfold predict``, the folds are averaged as ``collect`` averages them, and the blend's saved
weights and thresholds make the decisions: on the test set the blend was made with, the
submission is byte-identical to the one ``mmfold blend`` wrote.

It is run in notebooks that were never set up for mmfold, so before importing anything beyond
the standard library it checks that the packages it imports are installed
(:func:`missing_requirements`) and says how to install them, online or from wheels; and its
messages name its own flags (``--images``, ``--sample``), not the project's settings.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

# standard library only: usable before the requirement check
from mmfold.errors import UserError

if TYPE_CHECKING:
    import numpy as np

    from mmfold.config import DataConfig
    from mmfold.ensemble.submission import SampleAdvice

# What predicting imports, module -> distribution: checked (without importing) before the first
# import, so a plain `python3` gets one message, not a ModuleNotFoundError.
# tests/test_bundle.py checks that every third-party module a bundle run imports is listed.
REQUIRED = {"numpy": "numpy", "pandas": "pandas", "yaml": "pyyaml", "torch": "torch", "torchvision": "torchvision",
            "timm": "timm", "transformers": "transformers", "tokenizers": "tokenizers", "safetensors": "safetensors",
            "huggingface_hub": "huggingface-hub", "sklearn": "scikit-learn", "scipy": "scipy", "skops": "skops",
            "lightgbm": "lightgbm", "PIL": "pillow", "pyarrow": "pyarrow", "accelerate": "accelerate", "tqdm": "tqdm"}
SAMPLE_NONE = "none"  # --sample none: the data config's id,label header in test.csv order
MAX_SHOWN = 5  # ids named in a message


def home() -> Path:
    """The bundle folder: the one holding this package and ``bundle.json``."""
    return Path(__file__).resolve().parent.parent


def _canonical(dist: str) -> str:
    """A distribution name as pip compares them (``PyYAML`` == ``pyyaml``, ``_`` == ``-``)."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def pinned_versions(requirements: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file, by canonical name (others ignored)."""
    if not requirements.exists():
        return {}
    pins = {}
    for line in requirements.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[_canonical(m.group(1))] = m.group(2)
    return pins


def missing_requirements(pins: dict[str, str]) -> tuple[list[str], list[str]]:
    """(distributions not installed, as ``name==pin``; installed ones at another version than
    the pin, as ``name version (pinned pin)``), for the modules in :data:`REQUIRED`.
    Nothing is imported: ``find_spec`` of a top-level module only searches the path."""
    missing, other = [], []
    for module, dist in REQUIRED.items():
        pin = pins.get(_canonical(dist))
        if importlib.util.find_spec(module) is None:
            missing.append(f"{dist}=={pin}" if pin else dist)
            continue
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError:  # importable without metadata (vendored): can't tell
            continue
        if pin and have.split("+")[0] != pin.split("+")[0]:
            other.append(f"{dist} {have} (pinned {pin})")
    return missing, other


def requirements_message(missing: list[str], folder: Path) -> str:
    """What is missing and the one command that installs it: online from the bundle's
    requirements.txt, offline from a folder of wheels (``wheels/`` in the bundle if there is
    one; README.md says how to carry them into a notebook)."""
    py, req = sys.executable or "python3", folder / "requirements.txt"
    wheels = folder / "wheels" if (folder / "wheels").is_dir() else "<folder of wheels>"
    names = " ".join(missing)
    return (f"missing package{'s' if len(missing) != 1 else ''} this bundle needs: {names}\n"
            f"  install (online):   {py} -m pip install -r {req}\n"
            f"  install (offline):  {py} -m pip install --no-index --find-links {wheels} {names}\n"
            f"  (wheels for an offline notebook: {folder / 'README.md'}, 'Offline notebooks')")


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
    import yaml

    from mmfold import paths
    from mmfold.config import config_from_dict
    from mmfold.train.predict import as_collected, predict_fold_dir

    dirs = sorted(paths.run_dir(data, model, 0).parent.glob("fold[0-9]*"), key=lambda d: int(d.name[4:]))
    cfg = config_from_dict(yaml.safe_load((dirs[0] / "config.yaml").read_text()))
    cfg.data = data_cfg
    return as_collected([predict_fold_dir(cfg, comp, rd) for rd in dirs])


def _usable(path: Path) -> bool:
    """A non-empty regular file (what the image check of a test set accepts)."""
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def image_candidates(cfg: DataConfig, given: str | None) -> list[Path]:
    """Where the test images may be: ``--images``, else the data config's image folder by its
    name beside the test file (never the training machine's own folder), the test file's
    folder, then each folder beside it."""
    if given:
        return [Path(given).expanduser().absolute()]
    root = Path(cfg.root)
    configured = Path(str(cfg.image_dir))
    first = root / (configured.name if configured.is_absolute() else configured)
    others = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    return list(dict.fromkeys([first, root, *others]))


def image_folder(cfg: DataConfig, ids: list[str], given: str | None) -> Path:
    """The folder holding every test image (non-empty), from :func:`image_candidates`.

    Raises:
        UserError: no candidate holds them all: how many are missing where, and ``--images``.
    """
    from mmfold.data.competition import image_path

    best: tuple[Path, list[str]] | None = None
    for folder in image_candidates(cfg, given):
        at = replace(cfg, image_dir=str(folder))
        missing = [i for i in ids if not _usable(image_path(at, i))]
        if not missing:
            return folder
        if best is None or len(missing) < len(best[1]):
            best = (folder, [str(image_path(at, i).name) for i in missing])
    folder, missing = best
    shown = ", ".join(missing[:MAX_SHOWN]) + (" ..." if len(missing) > MAX_SHOWN else "")
    if given:
        raise UserError(f"--images {folder}: {len(missing)} of {len(ids)} test images missing or empty ({shown})")
    looked = ", ".join(str(c) for c in image_candidates(cfg, None))
    raise UserError(f"the test images are not beside the test file: looked in {looked}; fewest missing in "
                    f"{folder} ({len(missing)} of {len(ids)}: {shown}). Pass --images DIR, the folder "
                    "holding the test set's images")


def sample_file(cfg: DataConfig, test: Path) -> str | None:
    """The sample submission to follow when ``--sample`` is not given, as a
    ``data.sample_submission`` value: none when the data config names none; else the file of
    that name beside the test file, or the one CSV beside it named like a sample submission
    (a hidden test set comes with its own), else that name (refused, naming ``--sample``).

    Raises:
        UserError: several candidates beside the test file.
    """
    if not cfg.sample_submission:
        return None
    same = test.parent / Path(cfg.sample_submission).name
    if same.is_file():
        return str(same)
    found = sorted(p for p in test.parent.glob("*.csv") if p != test and "sample" in p.name.lower())
    if len(found) > 1:
        raise UserError(f"several sample submissions beside {test}: {[p.name for p in found]}; pick one: "
                        f"--sample {found[0]}")
    if found:
        print(f"note: following the sample submission {found[0]} (the one beside the test file; --sample "
              "to choose)")
        return str(found[0])
    return str(same)


def bundle_advice() -> SampleAdvice:
    """Messages about a sample submission name the bundle's flags."""
    from mmfold.ensemble.submission import SampleAdvice

    return SampleAdvice(setting="sample submission", pick="pass --sample FILE, this test set's sample submission",
                        none=f"--sample {SAMPLE_NONE}")


def predict_bundle(test: Path, out: Path, images: str | None = None, sample: str | None = None) -> Path:
    """Write the submission for ``test`` to ``out``; returns ``out``.

    ``images``/``sample``: ``--images``/``--sample`` (None: found beside the test file, see
    :func:`image_folder`, :func:`sample_file`; ``sample='none'``: no sample submission).
    """
    import numpy as np

    from mmfold import paths
    from mmfold.config import load_config
    from mmfold.data.competition import load_test_set
    from mmfold.ensemble import submission
    from mmfold.ensemble.state import load_state

    manifest = json.loads((home() / "bundle.json").read_text())
    data = manifest["data"]
    chosen = None if sample in (None, SAMPLE_NONE) else sample
    cfg = load_config(data, None, data_overrides(test, None, chosen))
    test = test.expanduser().absolute()
    if sample == SAMPLE_NONE:
        cfg.data.sample_submission = None
    elif sample is None:
        cfg.data.sample_submission = sample_file(cfg.data, test)
    classes = json.loads(paths.labels_file(data).read_text())["classes"]
    if cfg.data.image_dir:
        ids = load_test_set(replace(cfg.data, image_dir=None), classes).ids("test")
        cfg.data.image_dir = str(image_folder(cfg.data, ids, images))
        print(f"test images: {cfg.data.image_dir}")
    comp = load_test_set(cfg.data, classes)
    state = load_state(data, manifest["blend"])
    fmt = submission.submission_format(comp, bundle_advice())  # a bad sample submission fails before predicting
    stack = np.stack([member_probs(m, cfg.data, comp, data) for m in state.meta["models"]])
    df = submission.submission_frame(comp, state.predict(stack), classes, fmt)
    submission.validate_submission(df, comp, classes, fmt)
    return submission.write_submission(df, out)


def main(argv: list[str] | None = None) -> int:
    """``predict.py --test CSV [--images DIR] [--sample CSV|none] [--out CSV] [--work DIR]``."""
    p = argparse.ArgumentParser(prog="predict.py", description="offline submission from an mmfold bundle")
    p.add_argument("--test", required=True, help="the test CSV")
    p.add_argument("--images", help="the folder of the test images (default: the data config's image folder "
                                    "beside the test CSV, else the test CSV's folder or one beside it that "
                                    "holds them all)")
    p.add_argument("--sample", help="a sample submission whose header and order to follow (default: the data "
                                    f"config's, found beside the test CSV); '{SAMPLE_NONE}': none")
    p.add_argument("--out", default="submission.csv", help="the submission to write (never overwritten)")
    p.add_argument("--work", help="folder for caches (default: a new temporary folder)")
    args = p.parse_args(argv)
    if not (home() / "bundle.json").exists():
        print(f"predict.py: {home()} is not a bundle made by `mmfold export` (no bundle.json)", file=sys.stderr)
        return 2
    missing, other = missing_requirements(pinned_versions(home() / "requirements.txt"))
    if missing:
        print(f"predict.py: error: {requirements_message(missing, home())}", file=sys.stderr)
        return 2
    if other:
        print(f"predict.py: note: not the pinned versions: {', '.join(other)}; the submission may differ "
              "slightly from the blend's", file=sys.stderr)
    os.environ["MMFOLD_HOME"] = str(home())
    # the hub weights the members read travel in the bundle's own cache; nothing is fetched
    os.environ["HF_HUB_CACHE"] = str(home() / "hub")
    os.environ["HF_HUB_OFFLINE"] = "1"
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
