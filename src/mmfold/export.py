"""``mmfold export``: a logged blend as a self-contained offline bundle (a code competition's
"dataset": upload the folder, run ``python predict.py --test test.csv`` in the notebook).

The bundle is laid out as a small project root, so the same code paths that made the
submission make it again: ``mmfold/`` (this package's source), ``configs/data/<data>.yaml``,
``folds/<data>.labels.json``, ``runs/<data>/<model>/fold<k>/`` with each fold's fitted state
(``best.pt`` with its tokenizer, or ``member.skops``) and ``config.yaml``, ``weights/`` with every
pretrained file those configs and the frozen encoders read, the blend's state under
``submissions/<data>/``, ``requirements.txt`` and ``bundle.json`` (contents, sizes, hashes).
Nothing in it needs ``train.csv``, ``oof/``, the network or a writable folder
(:mod:`mmfold.bundle` runs it).

``--kaggle-dataset owner/slug`` then uploads the bundle as a private Kaggle dataset, or as a
new version of it (:func:`mmfold.kaggle.upload_dataset`); a bundle that exists already is
uploaded as it is, so a failed upload is retried without exporting again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from mmfold import fileio, hub, paths
from mmfold.artifacts.manifest import file_hash
from mmfold.config import Config, load_config
from mmfold.data.competition import load_competition, load_folds
from mmfold.ensemble.state import check_members, load_state, state_files
from mmfold.errors import UserError

FOLD_STATE = ("best.pt", "member.skops", "config.yaml", "done.json")  # copied when present
ENTRY = '''"""Offline inference for blend {name!r} on {data!r}, made by `mmfold export`.

    python predict.py --test path/to/test.csv [--images DIR] [--sample CSV|none] [--out submission.csv]

Needs the pinned requirements.txt (it says what is missing; no network, no train data). See README.md.
"""
from mmfold.bundle import main

raise SystemExit(main())
'''
README = """# mmfold bundle: blend `{name}` on `{data}`

Made by `mmfold export` on {time} (commit {commit}); {size_mb:.1f} MB.

    pip install -r requirements.txt   # once, where the pinned packages are not installed
    python predict.py --test /path/to/test.csv --out submission.csv

`--images DIR`: the folder of the test images (default: {images}); `--sample FILE`: a sample
submission to follow (default: {sample}; `--sample none`: write `{header}` in test order);
`--work DIR`: where caches go (default: a temporary folder). Members: {models}. Folds: {folds}.

`predict.py` first checks that the packages it imports are installed; if some are not, it
names them (with their pinned versions) and the command that installs them.

## Offline notebooks

A notebook without internet (a Kaggle code competition) cannot `pip install` from the index:
carry the wheels in as a dataset.

1. Run `python predict.py --test ...` in the notebook once: it lists the missing packages as
   `name==version` (often only a few: the notebook image has most).
2. On a connected machine, download their wheels (and their dependencies) for the notebook's
   Python (this bundle was made on {py}) and platform; `-r requirements.txt` instead of the
   names downloads every pinned package:

       pip download <name==version ...> -d wheels --only-binary=:all: --python-version {py} --platform manylinux2014_x86_64

3. Upload the `wheels` folder as a Kaggle dataset (or copy it into this bundle as `wheels/`)
   and attach it to the notebook.
4. In the notebook, install without the index, then predict:

       pip install --no-index --find-links /kaggle/input/<wheels-dataset> <name==version ...>
       python predict.py --test /kaggle/input/<competition>/test.csv --out submission.csv
