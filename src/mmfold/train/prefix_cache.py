"""Run a frozen lower part of a backbone once per dataset and cache its outputs.

When only the top of a pretrained encoder trains (``model.params.train_blocks`` for a timm
image backbone, ``train_layers`` for a Hugging Face text encoder), the lower part computes the
same thing for an image or caption in every epoch of every fold. On a CPU that repeated work
is most of a fine-tuning run, so it is done once here and the trainable rest reads the result
(:meth:`mmfold.models.base.MultiLabelModel.frozen_prefixes`). The caches are label-free and
fold-independent, keyed by a hash of the prefix's own weights and of its inputs, so every
fold, model and rerun that shares them reads one file
(``cache/<data>/prefix_<key>_<split>_<hash>.f16``, float16 to halve memory and disk).

* ``image_feats``: ``(N, 2, C, h, w)``, the image and its horizontal flip, so the flip
  augmentation and flip TTA survive caching (other augmentations cannot: they change the
  pixels the frozen layers would see, see :func:`flip_probability`).
* ``text_states``: ``(N, T, H)`` token states, zero after each caption's end, ``T`` the
  split's longest caption (padded as :mod:`mmfold.canonical` pads it); batches are
  cut to their own padded length when read.

Rows are computed in canonical batches (:func:`mmfold.canonical.canonical_batches`), so
a row's cached output is the same whichever split or test set it is computed in.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mmfold import fileio, paths
from mmfold.config import ConfigError, stable_hash
from mmfold.data.competition import Competition
from mmfold.canonical import canonical_batches, padded_length

__all__ = ["PREFIX_VERSION", "prefix_caches", "flip_probability", "weights_digest"]

PREFIX_VERSION = 2  # bump when what is cached changes, so old files are not reused
BATCH = 256  # rows per prefix forward pass: inference only, no activations are kept


def weights_digest(module: nn.Module) -> str:
    """sha1 of every parameter and buffer of ``module``: the cache is only valid for these weights."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def flip_probability(augment: list[dict[str, Any]]) -> float:
    """The horizontal-flip probability of ``train.augment``, the one transform a cached image prefix keeps.

    Raises:
        ConfigError: any other transform, which would need the frozen layers re-run per epoch.
    """
    other = [a.get("name") for a in augment if a.get("name") != "HorizontalFlip"]
    if other:
        raise ConfigError(f"train.augment {other} cannot be used with model.params.train_blocks: the frozen "
                          "stages' output is cached, so only HorizontalFlip (cached both ways) is kept; "
                          "drop them or unset train_blocks")
    return float(next((a.get("p", 0.5) for a in augment), 0.0))


def prefix_caches(comp: Competition, model: nn.Module, inputs: dict[str, dict[str, Any]],
                  device: torch.device, *, progress: bool = True) -> dict[str, dict[str, np.memmap]]:
    """The cached prefix outputs of every split, built on first use.

    Args:
        comp: The competition (names the cache folder).
        model: A :class:`~mmfold.models.base.MultiLabelModel` with frozen prefixes.
        inputs: Per split (``train``/``test``), what the prefixes read: ``images`` (normalised
            by ``mean``/``std``, both ``(1, 3, 1, 1)`` tensors) and/or ``tokens``.
        device: Where the prefixes run.

    Returns:
        ``{split: {"image_feats" | "text_states": memmap}}``.
    """
    out: dict[str, dict[str, np.memmap]] = {split: {} for split in inputs}
    for key, prefix in model.frozen_prefixes().items():
        prefix.to(device).eval()
        digest = weights_digest(prefix)
        for split, src in inputs.items():
            out[split][key] = _one_cache(comp, key, split, prefix, digest, src, device, progress=progress)
    return out


def _one_cache(comp: Competition, key: str, split: str, prefix: nn.Module, digest: str,
               src: dict[str, Any], device: torch.device, *, progress: bool) -> np.memmap:
    """Open (or build, atomically) one split's cache of one prefix."""
    run = RUNNERS[key]
    n, identity = run.describe(src)
    shape = (n, *run.row_shape(prefix, src, device))
    name = stable_hash([PREFIX_VERSION, key, digest, identity, shape])
    path = paths.cache_dir(comp.cfg.name) / f"prefix_{key}_{split}_{name}.f16"
    # folds trained side by side (mmfold train --jobs) wait for the first to build it
    with fileio.file_lock(path.with_name(f".{path.name}.lock"), wait=True):
        if not path.exists() or path.stat().st_size != int(np.prod(shape)) * 2:
            fileio.atomic_write(path, lambda tmp: _build(tmp, shape, run, prefix, src, device,
                                                         f"{key} {split}", progress=progress))
    return np.memmap(path, dtype=np.float16, mode="r", shape=shape)


