"""Decode once, train many times: image memmaps and token-id arrays shared by every run.

Decoding and resizing a JPEG costs far more than an epoch's worth of reading the same pixels
from a page-cached ``uint8`` array, so each split is decoded once per image size into
``cache/<data>/images_<split>_<H>x<W>_<hash>.u8`` and reused by every epoch, fold and model.
Captions are tokenised once per tokenizer into an ``.npz`` beside it. The hash covers the ids
and each file's size and mtime, so replacing an image makes a new cache instead of a stale one.
Builds are atomic (temp file, then rename), so parallel runs or a kill never leave half a cache.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from mmfold import fileio, paths
from mmfold.config import stable_hash
from mmfold.cpu.threads import available_cores
from mmfold.data.competition import MAX_DECODE_THREADS, Competition
from mmfold.errors import DataError

CACHE_VERSION = 1  # bump when decoding/resizing changes, so old caches are not reused
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class Tokenizer(Protocol):
    """What :func:`token_cache` needs from ``mmfold.models.build_tokenizer``."""

    key: str

    def __call__(self, texts: list[str], max_len: int) -> dict[str, np.ndarray]: ...


def as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """``224`` or ``(224, 224)`` -> ``(H, W)``."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    16-bit and float greyscale are rescaled (PIL's own ``convert`` would clip them to white);
    transparent pixels are composited onto white, the usual background of product photos.
    """
    if im.mode in HIGH_BIT_MODES:
        a = np.asarray(im, dtype=np.float32)
        top = 65535.0 if a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Decode, orient (EXIF), convert to RGB and resize one image -> ``(H, W, 3) uint8``.

    ``draft`` lets the JPEG decoder downscale by 2-8x in the DCT, which makes building a
    small-size cache from large photos several times faster.

    Raises:
        DataError: the file cannot be decoded (named, with PIL's reason).
    """
    h, w = size
    try:
        with Image.open(path) as im:
            im.draft("RGB", (w, h))
            im = to_rgb(ImageOps.exif_transpose(im))
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's ways of saying "corrupt"
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


class JpegImages:
    """Decode-on-access image source with the memmap's indexing (the benchmark's baseline).

    ``images[rows]`` decodes those files now, every time: what a loader without the cache does.
    """

    def __init__(self, comp: Competition, split: str, size: int | tuple[int, int]) -> None:
        self.files = [comp.image_path(i) for i in comp.ids(split)]
        self.size = as_hw(size)
        self.shape = (len(self.files), *self.size, 3)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return np.stack([load_image(self.files[i], self.size) for i in np.atleast_1d(rows)])


def _fingerprint(comp: Competition, split: str, extra: Any) -> str:
    """Hash of the ids and each image's (size, mtime): a changed file means a new cache."""
    files = [comp.image_path(i) for i in comp.ids(split)]
    stats = [(p.name, *_stat(p)) for p in files]
    return stable_hash([CACHE_VERSION, str(Path(comp.cfg.root).resolve()), split, stats, extra])


def _stat(p: Path) -> tuple[int, int]:
    """(bytes, mtime_ns) of a file."""
    s = p.stat()
    return s.st_size, s.st_mtime_ns


def image_cache(comp: Competition, split: str, size: int | tuple[int, int], *, progress: bool = True) -> np.memmap:
    """Every image of ``split`` decoded at ``size``, as a read-only ``(N, H, W, 3) uint8`` memmap.

    Built on first use (threads decode in parallel; PIL releases the GIL), then just opened.

    Raises:
        DataError: an image cannot be decoded; the file is named and no cache is written.
    """
    h, w = as_hw(size)
    n = len(comp.ids(split))
    path = paths.cache_dir(comp.cfg.name) / f"images_{split}_{h}x{w}_{_fingerprint(comp, split, (h, w))}.u8"
    if not path.exists() or path.stat().st_size != n * h * w * 3:
        fileio.atomic_write(path, lambda tmp: _build_images(comp, split, (h, w), tmp, progress=progress))
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(n, h, w, 3))


def _build_images(comp: Competition, split: str, size: tuple[int, int], out: Path, *, progress: bool) -> None:
    """Decode every image of ``split`` into a new memmap file at ``out``."""
    files = [comp.image_path(i) for i in comp.ids(split)]
    arr = np.memmap(out, dtype=np.uint8, mode="w+", shape=(len(files), *size, 3))
    with ThreadPoolExecutor(max_workers=min(MAX_DECODE_THREADS, available_cores())) as pool:
        decoded = pool.map(lambda p: load_image(p, size), files, chunksize=64)
        bar = tqdm(decoded, total=len(files), desc=f"cache {split} {size[0]}x{size[1]}",
                   disable=not progress, leave=False)
        for i, img in enumerate(bar):
            arr[i] = img
    arr.flush()
    del arr


def token_cache(comp: Competition, split: str, tokenizer: Tokenizer, max_len: int) -> dict[str, np.ndarray]:
    """Token ids and attention masks of every caption of ``split``, tokenised once per tokenizer.

    Returns:
        ``{"input_ids", "attention_mask"}``, ``int32 (N, max_len)`` (halves the cache; the engine
        widens batches to ``int64``).
    """
    df = comp.train if split == "train" else comp.test
    captions = [] if df is None else df["caption"].tolist()
    key = stable_hash([CACHE_VERSION, tokenizer.key, max_len, captions])
    path = paths.cache_dir(comp.cfg.name) / f"tokens_{split}_{max_len}_{key}.npz"
    if not path.exists():
        out = tokenizer(captions, max_len)
        arrays = {k: np.asarray(out[k], dtype=np.int32) for k in ("input_ids", "attention_mask")}
        fileio.atomic_write(path, lambda tmp: _save_npz(tmp, arrays))
    with np.load(path) as z:
        return {k: z[k] for k in ("input_ids", "attention_mask")}


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` through a file object (it would append ``.npz`` to a bare temp name)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)
