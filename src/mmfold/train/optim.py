"""Optimisation for the torch engine: the Accelerator (device, precision, DDP), seeding, AdamW
with per-group learning rates, the warmup + cosine schedule and the weight EMA."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmfold.config import ConfigError, TrainConfig

__all__ = ["make_accelerator", "resolve_amp", "seed_everything", "build_optimizer", "build_scheduler", "build_ema"]


def make_accelerator(t: TrainConfig, log_with: list[Any] | None = None, project_dir: Path | None = None) -> Any:
    """An ``Accelerator`` for this run's device and precision, logging to ``log_with``
    (Accelerate trackers, :func:`mmfold.train.trackers.fold_trackers`) from ``project_dir``.

    Each fold may differ in precision or accumulation, so the process-wide Accelerate state is
    reset first (the distributed process group itself is kept).
    """
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    cpu = t.device == "cpu" or not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu, mixed_precision=resolve_amp(t.amp, cpu=cpu), gradient_accumulation_steps=t.accum_steps,
        rng_types=[],  # our sampler is seeded by epoch, nothing to broadcast
        dataloader_config=DataLoaderConfiguration(non_blocking=not cpu),
        # a frozen backbone (or an unused pooler) leaves parameters without gradients
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=log_with or None, project_dir=None if project_dir is None else str(project_dir),
    )


AMP_MODES = {"auto", "no", "off", "bf16", "fp16"}


def resolve_amp(amp: str, *, cpu: bool) -> str:
    """``auto``: bf16 on GPUs that have it, else fp16; off on CPU (slower there, not faster)."""
    if amp not in AMP_MODES:
        raise ConfigError(f"train.amp must be one of {sorted(AMP_MODES)}, got {amp!r}")
    if amp == "auto":
        return "no" if cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    return "no" if amp == "off" else amp


def seed_everything(seed: int, *, deterministic: bool) -> None:
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