def _build(tmp: Path, shape: tuple[int, ...], run: Any, prefix: nn.Module, src: dict[str, Any],
           device: torch.device, desc: str, *, progress: bool) -> None:
    """Fill a new float16 memmap at ``tmp`` batch by batch (canonical batches: filler rows
    repeat a row of the batch and write the same values again)."""
    arr = np.memmap(tmp, dtype=np.float16, mode="w+", shape=shape)
    batches = canonical_batches(shape[0], BATCH, *run.lengths(src)) if shape[0] else []
    with torch.no_grad():
        for rows in tqdm(batches, desc=f"cache {desc}", disable=not progress, leave=False):
            arr[rows] = run.compute(prefix, src, rows, device, shape[1:])
    arr.flush()
    del arr


class ImageRunner:
    """``images`` (uint8 memmap) -> ``(2, C, h, w)`` per row: the image and its flip."""

    @staticmethod
    def describe(src: dict[str, Any]) -> tuple[int, Any]:
        images = src["images"]
        # a cache memmap's name already holds a fingerprint of its files; other arrays are hashed
        pixels = (Path(images.filename).name if isinstance(images, np.memmap)
                  else hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()[:16])
        return len(images), [pixels, src["mean"].flatten().tolist(), src["std"].flatten().tolist()]

    @staticmethod
    def _pixels(src: dict[str, Any], rows: np.ndarray, device: torch.device) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(src["images"][rows])).to(device).permute(0, 3, 1, 2).float().div_(255)
        x = (x - src["mean"].to(device)) / src["std"].to(device)
        return x.contiguous(memory_format=torch.channels_last)  # NHWC convolutions: faster on a CPU

    @classmethod
    def row_shape(cls, prefix: nn.Module, src: dict[str, Any], device: torch.device) -> tuple[int, ...]:
        with torch.no_grad():
            return (2, *prefix(cls._pixels(src, np.arange(1), device)).shape[1:])

    @staticmethod
    def lengths(src: dict[str, Any]) -> tuple[None, int]:
        return None, 0  # one group: every image has the same shape

    @classmethod
    def compute(cls, prefix: nn.Module, src: dict[str, Any], rows: np.ndarray, device: torch.device,
                row_shape: tuple[int, ...]) -> np.ndarray:
        x = cls._pixels(src, rows, device)
        return torch.stack([prefix(x), prefix(x.flip(3))], dim=1).cpu().numpy().astype(np.float16)


class TextRunner:
    """``tokens`` -> ``(T, H)`` per row, zero after the caption's end; batches sorted by length."""

    @staticmethod
    def describe(src: dict[str, Any]) -> tuple[int, Any]:
        ids = np.ascontiguousarray(src["tokens"]["input_ids"])
        mask = np.ascontiguousarray(src["tokens"]["attention_mask"])
        return len(ids), hashlib.sha1(ids.tobytes() + mask.tobytes()).hexdigest()[:16]

    @staticmethod
    def row_shape(prefix: nn.Module, src: dict[str, Any], device: torch.device) -> tuple[int, ...]:
        mask = src["tokens"]["attention_mask"]
        t = int(padded_length(mask.sum(1).max(initial=1), mask.shape[1]))
        with torch.no_grad():
            ids = torch.from_numpy(src["tokens"]["input_ids"][:1, :1].astype(np.int64)).to(device)
            hidden = prefix(ids, torch.ones_like(ids)).shape[-1]
        return t, hidden

    @staticmethod
    def lengths(src: dict[str, Any]) -> tuple[np.ndarray, int]:
        mask = src["tokens"]["attention_mask"]
        return mask.sum(1), mask.shape[1]

    @staticmethod
    def compute(prefix: nn.Module, src: dict[str, Any], rows: np.ndarray, device: torch.device,
                row_shape: tuple[int, ...]) -> np.ndarray:
        mask = src["tokens"]["attention_mask"][rows]
        t = int(padded_length(mask.sum(1).max(), mask.shape[1]))  # the same for the whole batch
        ids = torch.from_numpy(src["tokens"]["input_ids"][rows, :t].astype(np.int64)).to(device)
        m = torch.from_numpy(mask[:, :t].astype(np.int64)).to(device)
        states = (prefix(ids, m) * m.unsqueeze(-1)).cpu().numpy().astype(np.float16)
        out = np.zeros((len(rows), *row_shape), np.float16)
        out[:, :t] = states[:, :row_shape[0]]
        return out


RUNNERS = {"image_feats": ImageRunner, "text_states": TextRunner}
