"""``make bench`` section "cache": images/s of the training data path, memmap cache vs decoding
JPEGs every epoch (both through the torch loop's own dataset and loader)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmfold import fileio, paths
from mmfold.data.competition import Competition
from mmfold.train.caches import JpegImages, image_cache


def benchmark(quick: bool = False) -> dict[str, Any]:
    """Images/s of the training data path: memmap cache vs decoding JPEGs every epoch.

    Both sides run the engine's own dataset and loader with the augmentations, image size and
    batch size of ``configs/models/demo_image.yaml`` (the demo's real training path); only
    where the pixels come from differs. The one-off cache build is timed separately
    (``cache_build_s``, about 0 when it already existed). Without demo data, random 256x256
    JPEGs are generated and read at 224.

    Returns:
        ``{"cache_images_per_s", "decode_images_per_s", "ratio", "cache_build_s", ...}``.
    """
    from mmfold.config import list_models, load_config
    from mmfold.data.competition import load_competition

    cfg = load_config("demo", "demo_image" if "demo_image" in list_models() else None)
    size, batch, augment = cfg.train.image_size or 64, cfg.train.batch_size, cfg.train.augment
    if not (Path(cfg.data.root) / cfg.data.train_csv).exists():
        cfg.data.root, size = str(_generated_images(paths.cache_dir("bench") / "jpegs", 300 if quick else 1000)), 224
        cfg.data.name, cfg.data.test_csv = "bench", None
    comp = load_competition(cfg.data, use_saved=False)
    start = time.perf_counter()
    image_cache(comp, "train", size, progress=False)
    build_s = time.perf_counter() - start
    epochs = 1 if quick else 3
    decode = _time_loader(comp, size, False, epochs, batch, augment)
    cached = _time_loader(comp, size, True, epochs, batch, augment)
    return {
        "data": cfg.data.name, "images": len(comp.train), "size": size, "batch_size": batch,
        "augment": [a.get("name") for a in augment], "epochs": epochs,
        "cache_images_per_s": round(cached, 1), "decode_images_per_s": round(decode, 1),
        "ratio": round(cached / decode, 2), "target_ratio": 5.0, "ok": cached / decode >= 5.0,
        "cache_build_s": round(build_s, 2),
    }


def _time_loader(comp: Competition, size: int, cached: bool, epochs: int, batch: int,
                 augment: list[dict[str, Any]]) -> float:
    """Images/s over ``epochs`` shuffled passes of the engine's loader (the cache is prebuilt)."""
    from mmfold.train.batches import FoldDataset, build_augment, make_loader

    rows = np.arange(len(comp.train))
    images = image_cache(comp, "train", size, progress=False) if cached else JpegImages(comp, "train", size)
    ds = FoldDataset(rows, images=images, y=comp.y(), transform=build_augment(augment), seed=0)
    loader = make_loader(ds, batch_size=batch, shuffle=True, num_workers=0, seed=0)
    start, seen = time.perf_counter(), 0
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)
        for b in loader:
            seen += len(b["y"])
    return seen / (time.perf_counter() - start)


def _generated_images(folder: Path, n: int) -> Path:
    """A labelled folder of ``n`` random 256x256 JPEGs, for benchmarking without demo data."""
    if (folder / "train.csv").exists():
        return folder
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
        fileio.atomic_write(folder / "images" / f"{i}.jpg", lambda t, a=arr: Image.fromarray(a).save(t, format="JPEG"))
    rows = "".join(f"{i}.jpg,a,x\n" for i in range(n))
    fileio.write_text(folder / "train.csv", "ImageID,Labels,Caption\n" + rows)
    return folder
