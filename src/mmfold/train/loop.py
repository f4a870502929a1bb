"""The torch engine: train one model on one fold, resumably, and predict its OOF and test rows.

:func:`train_fold` is the whole training loop in one function; everything around it is a
small helper. The same code runs on a CPU, one GPU or under ``accelerate launch`` (DDP):
Hugging Face Accelerate places tensors, runs AMP, syncs gradients and shards the loaders, and
only the main process writes files.

Why it is fast: images are decoded once into a ``uint8`` memmap (:mod:`mmfold.train.caches`), a
batch is read with one fancy index, moved to the device as ``uint8`` (4x less traffic than
float) and normalised there. Why it resumes exactly: the shuffle order is a function of
``(seed, epoch)``, augmentations are seeded per batch, and ``last.pt`` stores every RNG state,
so a run stopped after any optimizer step and resumed ends with the same weights as one that
never stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler
from tqdm.auto import tqdm

from mmfold import fileio
from mmfold.train.caches import image_cache, token_cache
from mmfold.config import (RUN_LENGTH_KEYS, Config, ConfigError, TrainConfig, describe_diff, learning_diff,
                           save_config)
from mmfold.data.competition import Competition
from mmfold.errors import UserError
from mmfold.metrics import METRICS, binarize
from mmfold.train.fold import EPOCH_CALLBACKS, FoldOutput

CKPT_VERSION = 1
__all__ = ["FoldOutput", "FoldDataset", "train_fold", "make_loader", "build_augment"]


# ------------------------------------------------------------------------------------ data


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
    """

    def __init__(self, rows: np.ndarray, images: Any = None, tokens: dict[str, np.ndarray] | None = None,
                 y: np.ndarray | None = None, transform: Any = None, seed: int = 0) -> None:
        self.rows, self.images, self.tokens, self.y = np.asarray(rows), images, tokens, y
        self.transform, self.seed, self.epoch = transform, seed, 0

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
            out.update(_trimmed_tokens(self.tokens, rows))
        if self.y is not None:
            out["y"] = torch.from_numpy(self.y[rows].astype(np.float32))
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])

    def _images(self, rows: np.ndarray, first: int) -> np.ndarray:
        """Read rows in sorted order (sequential on disk), augment with a per-batch seed."""
        order = np.argsort(rows, kind="stable")
        imgs = np.empty((len(rows), *self.images.shape[1:]), np.uint8)
        imgs[order] = self.images[rows[order]]
        if self.transform is not None:
            self.transform.set_random_seed(self.seed * 1_000_003 + self.epoch * 7919 + first)
            imgs = np.stack([self.transform(image=im)["image"] for im in imgs])
        return imgs

    def __getstate__(self) -> dict[str, Any]:
        """Workers reopen the memmap instead of receiving a pickled copy of every pixel."""
        state = dict(self.__dict__)
        if isinstance(self.images, np.memmap):
            state["images"] = ("memmap", self.images.filename, self.images.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("images"), tuple) and state["images"][0] == "memmap":
            _, name, shape = state["images"]
            state["images"] = np.memmap(name, dtype=np.uint8, mode="r", shape=shape)
        self.__dict__.update(state)


