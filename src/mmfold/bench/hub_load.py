"""``make bench`` section "hub_load": building a backbone from a cached hub name costs no more
than from a local file of the same weights.

The same EfficientNet-Lite0 tensors (``weights/efficientnet_lite0.safetensors``, from the
pip-shipped package) are put in a throwaway hub cache in huggingface_hub's layout under the
repo timm names for ``efficientnet_lite0`` (``blobs/<sha256>``, a snapshot symlink,
``refs/main``), then the model is built both ways through :func:`mmfold.models.build_model`:
``pretrained_file:`` (our key-mapping loader) and ``backbone: efficientnet_lite0`` with
``pretrained: true`` (cache lookup + timm's own loader). Median of several builds each.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mmfold import hub


def _fake_hub(cache: Path, repo_id: str, weights: Path) -> None:
    """``weights`` as ``model.safetensors`` of ``repo_id`` at ``main`` in a hub-layout cache."""
    sha = hub.file_sha256(weights)
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / sha
    blob.parent.mkdir(parents=True)
    os.link(weights, blob) if weights.stat().st_dev == blob.parent.stat().st_dev else blob.write_bytes(
        weights.read_bytes())
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def _median_build_s(params: dict[str, Any], repeats: int) -> float:
    """Median seconds of ``build_model`` for an ``image`` model with ``params``."""
    from mmfold.config import Config
    from mmfold.models import build_model

    cfg = Config()
    cfg.model.kind, cfg.model.params = "image", {**params, "hidden": 0}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        build_model(cfg, ["a", "b"])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark(quick: bool = False) -> dict[str, Any]:
    """Seconds to build EfficientNet-Lite0 from the hub cache vs from the same local file."""
    from timm.models import get_pretrained_cfg

    from mmfold.models.weights import efficientnet_lite0_file

    weights = efficientnet_lite0_file()
    repo = get_pretrained_cfg("efficientnet_lite0").hf_hub_id
    repeats = 3 if quick else 7
    old = os.environ.get("HF_HUB_CACHE")
    with tempfile.TemporaryDirectory(prefix="mmfold-hubbench-") as tmp:
        _fake_hub(Path(tmp), repo, weights)
        os.environ["HF_HUB_CACHE"] = tmp
        try:
            _median_build_s({"backbone": "efficientnet_lite0"}, 1)  # warm-up: imports, timm registry
            local = _median_build_s({"backbone": "efficientnet_lite0", "pretrained_file": str(weights)}, repeats)
            cached = _median_build_s({"backbone": "efficientnet_lite0"}, repeats)
        finally:
            os.environ.pop("HF_HUB_CACHE") if old is None else os.environ.__setitem__("HF_HUB_CACHE", old)
    ratio = cached / local
    return {"local_file_s": round(local, 4), "hub_cache_s": round(cached, 4), "ratio": round(ratio, 3),
            "repeats": repeats, "repo": repo, "ok": ratio <= 1.1,
            "headline": f"hub name {cached * 1000:.0f} ms vs local file {local * 1000:.0f} ms (x{ratio:.2f})",
            "target": "<= x1.1 of the local file"}
