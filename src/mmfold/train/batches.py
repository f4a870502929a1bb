"""The data side of the torch engine: a fold's datasets, a resumable shuffle, the loaders, augmentation.

Why it is fast: images are decoded once into a ``uint8`` memmap (:mod:`mmfold.train.caches`), a
batch is read with one fancy index, moved to the device as ``uint8`` (4x less traffic than
float) and normalised there (:func:`model_inputs`). Why it resumes exactly: the shuffle order
is a function of ``(seed, epoch)`` (:class:`EpochSampler`, or :class:`LengthBucketSampler` for
captions batched by length) and augmentations are seeded per batch, so neither depends on
worker count nor on where a run was resumed.
"""

from __future__ import annotations

import os

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from mmfold.config import Config, ConfigError, TrainConfig
from mmfold.data.competition import Competition
from mmfold.errors import UserError
from mmfold.train.caches import image_cache, token_cache
from mmfold.canonical import canonical_batches, is_filler, padded_length, token_multiple

__all__ = ["FoldDataset", "EpochSampler", "LengthBucketSampler", "caption_lengths", "make_loader", "fold_loaders",
           "build_augment", "FoldData", "build_data", "model_inputs"]


class FoldDataset(Dataset):
    """Some rows of one split; returns whole batches through ``__getitems__``.

    One fancy index into the memmap per batch beats one read per image, and per-batch
    augmentation seeds (``seed``, ``epoch``, first position) make the pixels a model sees
    independent of worker count and of where a run was resumed.

    Args:
        rows: Row numbers into the split's arrays.
        images: ``(N, H, W, 3) uint8`` memmap (or any object indexed the same way), or None.
        tokens: ``{"input_ids", "attention_mask"}`` ``(N, T)`` arrays, or None.
        y: 0/1 labels ``(N, L)``, or None for the test split.
        transform: An albumentations ``Compose`` for training, or None.
        seed: Base of the augmentation seeds.
        feats: Cached frozen-prefix outputs by batch key (:mod:`mmfold.train.prefix_cache`):
            ``image_feats`` ``(N, 2, C, h, w)`` (image, flipped image), ``text_states`` ``(N, T, H)``.
        flip_p: Training: the chance that a row's cached ``image_feats`` come from the
            flipped image (0: never). None (evaluation) returns both views, for flip TTA.

        canonical: An evaluation dataset: captions padded to their canonical length (a
            multiple of this many tokens) and filler rows of canonical batches marked
            (``filler``), see :mod:`mmfold.canonical`. 0: a training dataset.
    """

    def __init__(self, rows: np.ndarray, images: Any = None, tokens: dict[str, np.ndarray] | None = None,
                 y: np.ndarray | None = None, transform: Any = None, seed: int = 0,
                 feats: dict[str, np.ndarray] | None = None, flip_p: float | None = None,
                 canonical: int = 0) -> None:
        self.rows, self.images, self.tokens, self.y = np.asarray(rows), images, tokens, y
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.feats, self.flip_p = dict(feats or {}), flip_p
        self.canonical = canonical

    @property
    def lengths(self) -> np.ndarray | None:
        """Token count of each position's caption (None without captions)."""
        return None if self.tokens is None else self.tokens["attention_mask"][self.rows].sum(1)

    def set_epoch(self, epoch: int) -> None:
        """New augmentations each epoch, the same ones on a rerun."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, pos: list[int]) -> dict[str, torch.Tensor]:
        """A collated batch: ``index``, ``image`` uint8 (B,H,W,3), token ids, ``y``."""
        rows = self.rows[pos]
        out = {"index": torch.as_tensor(pos, dtype=torch.long)}
        if self.images is not None:
            out["image"] = torch.from_numpy(self._images(rows, pos[0]))
        if self.tokens is not None:
            out.update(_trimmed_tokens(self.tokens, rows, multiple=self.canonical))
        if self.canonical:
            out["filler"] = torch.from_numpy(is_filler(np.asarray(pos)))
        if "image_feats" in self.feats:
            out["image_feats"] = torch.from_numpy(self._image_feats(rows, pos[0]))
        if "text_states" in self.feats:
            t = out["attention_mask"].shape[1]
            out["text_states"] = torch.from_numpy(_sorted_read(self.feats["text_states"], rows)[:, :t])
        if self.y is not None:
            out["y"] = torch.from_numpy(self.y[rows].astype(np.float32))
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])

    def _images(self, rows: np.ndarray, first: int) -> np.ndarray:
        """Read rows in sorted order (sequential on disk), augment with a per-batch seed."""
        imgs = _sorted_read(self.images, rows, np.uint8)
        if self.transform is not None:
            self.transform.set_random_seed(self.seed * 1_000_003 + self.epoch * 7919 + first)
            imgs = np.stack([self.transform(image=im)["image"] for im in imgs])
        return imgs

    def _image_feats(self, rows: np.ndarray, first: int) -> np.ndarray:
        """Cached views ``(B, 2, C, h, w)`` for evaluation; in training one view per row,
        the flipped one with probability ``flip_p`` (seeded per batch, like the augmentations)."""
        both = _sorted_read(self.feats["image_feats"], rows)
        if self.flip_p is None:
            return both
        rng = np.random.default_rng(self.seed * 1_000_003 + self.epoch * 7919 + first)
        flip = (rng.random(len(rows)) < self.flip_p).astype(np.int64)
        return both[np.arange(len(rows)), flip]

    def __getstate__(self) -> dict[str, Any]:
        """Workers reopen memmaps instead of receiving a pickled copy of every pixel."""
        state = dict(self.__dict__)
        state["images"] = _memmap_ref(self.images)
        state["feats"] = {k: _memmap_ref(v) for k, v in self.feats.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["images"] = _reopen(state["images"])
        state["feats"] = {k: _reopen(v) for k, v in state["feats"].items()}
        self.__dict__.update(state)


def _sorted_read(arr: Any, rows: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """``arr[rows]`` as ``dtype``, read in sorted order (sequential on disk)."""
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *arr.shape[1:]), dtype)
    out[order] = arr[rows[order]]
    return out


def _memmap_ref(arr: Any) -> Any:
    """A memmap as ``("memmap", file, dtype, shape)``; anything else as it is."""
    if isinstance(arr, np.memmap):
        return ("memmap", arr.filename, arr.dtype.str, arr.shape)
    return arr


def _reopen(ref: Any) -> Any:
    """Inverse of :func:`_memmap_ref`."""
    if isinstance(ref, tuple) and ref and ref[0] == "memmap":
        _, name, dtype, shape = ref
        return np.memmap(name, dtype=np.dtype(dtype), mode="r", shape=shape)
    return ref


def _trimmed_tokens(tokens: dict[str, np.ndarray], rows: np.ndarray, multiple: int = 0) -> dict[str, torch.Tensor]:
    """Token ids cut to the longest caption in the batch (padding costs attention time), or
    with a ``multiple`` to the batch's padded length (:func:`mmfold.canonical.padded_length`)."""
    mask = tokens["attention_mask"][rows]
    longest = int(mask.sum(1).max())
    t = int(padded_length(longest, mask.shape[1], multiple)) if multiple else max(longest, 1)
    return {"input_ids": torch.from_numpy(tokens["input_ids"][rows, :t].astype(np.int64)),
            "attention_mask": torch.from_numpy(mask[:, :t].astype(np.int64))}


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on ``(seed, epoch)``: resumable without saving its state."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Accelerate's loaders call this with their epoch counter; so do we."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class LengthBucketSampler(BatchSampler):
    """Batches of captions of similar length, in an order that depends only on ``(seed, epoch)``.

    Each epoch the rows are shuffled exactly as :class:`EpochSampler` would, cut into pools of
    ``pool_batches`` batches, sorted by caption length within each pool (stable, so ties keep
    the random order) and cut into batches; then the batch order is shuffled. Batches are
    trimmed to their longest caption (:func:`_trimmed_tokens`), so little compute goes on
    padding, while which rows meet in a batch still changes every epoch. A last batch of one
    row is dropped (BatchNorm cannot use it), as the plain loader does.

    A ``BatchSampler`` with a ``sampler`` that has ``set_epoch``, so accelerate's
    ``DataLoaderShard.set_epoch``, ``BatchSamplerShard`` (several processes) and
    ``skip_first_batches`` (resume mid-epoch) all treat it like the plain shuffle.

    Args:
        lengths: Caption length in tokens of each dataset position.
        batch_size: Rows per batch.
        pool_batches: Batches per length-sorted pool (>= 1); larger pools waste less padding.
        seed: Base of the per-epoch shuffles.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, pool_batches: int, seed: int) -> None:
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size}, {pool_batches}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        super().__init__(EpochSampler(len(self.lengths), seed), batch_size, drop_last=False)
        self.pool_batches = int(pool_batches)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Accelerate calls this (and ``sampler.set_epoch``) with its epoch counter; so do we."""
        self.sampler.set_epoch(epoch)

    def batches(self) -> list[list[int]]:
        """This epoch's batches (dataset positions), in training order."""
        order = np.asarray(list(iter(self.sampler)), dtype=np.int64)
        pool = self.batch_size * self.pool_batches
        for start in range(0, len(order), pool):
            chunk = order[start:start + pool]
            order[start:start + pool] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
        cuts = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if cuts and len(cuts[-1]) == 1 and len(order) > 1:
            cuts.pop()
        g = torch.Generator().manual_seed(self.sampler.seed * 1_000_003 + self.sampler.epoch + 500_009)
        return [cuts[i].tolist() for i in torch.randperm(len(cuts), generator=g).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size + (n % self.batch_size > 1 or n == 1)


def caption_lengths(ds: FoldDataset) -> np.ndarray:
    """Tokens (attention mask sum) of each position's caption."""
    return ds.tokens["attention_mask"][ds.rows].sum(1)


class CanonicalBatchSampler(BatchSampler):
    """Evaluation batches that make a row's prediction independent of the other rows
    (:func:`mmfold.canonical.canonical_batches`): grouped by padded caption length,
    each exactly ``batch_size`` rows."""

    def __init__(self, ds: FoldDataset, batch_size: int) -> None:
        super().__init__(SequentialSampler(ds), batch_size, drop_last=False)
        width = 0 if ds.tokens is None else ds.tokens["attention_mask"].shape[1]
        batches = canonical_batches(len(ds), batch_size, ds.lengths, width, ds.canonical) if len(ds) else []
        self._batches = [b.tolist() for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def _batch_as_is(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``collate_fn``: :meth:`FoldDataset.__getitems__` already returns a batch."""
    return batch


def make_loader(ds: FoldDataset, batch_size: int, *, shuffle: bool, num_workers: int = 0, seed: int = 0,
                pin_memory: bool = False, length_buckets: int = 0) -> DataLoader:
    """A DataLoader over batches; training drops a last batch of one (BatchNorm cannot use it).

    ``length_buckets`` > 0 (with ``shuffle`` and captions): batches of similar caption length
    from pools of that many batches (:class:`LengthBucketSampler`); 0: a plain shuffle.
    """
    if shuffle and length_buckets and ds.tokens is not None:
        return DataLoader(ds, batch_sampler=LengthBucketSampler(caption_lengths(ds), batch_size, length_buckets, seed),
                          num_workers=num_workers, collate_fn=_batch_as_is, pin_memory=pin_memory,
                          generator=torch.Generator().manual_seed(seed))
    if not shuffle and ds.canonical:
        return DataLoader(ds, batch_sampler=CanonicalBatchSampler(ds, batch_size), num_workers=num_workers,
                          collate_fn=_batch_as_is, pin_memory=pin_memory)
    sampler = EpochSampler(len(ds), seed) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=_batch_as_is, pin_memory=pin_memory,
                      drop_last=shuffle and len(ds) % batch_size == 1,
                      generator=torch.Generator().manual_seed(seed))


def build_augment(spec: list[dict[str, Any]]) -> Any:
    """An albumentations ``Compose`` from ``train.augment`` (``[{name: HorizontalFlip, p: 0.5}]``).

    Raises:
        ConfigError: an unknown transform name or invalid arguments, naming the entry.
    """
    if not spec:
        return None
    # albumentations' import asks PyPI for a newer release unless told not to: a connection on
    # every training start (and a time-out offline); training never opens one
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    def one(entry: dict[str, Any]) -> Any:
        args = dict(entry)
        name = args.pop("name", None)
        if not isinstance(getattr(A, str(name), None), type):
            raise ConfigError(f"train.augment: unknown albumentations transform {name!r} in {entry}")
        try:
            return getattr(A, name)(**args)
        except Exception as e:  # albumentations validates with pydantic, many error types
            raise ConfigError(f"train.augment: {entry}: {e}") from e

    return A.Compose([one(e) for e in spec])


@dataclass
class FoldData:
    """The fold's datasets, how to turn their batches into model inputs, and the tokenizer the
    captions were encoded with (saved with the fold's best checkpoint)."""

    train: FoldDataset | None
    valid: FoldDataset | None
    test: FoldDataset | None
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    tokenizer: Any = None


def split_inputs(cfg: Config, comp: Competition, model: nn.Module, tokenizer: Any,
                 splits: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any], Any, Any]:
    """Cached images and token ids of each split the model reads, and the pixel mean/std.

    Returns:
        ``(images, tokens, mean, std)``: ``{split: memmap or None}`` twice, then the
        ``(1, 3, 1, 1)`` normalisation tensors (None for text-only models).
    """
    t = cfg.train
    images, tokens = dict.fromkeys(splits), dict.fromkeys(splits)
    mean = std = None
    if model.needs_image:
        if not comp.has_images:
            raise UserError(f"model {cfg.model.name} needs images but data {comp.cfg.name} has none")
        dc = model.image_data_config
        images = {s: image_cache(comp, s, tuple(dc["input_size"][1:]), progress=t.progress) for s in splits}
        mean, std = (torch.tensor(dc[k], dtype=torch.float32).view(1, 3, 1, 1) for k in ("mean", "std"))
    if model.needs_text:
        tokens = {s: token_cache(comp, s, tokenizer, t.max_len) for s in splits}
    return images, tokens, mean, std


def build_data(cfg: Config, comp: Competition, model: nn.Module, train_rows: np.ndarray,
               valid_rows: np.ndarray, device: torch.device | None = None) -> FoldData:
    """Datasets over the cached images/tokens the model needs (built on first use).

    A model with frozen prefixes (``model.params.train_blocks`` / ``train_layers``) reads their
    cached outputs instead of pixels (:mod:`mmfold.train.prefix_cache`, run on ``device``).
    The word vocabulary of an LSTM encoder is fitted on ``train_rows``' captions only.
    """
    from mmfold.models import build_tokenizer

    t, y, has_test = cfg.train, comp.y(), comp.test is not None and len(comp.test) > 0
    tok = build_tokenizer(cfg, comp.train["caption"].iloc[train_rows].tolist())
    splits = ("train", "test") if has_test else ("train",)
    images, tokens, mean, std = split_inputs(cfg, comp, model, tok, splits)
    feats, flip_p = _prefix_feats(comp, model, images, tokens, mean, std, device, t)
    if "image_feats" in feats["train"]:
        images = {s: None for s in images}  # the cache replaces the pixels
    aug = build_augment(t.augment) if images["train"] is not None else None
    multiple = token_multiple(model)
    test = (FoldDataset(np.arange(len(comp.test)), images.get("test"), tokens.get("test"), feats=feats.get("test"),
                        canonical=multiple) if has_test else None)
    return FoldData(train=FoldDataset(train_rows, images["train"], tokens["train"], y, aug, t.seed,
                                      feats=feats["train"], flip_p=flip_p),
                    valid=FoldDataset(valid_rows, images["train"], tokens["train"], y, feats=feats["train"],
                                      canonical=multiple),
                    test=test, mean=mean, std=std, tokenizer=tok)


def build_test_data(cfg: Config, comp: Competition, model: nn.Module, tokenizer: Any,
                    device: torch.device | None = None) -> FoldData:
    """The test split alone, encoded with a fold's saved ``tokenizer``: what predicting a new
    test set from a saved fold needs (no train rows are read)."""
    images, tokens, mean, std = split_inputs(cfg, comp, model, tokenizer, ("test",))
    feats, _ = _prefix_feats(comp, model, images, tokens, mean, std, device, cfg.train)
    if "image_feats" in feats["test"]:
        images = {"test": None}
    test = FoldDataset(np.arange(len(comp.test)), images["test"], tokens["test"], feats=feats["test"],
                       canonical=token_multiple(model))
    return FoldData(train=None, valid=None, test=test, mean=mean, std=std, tokenizer=tokenizer)


def _prefix_feats(comp: Competition, model: nn.Module, images: dict[str, Any], tokens: dict[str, Any],
                  mean: torch.Tensor | None, std: torch.Tensor | None, device: torch.device | None,
                  t: TrainConfig) -> tuple[dict[str, dict[str, np.ndarray]], float]:
    """Cached frozen-prefix outputs per split (empty without prefixes) and the training flip chance."""
    prefixes = model.frozen_prefixes()
    if not prefixes:
        return {s: {} for s in images}, 0.0
    from mmfold.train.prefix_cache import flip_probability, prefix_caches

    flip_p = flip_probability(t.augment) if "image_feats" in prefixes else 0.0
    inputs = {s: {"images": images.get(s), "tokens": tokens.get(s), "mean": mean, "std": std}
              for s in ("train", "test") if images.get(s) is not None or tokens.get(s) is not None}
    return prefix_caches(comp, model, inputs, device or torch.device("cpu"), progress=t.progress), flip_p


def fold_loaders(data: FoldData, t: TrainConfig, *, pin_memory: bool) -> list[DataLoader]:
    """``[train, valid]`` or ``[train, valid, test]``: training shuffled (batched by caption
    length with ``train.length_buckets``), the others in order in batches twice as large (no
    activations are kept for a backward pass).

    Raises:
        ConfigError: a negative ``train.length_buckets``.
    """
    if t.length_buckets < 0:
        raise ConfigError(f"train.length_buckets must be >= 0 (0 = plain shuffle), got {t.length_buckets}")
    loaders = [make_loader(data.train, t.batch_size, shuffle=True, num_workers=t.num_workers, seed=t.seed,
                           pin_memory=pin_memory, length_buckets=t.length_buckets)]
    loaders += [make_loader(ds, t.batch_size * 2, shuffle=False, num_workers=t.num_workers, seed=t.seed,
                            pin_memory=pin_memory) for ds in (data.valid, data.test) if ds is not None]
    return loaders


def model_inputs(batch: dict[str, torch.Tensor], data: FoldData, *,
                 channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Normalise ``uint8`` images on the device (NHWC -> NCHW float); pass token ids and
    cached prefix outputs through."""
    x = {k: batch[k] for k in ("input_ids", "attention_mask", "image_feats", "text_states") if k in batch}
    if channels_last and "image_feats" in x and x["image_feats"].ndim == 4:  # a training batch: one view
        x["image_feats"] = x["image_feats"].contiguous(memory_format=torch.channels_last)
    if "image" in batch:
        img = batch["image"].permute(0, 3, 1, 2).float().div_(255)
        img = (img - data.mean.to(img.device)) / data.std.to(img.device)
        x["image"] = img.contiguous(memory_format=torch.channels_last) if channels_last else img
    return x