def _trimmed_tokens(tokens: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Token ids cut to the longest caption in the batch: padding costs attention time."""
    mask = tokens["attention_mask"][rows]
    t = max(int(mask.sum(1).max()), 1)
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


def _batch_as_is(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``collate_fn``: :meth:`FoldDataset.__getitems__` already returns a batch."""
    return batch


def make_loader(ds: FoldDataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over batches; training drops a last batch of one (BatchNorm cannot use it)."""
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
    """The fold's datasets and how to turn their batches into model inputs."""

    train: FoldDataset
    valid: FoldDataset
    test: FoldDataset | None
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None


def build_data(cfg: Config, comp: Competition, model: nn.Module, train_rows: np.ndarray,
               valid_rows: np.ndarray) -> FoldData:
    """Datasets over the cached images/tokens the model needs (built on first use)."""
    t, y, has_test = cfg.train, comp.y(), comp.test is not None and len(comp.test) > 0
    images = {"train": None, "test": None}
    tokens = {"train": None, "test": None}
    mean = std = None
    if model.needs_image:
        if not comp.has_images:
            raise UserError(f"model {cfg.model.name} needs images but data {comp.cfg.name} has none")
        dc = model.image_data_config
        size = tuple(dc["input_size"][1:])
        images = {s: image_cache(comp, s, size, t.progress) for s in ("train", "test") if s == "train" or has_test}
        mean, std = (torch.tensor(dc[k], dtype=torch.float32).view(1, 3, 1, 1) for k in ("mean", "std"))
    if model.needs_text:
        from mmfold.models import build_tokenizer

        tok = build_tokenizer(cfg, comp.train["caption"].iloc[train_rows].tolist())
        tokens = {s: token_cache(comp, s, tok, t.max_len) for s in ("train", "test") if s == "train" or has_test}
    aug = build_augment(t.augment) if model.needs_image else None
    test = FoldDataset(np.arange(len(comp.test)), images.get("test"), tokens.get("test")) if has_test else None
    return FoldData(train=FoldDataset(train_rows, images["train"], tokens["train"], y, aug, t.seed),
                    valid=FoldDataset(valid_rows, images["train"], tokens["train"], y),
                    test=test, mean=mean, std=std)


def model_inputs(batch: dict[str, torch.Tensor], data: FoldData,
                 channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Normalise ``uint8`` images on the device (NHWC -> NCHW float); pass token ids through."""
    x = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    if "image" in batch:
        img = batch["image"].permute(0, 3, 1, 2).float().div_(255)
        img = (img - data.mean.to(img.device)) / data.std.to(img.device)
        x["image"] = img.contiguous(memory_format=torch.channels_last) if channels_last else img
    return x


# ------------------------------------------------------------------------ optimisation


def make_accelerator(t: TrainConfig) -> Any:
    """An ``Accelerator`` for this run's device and precision.

    Each fold may differ in precision or accumulation, so the process-wide Accelerate state is
    reset first (the distributed process group itself is kept).
    """
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    cpu = t.device == "cpu" or not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu, mixed_precision=resolve_amp(t.amp, cpu), gradient_accumulation_steps=t.accum_steps,
        rng_types=[],  # our sampler is seeded by epoch, nothing to broadcast
        dataloader_config=DataLoaderConfiguration(non_blocking=not cpu),
        # a frozen backbone (or an unused pooler) leaves parameters without gradients
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


AMP_MODES = {"auto", "no", "off", "bf16", "fp16"}


def resolve_amp(amp: str, cpu: bool) -> str:
    """``auto``: bf16 on GPUs that have it, else fp16; off on CPU (slower there, not faster)."""
    if amp not in AMP_MODES:
        raise ConfigError(f"train.amp must be one of {sorted(AMP_MODES)}, got {amp!r}")
    if amp == "auto":
        return "no" if cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    return "no" if amp == "off" else amp


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; optionally forbid nondeterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with a lower LR for the backbone and no weight decay on biases and norms."""
    groups = []
    for name, params, lr in (("backbone", model.backbone_parameters(), t.lr * t.backbone_lr_mult),
                             ("head", model.head_parameters(), t.lr)):
        params = list(params)
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": t.weight_decay if decay else 0.0,
                               "name": f"{name}{'' if decay else '_no_decay'}"})
    return torch.optim.AdamW(groups, lr=t.lr)


def build_scheduler(opt: torch.optim.Optimizer, t: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup for ``warmup_epochs``, then cosine decay to zero at ``epochs``."""
    total = max(1, t.epochs * steps_per_epoch)
    warmup = int(t.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def build_ema(model: nn.Module, decay: float) -> Any:
    """timm's EMA with warmup (decay ramps up), so short runs still get a useful average."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True)


# ------------------------------------------------------------------------ checkpoints


@dataclass
class Progress:
    """Where a fold's training stands; saved in ``last.pt``.

    ``batch`` > 0 means a run stopped mid-epoch after that many batches (at an optimizer step);
    the partial epoch's loss sums and time come with it so the epoch's log line is unchanged.
    """

    epoch: int = 0
    step: int = 0
    batch: int = 0
    best_score: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    train_time_s: float = 0.0
    images_seen: int = 0
    loss_sum: float = 0.0
    epoch_images: int = 0
    epoch_time_s: float = 0.0


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors and lists (``weights_only``-loadable)."""
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(keys), gauss], "numpy": [name, mt.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    name, mt, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.array(mt, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path: Path, obj: dict[str, Any]) -> None:
    """``torch.save`` through a temp file + rename: a kill mid-write keeps the old file."""
    fileio.atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Path, device: Any = "cpu") -> dict[str, Any]:
    """A checkpoint, loaded without unpickling code."""
    return torch.load(path, map_location=device, weights_only=True)


def check_config(saved: dict[str, Any], cfg: Config, path: Path) -> None:
    """Refuse to resume under a config that would train differently.

    Raises:
        UserError: listing each differing key with the checkpoint's and the current value.
    """
    changed = learning_diff(saved, cfg.to_dict())
    if changed:
        raise UserError(f"{path} was trained with a different config:\n"
                        f"{describe_diff(changed, 'checkpoint', 'now')}\n"
                        f"resume with the checkpoint's settings, or start over with FORCE=1 "
                        f"(only {sorted(RUN_LENGTH_KEYS)} may change on resume; train.epochs "
                        "may not, since the learning-rate schedule is laid out over it)")


class Run:
    """The files of one fold's run dir, written by the main process only."""

    def __init__(self, run_dir: Path, cfg: Config, acc: Any) -> None:
        self.dir, self.cfg, self.acc = Path(run_dir), cfg, acc
        self.last, self.best, self.log = self.dir / "last.pt", self.dir / "best.pt", self.dir / "log.jsonl"

    def resume(self, model: nn.Module, opt: Any, sched: Any, ema: Any) -> Progress:
        """Restore everything from ``last.pt`` if it exists; a fresh :class:`Progress` otherwise."""
        if not self.last.exists():
            return Progress()
        ck = load_checkpoint(self.last)  # to CPU; load_state_dict copies onto the device
        check_config(ck["config"], self.cfg, self.last)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        if self.acc.scaler is not None and ck["scaler"]:
            self.acc.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        self._trim_log(ck["progress"]["epoch"])
        return Progress(**ck["progress"])

    def save_last(self, model: nn.Module, opt: Any, sched: Any, ema: Any, prog: Progress) -> None:
        """Everything needed to continue exactly, atomically."""
        if self.acc.is_main_process:
            save_checkpoint(self.last, {
                "version": CKPT_VERSION, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "ema": None if ema is None else ema.state_dict(),
                "scaler": None if self.acc.scaler is None else self.acc.scaler.state_dict(),
                "progress": asdict(prog), "rng": rng_state(), "config": self.cfg.to_dict()})
        self.acc.wait_for_everyone()

    def save_best(self, eval_model: nn.Module, prog: Progress) -> None:
        """The weights predictions will come from (the EMA's when EMA is on)."""
        if self.acc.is_main_process:
            save_checkpoint(self.best, {"version": CKPT_VERSION, "model": eval_model.state_dict(),
                                        "epoch": prog.best_epoch, "score": prog.best_score,
                                        "config": self.cfg.to_dict()})

    def append_log(self, row: dict[str, Any]) -> None:
        """One JSON line per epoch (the file is rewritten atomically; it stays small)."""
        if self.acc.is_main_process:
            old = self.log.read_text() if self.log.exists() else ""
            fileio.write_text(self.log, old + json.dumps(row) + "\n")

    def _trim_log(self, epoch: int) -> None:
        """Drop log lines of epochs the checkpoint has not got (written after it, then killed)."""
        if self.acc.is_main_process and self.log.exists():
            keep = [ln for ln in self.log.read_text().splitlines() if ln and json.loads(ln)["epoch"] < epoch]
            fileio.write_text(self.log, "".join(ln + "\n" for ln in keep))


class StopFlag:
    """Ctrl-C sets a flag instead of raising mid-update; the loop stops at the next optimizer
    step with a consistent ``last.pt``. A second Ctrl-C raises at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def any(self, acc: Any) -> bool:
        """True on every process if any was interrupted (they must all stop at the same step)."""
        if acc.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)


# ------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict(model: nn.Module, loader: Any, data: FoldData, acc: Any, tta: bool,
            channels_last: bool = False) -> np.ndarray:
    """Sigmoid probabilities in dataset order, gathered from every process without padding.

    With ``tta`` the image is also flipped horizontally and the two probabilities averaged.
    """
    model.eval()
    probs, index = [], []
    for batch in loader:
        x = model_inputs(batch, data, channels_last)
        with acc.autocast():
            p = torch.sigmoid(model(x).float())
            if tta and "image" in x:
                p = (p + torch.sigmoid(model({**x, "image": x["image"].flip(3)}).float())) / 2
        probs.append(acc.gather_for_metrics(p).cpu())
        index.append(acc.gather_for_metrics(batch["index"]).cpu())
    return _in_order(torch.cat(probs).numpy(), torch.cat(index).numpy(), len(loader.dataset))


def _in_order(probs: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """Rows sorted by dataset position; every position exactly once or it is a bug."""
    if len(index) != n or not np.array_equal(np.sort(index), np.arange(n)):
        dup = len(index) - len(np.unique(index))
        raise RuntimeError(f"gathered {len(index)} predictions for {n} rows ({dup} duplicated)")
    out = np.empty_like(probs)
    out[index] = probs
    return out.astype(np.float32)


def score(y: np.ndarray, probs: np.ndarray, metric: str = "samples") -> float:
    """Early-stopping and best-checkpoint score: the competition metric (``data.metric``) at
    threshold 0.5 (at least one label per row)."""
    return float(METRICS[metric](y, binarize(probs, 0.5)))


def bce(y: np.ndarray, probs: np.ndarray) -> float:
    """Validation loss, the same for every training loss so runs compare."""
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


# --------------------------------------------------------------------------- the loop


def train_fold(cfg: Config, comp: Competition, fold_of_row: np.ndarray, fold: int, run_dir: Path) -> FoldOutput:
    """Train ``cfg.model`` on every fold but ``fold``, early-stopped on ``fold``; predict.

    Resumes from ``run_dir/last.pt`` (refusing a config that differs outside
    :data:`mmfold.config.RUN_LENGTH_KEYS`). Writes ``config.yaml``, ``last.pt`` (every epoch
    and on Ctrl-C), ``best.pt`` and ``log.jsonl``. Predictions come from ``best.pt``.

    Returns:
        OOF probabilities of the validation rows (train order), test probabilities, and info.

    Raises:
        KeyboardInterrupt: after Ctrl-C or ``train.stop_after_epochs``, once ``last.pt`` is saved.
    """
    from mmfold.train.losses import build_loss, pos_weight_from_labels
    from mmfold.models import build_model

    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)  # intra-op threads spin: tiny models on a busy CPU crawl
    acc = make_accelerator(t)
    seed_everything(t.seed, t.deterministic)
    train_rows, valid_rows = np.flatnonzero(fold_of_row != fold), np.flatnonzero(fold_of_row == fold)
    model = build_model(cfg, comp.classes)
    with acc.main_process_first():  # one process builds the caches, the others then read them
        data = build_data(cfg, comp, model, train_rows, valid_rows)
    pin = acc.device.type == "cuda"
    loaders = [make_loader(data.train, t.batch_size, True, t.num_workers, t.seed, pin)]
    loaders += [make_loader(ds, t.batch_size * 2, False, t.num_workers, t.seed, pin)
                for ds in (data.valid, data.test) if ds]
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, t)
    model, opt, train_dl, valid_dl, *test_dl = acc.prepare(model, opt, *loaders)
    net = acc.unwrap_model(model)
    sched = build_scheduler(opt, t, math.ceil(len(train_dl) / t.accum_steps))
    ema = build_ema(net, t.ema)
    pos_weight = pos_weight_from_labels(comp.y()[train_rows]) if t.pos_weight else None
    loss_fn = build_loss(t, pos_weight).to(acc.device)
    run = Run(run_dir, cfg, acc)
    prog = run.resume(net, opt, sched, ema)
    if prog.epoch or prog.batch:
        acc.print(f"resuming {cfg.model.name} fold {fold} from epoch {prog.epoch}"
                  + (f", batch {prog.batch}" if prog.batch else "") + f" of {t.epochs} ({run.last})")
    if acc.is_main_process:
        save_config(cfg, run.dir / "config.yaml")
    y_valid = comp.y()[valid_rows].astype(np.float32)
    first_epoch, show = prog.epoch, t.progress and acc.is_local_main_process

    with StopFlag() as stop:
        for epoch in range(prog.epoch, t.epochs):
            if t.patience and prog.bad_epochs >= t.patience:
                break  # early stopping (also when resuming a run that had stopped)
            if t.stop_after_epochs and epoch - first_epoch >= t.stop_after_epochs:
                raise KeyboardInterrupt(f"stopped after {t.stop_after_epochs} epoch(s) (train.stop_after_epochs)")
            net.set_backbone_trainable(epoch >= t.freeze_backbone_epochs)
            model.train()
            data.train.set_epoch(epoch)
            train_dl.set_epoch(epoch)
            loader = acc.skip_first_batches(train_dl, prog.batch) if prog.batch else train_dl
            bar = tqdm(loader, desc=f"{cfg.model.name} fold {fold} epoch {epoch}", disable=not show,
                       leave=False, initial=prog.batch, total=len(train_dl))
            tick, loss_sum = time.perf_counter(), torch.tensor(prog.loss_sum, device=acc.device)
            for batch in bar:
                with acc.accumulate(model):
                    loss = loss_fn(model(model_inputs(batch, data, t.channels_last)), batch["y"])
                    acc.backward(loss)
                    if acc.sync_gradients and t.grad_clip:
                        acc.clip_grad_norm_(model.parameters(), t.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                loss_sum += loss.detach()  # no .item(): a GPU sync per batch would stall the queue
                prog.batch += 1
                prog.epoch_images += len(batch["y"]) * acc.num_processes
                if not acc.sync_gradients:
                    continue
                sched.step()
                prog.step += 1
                if ema is not None:
                    ema.update(net, step=prog.step)
                if show and prog.step % 10 == 0:
                    bar.set_postfix(loss=f"{loss_sum.item() / prog.batch:.4f}", lr=f"{sched.get_last_lr()[-1]:.2e}")
                if stop.any(acc):  # Ctrl-C: save this consistent optimizer step, then stop
                    prog.loss_sum, prog.epoch_time_s = loss_sum.item(), prog.epoch_time_s + time.perf_counter() - tick
                    run.save_last(net, opt, sched, ema, prog)
                    raise KeyboardInterrupt
            prog.loss_sum, prog.epoch_time_s = loss_sum.item(), prog.epoch_time_s + time.perf_counter() - tick
            eval_model = ema.module if ema is not None else net
            probs = predict(eval_model, valid_dl, data, acc, t.tta, t.channels_last)
            row = _end_epoch(prog, epoch, y_valid, probs, opt, cfg.data.metric)
            if prog.best_epoch == epoch:
                run.save_best(eval_model, prog)
            run.save_last(net, opt, sched, ema, prog)
            run.append_log(row)
            for callback in list(EPOCH_CALLBACKS):  # e.g. Optuna pruning; after last.pt is safe
                callback({**row, "fold": fold, "model": cfg.model.name})
            if show:
                tqdm.write(f"{cfg.model.name} fold {fold} {_fmt(row)}")
            if stop.any(acc):
                raise KeyboardInterrupt
    return _predict_best(cfg, data, acc, ema.module if ema is not None else net, run, prog, valid_dl, test_dl, net)


def _fmt(row: dict[str, Any]) -> str:
    """``key=value`` pairs, floats to 4 significant digits, for the console."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def _end_epoch(prog: Progress, epoch: int, y: np.ndarray, probs: np.ndarray, opt: Any,
               metric: str) -> dict[str, Any]:
    """Score the epoch, update best/patience and totals, reset the per-epoch counters.

    Returns:
        The epoch's ``log.jsonl`` row.
    """
    f1 = score(y, probs, metric)
    if f1 > prog.best_score:
        prog.best_score, prog.best_epoch, prog.bad_epochs = f1, epoch, 0
    else:
        prog.bad_epochs += 1
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    row = {"epoch": epoch, "step": prog.step, "train_loss": prog.loss_sum / max(prog.batch, 1),
           "valid_loss": bce(y, probs), "valid_f1": f1, "best_f1": prog.best_score,
           "lr": lrs.get("head", lrs.get("head_no_decay")),
           "lr_backbone": lrs.get("backbone", lrs.get("backbone_no_decay")),
           "time_s": round(prog.epoch_time_s, 3),
           "images_per_s": round(prog.epoch_images / max(prog.epoch_time_s, 1e-9), 1)}
    prog.train_time_s += prog.epoch_time_s
    prog.images_seen += prog.epoch_images
    prog.epoch, prog.batch, prog.loss_sum, prog.epoch_time_s, prog.epoch_images = epoch + 1, 0, 0.0, 0.0, 0
    return row


def _predict_best(cfg: Config, data: FoldData, acc: Any, eval_model: nn.Module, run: Run,
                  prog: Progress, valid_dl: Any, test_dl: list[Any], net: nn.Module) -> FoldOutput:
    """OOF and test probabilities from ``best.pt``, and the fold's info for ``done.json``."""
    acc.wait_for_everyone()
    if not run.best.exists():
        raise UserError(f"{run.best} missing: the fold has no finished epoch (train.epochs={cfg.train.epochs})")
    eval_model.load_state_dict(load_checkpoint(run.best)["model"])
    t = cfg.train
    oof = predict(eval_model, valid_dl, data, acc, t.tta, t.channels_last)
    test = predict(eval_model, test_dl[0], data, acc, t.tta, t.channels_last) if test_dl else None
    trainable, total = net.param_counts()
    info = {"params_trainable": trainable, "params_total": total, "train_time_s": round(prog.train_time_s, 2),
            "images_per_s": round(prog.images_seen / max(prog.train_time_s, 1e-9), 1), "epochs": prog.epoch,
            "best_score": prog.best_score, "best_epoch": prog.best_epoch, "device": str(acc.device),
            "num_processes": acc.num_processes, "mixed_precision": acc.mixed_precision}
    return FoldOutput(oof=oof, test=test, info=info)
