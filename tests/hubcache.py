"""A Hugging Face hub cache in the hub's own layout, built by tests from tiny models.

``huggingface_hub`` keeps ``<cache>/models--<org>--<name>/`` with ``blobs/<hash>`` (the
content, named by its sha256 for weight files and its git blob hash for small ones),
``snapshots/<commit>/<file>`` (relative symlinks to the blobs) and ``refs/<revision>`` (the
commit a branch or tag points at). :func:`add_snapshot` writes exactly that, so the code under
test reads it through ``huggingface_hub`` as it would read a cache filled by a download.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def repo_folder(cache: Path, repo_id: str) -> Path:
    """``<cache>/models--org--name``."""
    return cache / f"models--{repo_id.replace('/', '--')}"


def _blob_name(name: str, data: bytes) -> str:
    """sha256 for LFS (weight) files, the git blob sha1 for the rest, as the hub names them."""
    if name.endswith(WEIGHT_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_snapshot(cache: Path, repo_id: str, files: dict[str, bytes], revisions: tuple[str, ...] = ("main",),
                 commit: str | None = None) -> str:
    """Put ``files`` in the cache as one commit of ``repo_id`` that ``revisions`` point at.

    Returns:
        The commit hash (40 hex digits; derived from the content unless given).
    """
    commit = commit or hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items()))
                                    .encode()).hexdigest()
    root = repo_folder(cache, repo_id)
    for name, data in files.items():
        blob = root / "blobs" / _blob_name(name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    for rev in revisions:
        (root / "refs" / rev).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / rev).write_text(commit)
    return commit


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of a saved model folder (``save_pretrained``), by relative name."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def add_timm_model(cache: Path, name: str, seed: int = 0, revisions: tuple[str, ...] = ("main",)) -> tuple[str, dict]:
    """A timm ``test_*`` model's weights (with classifier, as on the hub) under its hub repo.

    Returns:
        ``(commit, state dict)``.
    """
    import timm
    import torch
    from safetensors.torch import save
    from timm.models import get_pretrained_cfg

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    repo = get_pretrained_cfg(name).hf_hub_id
    commit = add_snapshot(cache, repo, {"model.safetensors": save(sd), "config.json": b'{"architecture": "x"}'},
                          revisions)
    return commit, sd


def add_timm_folder(cache: Path, repo_id: str, arch: str = "test_resnet", seed: int = 0) -> tuple[str, dict]:
    """A timm model saved as timm saves for the hub (``save_for_hf``: config.json naming the
    architecture and its preprocessing + model.safetensors), as ``repo_id`` in the cache.

    Returns:
        ``(commit, state dict)``.
    """
    import tempfile

    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False)
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hf(model, tmp, safe_serialization=True)
        commit = add_snapshot(cache, repo_id, folder_files(Path(tmp)))
    return commit, model.state_dict()
