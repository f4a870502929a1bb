"""Checkpoints of the torch engine: where a fold stands, every RNG state, the run dir's files.

Why a run resumes exactly: ``last.pt`` holds the model, optimizer, scheduler, EMA, AMP scaler,
:class:`Progress` (down to the batch within an epoch) and every RNG state, so a run stopped
after any optimizer step and resumed ends with the same weights as one that never stopped.
Files are written through a temp file and a rename (a kill mid-write keeps the old one) and
loaded with ``weights_only`` (no pickled code). Ctrl-C (:class:`StopFlag`) waits for the next
optimizer step, so there is always a consistent state to save.
"""

from __future__ import annotations

import json
import random
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmfold import fileio
from mmfold.config import RUN_LENGTH_KEYS, Config, describe_diff, learning_diff, with_defaults
from mmfold.errors import UserError

CKPT_VERSION = 1
__all__ = ["CKPT_VERSION", "Progress", "rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint",
           "check_config", "Run", "StopFlag", "stop_when"]


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
    changed = learning_diff(with_defaults(saved), cfg.to_dict())
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

    def save_best(self, eval_model: nn.Module, prog: Progress, tokenizer: Any = None) -> None:
        """The weights predictions will come from (the EMA's when EMA is on), with the config
        and the caption tokenizer's state: all a new test set needs (:mod:`mmfold.train.infer`)."""
        if self.acc.is_main_process:
            save_checkpoint(self.best, {"version": CKPT_VERSION, "model": eval_model.state_dict(),
                                        "epoch": prog.best_epoch, "score": prog.best_score,
                                        "config": self.cfg.to_dict(),
                                        "tokenizer": None if tokenizer is None else tokenizer.to_dict()})

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


# Events another process sets to stop this one's training (a ``train --jobs N`` pool's stop
# event, registered in each worker): polled at every optimizer step, as a Ctrl-C flag is.
_STOP_EVENTS: list[Any] = []


def stop_when(event: Any) -> None:
    """Also stop every later :class:`StopFlag` of this process once ``event`` is set.

    A pool worker has no terminal of its own: ``kill <pid>`` of ``mmfold train --jobs N``
    reaches only the parent, which sets the pool's event; the worker's running fold then stops
    at its next optimizer step with ``last.pt`` saved, as a Ctrl-C would stop it.
    """
    _STOP_EVENTS.append(event)


class StopFlag:
    """Ctrl-C (or SIGTERM, with ``terminate``) sets a flag instead of raising mid-update; the
    loop stops at the next optimizer step with a consistent ``last.pt``. A second signal
    raises at once. An event given to :func:`stop_when` stops it as a first signal does."""

    def __init__(self, terminate: bool = False) -> None:
        self.requested = False
        self._signals = (signal.SIGINT, signal.SIGTERM) if terminate else (signal.SIGINT,)
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self._signals}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    def stopping(self) -> bool:
        """This process was signalled, or another process asked it to stop."""
        return self.requested or any(e.is_set() for e in _STOP_EVENTS)

    def any(self, acc: Any) -> bool:
        """True on every process if any was interrupted (they must all stop at the same step)."""
        if acc.num_processes == 1:
            return self.stopping()
        flag = torch.tensor([float(self.stopping())], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)