"""
# distributions whose pinned versions the bundle records when the project has no requirements.txt
PINNED = ("torch", "torchvision", "timm", "transformers", "tokenizers", "accelerate", "numpy", "pandas",
          "scikit-learn", "scipy", "lightgbm", "skops", "pillow", "pyyaml", "safetensors", "pyarrow",
          "albumentations", "iterative-stratification", "optuna", "tqdm", "sentence-transformers", "huggingface-hub")


def weight_files(cfg: Config, read: list[Any]) -> list[Path]:
    """Pretrained files and folders a model reads, under the project's ``weights/``: every
    ``model.params`` value naming one (a timm ``pretrained_file``, a Hugging Face
    ``text_model``, a ``local-dir:`` backbone), and the local ones of what it reads while
    predicting (``read``: :func:`read_while_predicting`). Weights read straight from an
    installed package come with the pinned requirements instead.

    Raises:
        UserError: it reads a local folder of the project outside ``weights/`` while
            predicting (the bundle would fail without it).
    """
    named = [v.removeprefix("local-dir:") for v in _strings(cfg.model.params)]
    local = [r.path for r in read if r.source == "local"]
    stray = [f for f in local if _inside(f, paths.root()) and not _inside(f, paths.weights_dir())
             and not _inside(f, Path(sys.prefix))]
    if stray:
        raise UserError(f"make export: model '{cfg.model.name}' reads {', '.join(map(str, stray))} while predicting, "
                        "and a bundle carries the project's local weights from weights/ only: move it under "
                        "weights/ and name it there (or name its hub repo), then retrain")
    return sorted({paths.resolve(f).resolve() for f in [*named, *map(str, local)] if _is_weight(f)})


def read_while_predicting(cfg: Config, state: Any) -> list[Any]:
    """Pretrained weights (:class:`mmfold.hub.Resolved`, a hub snapshot or a local path) a
    member reads while predicting: a torch kind's Hugging Face text model (its config and
    tokenizer), an ``hf-hub:``/``local-dir:`` backbone (its config.json is the architecture;
    a timm registry backbone is rebuilt from ``best.pt`` alone), or the frozen encoders a CPU
    member embeds with (from ``state``, a fold's fitted member)."""
    from mmfold.cpu.members import MEMBERS

    if cfg.model.kind in MEMBERS:
        from mmfold.cpu.encoders import build_encoder

        return [build_encoder(n, **s).resolved() for n, s in state.needed_encoders()]
    from mmfold.models import parse_params, text_encoder_of
    from mmfold.models.image import WEIGHTS_FIX, image_need, timm_source
    from mmfold.models.tokenizers import text_weights

    p = parse_params(cfg)
    found = [text_weights(p)] if text_encoder_of(cfg) == "hf" else []
    if p.backbone and timm_source(p.backbone)[0] is not None:
        found.append(hub.require(image_need(p), WEIGHTS_FIX))
    return found


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder`` (both resolved)."""
    return path.resolve().is_relative_to(folder.resolve())


def _strings(obj: Any) -> list[str]:
    """Every string inside a nested dict/list."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


def _is_weight(value: str) -> bool:
    """A string that names an existing path inside the project's ``weights/``."""
    path = paths.resolve(value)
    return _inside(path, paths.weights_dir()) and path.exists()


def _copy(src: Path, dest: Path) -> None:
    """A file or folder, into place (caches of compiled Python left out)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        shutil.copy2(src, dest)


def plan(data: str, name: str) -> dict[str, Any]:
    """Everything the bundle will hold, checked before anything is written.

    Raises:
        UserError: an unknown blend, a member retrained since it, a fold without fitted state.
    """
    from mmfold.train.predict import trained_config

    base = load_config(data)
    comp = load_competition(base.data)
    n_folds = int(load_folds(comp).max()) + 1
    state = load_state(base.data.name, name)
    check_members(state, base.data.name, list(comp.classes))
    models, weights, hub_cached = {}, set(), {}
    for m in state.meta["models"]:
        cfg, _ = trained_config(base, comp, m, n_folds)
        dirs = [paths.run_dir(base.data.name, m, k) for k in range(n_folds)]
        states = [(c, d) for rd in dirs for c, d in state_dirs(cfg, comp, rd)]
        first = check_fold_state(*states[0])  # kept for its encoders; the others checked and dropped
        for c, d in states[1:]:
            check_fold_state(c, d)
        models[m] = {"kind": cfg.model.kind, "dirs": dirs, "state_dirs": [d for _, d in states]}
        read = read_while_predicting(states[0][0], first)  # resolved once: a frozen encoder builds its model
        weights |= set(weight_files(states[0][0], read))
        hub_cached.update({r.path: r for r in read if r.source == "hub"})  # into the bundle's own hub cache
    return {"cfg": base, "comp": comp, "state": state, "models": models, "weights": sorted(weights),
            "hub": list(hub_cached.values()),
            "n_folds": n_folds}


def state_dirs(cfg: Config, comp: Any, run_dir: Path) -> list[tuple[Config, Path]]:
    """Where a fold's fitted state lives, with the config that reads it: the fold itself, or
    each seed's folder and that seed's config for a multi-seed member (``train.seeds``)."""
    if not cfg.train.seeds:
        return [(cfg, run_dir)]
    from mmfold.train.seeds import seed_dir, with_seed

    return [(with_seed(cfg, comp, s), seed_dir(run_dir, s)) for s in cfg.train.seeds]


def check_fold_state(cfg: Config, run_dir: Path) -> Any:
    """A fold's fitted state (a CPU member's model, or the torch checkpoint), loaded as the
    bundle will load it (trusted types, tokenizer, settings), so a fold that cannot predict
    is refused here, not in an offline notebook.

    Raises:
        UserError: the state is missing, older than this mmfold, or was trained otherwise.
    """
    from mmfold.cpu.members import MEMBERS, load_member

    if cfg.model.kind in MEMBERS:
        return load_member(run_dir)
    from mmfold.train.infer import best_checkpoint

    return best_checkpoint(run_dir, cfg)


def write_bundle(p: dict[str, Any], out: Path) -> dict[str, Any]:
    """Copy everything into ``out`` (a new folder, made whole under a temp name first) and
    return the bundle manifest."""
    import mmfold

    cfg, data, name = p["cfg"], p["cfg"].data.name, p["state"].meta["name"]
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _copy(Path(mmfold.__file__).parent, tmp / "mmfold")
    fileio.write_text(tmp / "configs" / "data" / f"{data}.yaml", yaml.safe_dump({"data": vars(cfg.data)}, sort_keys=False))
    _copy(paths.labels_file(data), tmp / "folds" / paths.labels_file(data).name)
    runs = paths.root() / "runs"
    for info in p["models"].values():
        for rd in [*info["dirs"], *info["state_dirs"]]:  # a fold's config.yaml, each seed's fitted state
            for f in FOLD_STATE:
                if (rd / f).exists():
                    _copy(rd / f, tmp / "runs" / (rd / f).relative_to(runs))
    for w in p["weights"]:
        _copy(w, tmp / "weights" / w.relative_to(paths.weights_dir().resolve()))
    for r in p["hub"]:  # the bundle's own hub cache: predict.py points HF_HUB_CACHE at it
        hub.copy_to_cache(r, tmp / "hub")
    for f in state_files(data, name):
        _copy(f, tmp / "submissions" / data / f.name)
    _requirements(tmp / "requirements.txt")
    manifest = _manifest(p, tmp)
    fileio.write_json(tmp / "bundle.json", manifest)
    fileio.write_text(tmp / "predict.py", ENTRY.format(name=name, data=data))
    fileio.write_text(tmp / "README.md", readme(p, manifest))
    tmp.rename(out)
    return manifest


def readme(p: dict[str, Any], manifest: dict[str, Any]) -> str:
    """The bundle's README.md: how to run it, its flags' defaults, how to install offline."""
    d = p["cfg"].data
    images = "none: the members read no images"
    if d.image_dir:
        name = Path(d.image_dir).name if Path(d.image_dir).is_absolute() else d.image_dir
        images = (f"`{name}` beside the test file, else the test file's own folder or a folder beside it "
                  "that holds them all")
    sample = (f"the data config's `{Path(d.sample_submission).name}` beside the test file, or the one CSV "
              "beside it named like a sample submission" if d.sample_submission else "none")
    return README.format(name=manifest["blend"], data=manifest["data"], time=manifest["created"],
                         commit=manifest["commit"], size_mb=manifest["bytes"] / 1e6, images=images,
                         models=", ".join(p["models"]), folds=p["n_folds"], sample=sample,
                         header=f"{d.id_col},{d.label_col}", py=f"{sys.version_info[0]}.{sys.version_info[1]}")


def _requirements(dest: Path) -> None:
    """The project's pinned requirements, or the installed versions of what the bundle imports."""
    src = paths.root() / "requirements.txt"
    if src.exists():
        _copy(src, dest)
        return
    lines = []
    for dist in PINNED:
        try:
            lines.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    fileio.write_text(dest, "\n".join(lines) + "\n")


def _manifest(p: dict[str, Any], folder: Path) -> dict[str, Any]:
    """What is in the bundle: members, folds, files with sizes and hashes."""
    from mmfold.ensemble.submission import git_commit, utc_now

    files = sorted(f for f in folder.rglob("*") if f.is_file())
    return {"data": p["cfg"].data.name, "blend": p["state"].meta["name"], "created": utc_now(), "commit": git_commit(),
            "models": {m: {"kind": i["kind"], "folds": len(i["dirs"])} for m, i in p["models"].items()},
            "n_folds": p["n_folds"], "bytes": sum(f.stat().st_size for f in files),
            "files": {str(f.relative_to(folder)): [f.stat().st_size, file_hash(f)] for f in files
                      if "mmfold" not in f.relative_to(folder).parts[:1]}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmfold export --name BLEND [--out DIR] [--kaggle-dataset OWNER/SLUG]``."""
    p.add_argument("--name", required=True, help="the logged blend to export (see `mmfold submit --show`)")
    p.add_argument("--out", help="the bundle folder to create (default: exports/<data>/<name>)")
    p.add_argument("--kaggle-dataset", metavar="OWNER/SLUG",
                   help="also upload the bundle as a private Kaggle dataset (a new version if it exists)")


def upload_to_kaggle(api: Any, data: str, name: str, out: Path, ref: str) -> None:
    """The bundle at ``out`` as Kaggle dataset ``ref``; its version notes carry the blend's
    honest CV and members, as its submissions do."""
    from mmfold import kaggle
    from mmfold.ensemble.submission import kaggle_message, log_row

    manifest = json.loads((out / "bundle.json").read_text(encoding="utf-8"))
    notes = f"{kaggle_message(data, log_row(data, name))}; bundle made {manifest['created']}"
    url, created = kaggle.upload_dataset(api, ref, out, f"mmfold {paths.data_name(data)} {name}", notes)
    print(f"{'created private' if created else 'new version of'} Kaggle dataset {ref}: {url}\n"
          f"  attach it to the notebook, then: python /kaggle/input/{ref.split('/')[1]}/predict.py --test <test.csv>")


def run(args: argparse.Namespace) -> int:
    """Check, copy, report the size; upload it where asked."""
    started = time.perf_counter()
    out = Path(args.out) if args.out else paths.root() / "exports" / paths.data_name(args.data) / args.name
    api = None
    if args.kaggle_dataset:
        from mmfold import kaggle

        kaggle.check_dataset(args.kaggle_dataset)
        api = kaggle.client()  # credentials checked before the export, not after it
    if out.exists():
        if not args.kaggle_dataset:
            raise UserError(f"{out} exists; bundles are never overwritten: remove it or pass --out (OUT=...)")
        if not (out / "bundle.json").exists():
            raise UserError(f"{out} exists but is not a bundle (no bundle.json); remove it or pass --out (OUT=...)")
        print(f"{out} exists: uploading it as it is")
    else:
        bundle = plan(args.data, args.name)
        out.parent.mkdir(parents=True, exist_ok=True)
        manifest = write_bundle(bundle, out)
        print(f"exported blend {args.name} ({len(manifest['models'])} members x {manifest['n_folds']} folds) to "
              f"{out}: {manifest['bytes'] / 1e6:.1f} MB in {time.perf_counter() - started:.1f}s\n"
              f"  run it offline: python {out / 'predict.py'} --test <test.csv> --out submission.csv")
    if api is not None:
        upload_to_kaggle(api, args.data, args.name, out, args.kaggle_dataset)
    return 0
