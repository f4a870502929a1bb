"""The torch engine: train one model on one fold, resumably, and predict its OOF and test rows.

:func:`train_fold` is the whole training loop, read top to bottom: :func:`start_fold` sets a
fold up (model, data, optimizer, checkpoint restored) as a :class:`FoldSession`, the loop
runs the epochs, :func:`_predict_best` predicts from the best checkpoint. The same code runs
on a CPU, one GPU or under ``accelerate launch`` (DDP): Hugging Face Accelerate places
tensors, runs AMP, syncs gradients and shards the loaders, and only the main process writes
files. The pieces live beside it: datasets and loaders in :mod:`mmfold.train.batches`,
optimizer, schedule and seeding in :mod:`mmfold.train.optim`, ``last.pt``/``best.pt``, the
RNG states and Ctrl-C in :mod:`mmfold.train.checkpoint`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mmfold.config import Config, save_config
from mmfold.cpu.threads import torch_threads
from mmfold.data.competition import Competition
from mmfold.errors import UserError
from mmfold.metrics import CHECKPOINT_SCORES
from mmfold.train.batches import FoldData, build_data, fold_loaders, model_inputs
from mmfold.train.checkpoint import Progress, Run, StopFlag, load_checkpoint
from mmfold.train.fold import EPOCH_CALLBACKS, FoldOutput
from mmfold.train.optim import build_ema, build_optimizer, build_scheduler, make_accelerator, seed_everything
from mmfold.train.trackers import epoch_values, fold_trackers, tracking

__all__ = ["FoldOutput", "FoldSession", "start_fold", "train_fold", "predict"]


# ---------------------------------------------------------------------------- set-up


@dataclass
class FoldSession:
    """Everything one fold's training works with, built by :func:`start_fold`.

    ``model`` is what Accelerate prepared (DDP-wrapped under a launcher), ``net`` the bare
    module inside it (checkpoints, EMA, backbone freezing); ``prog`` is restored from
    ``last.pt`` when the run resumes; ``show`` is whether progress bars are drawn
    (``train.progress``; the per-epoch lines are printed either way).
    """

    cfg: Config
    fold: int
    acc: Any
    model: nn.Module
    net: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    ema: Any
    loss_fn: nn.Module
    data: FoldData
    train_dl: Any
    valid_dl: Any
    test_dl: Any | None
    y_valid: np.ndarray
    run: Run
    prog: Progress
    show: bool

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are scored and predicted with: the EMA's when EMA is on."""
        return self.ema.module if self.ema is not None else self.net


def start_fold(cfg: Config, comp: Competition, fold_of_row: np.ndarray, fold: int, run_dir: Path) -> FoldSession:
    """Seed, build the model, data, loaders, optimizer, schedule, EMA and loss for one fold,
    restore ``run_dir/last.pt`` if there is one, and write ``config.yaml``.

    The order is part of the result: the model's initial weights and everything after come
    from the RNG seeded here.
    """
    from mmfold.models import build_model
    from mmfold.train.losses import build_loss, pos_weight_from_labels

    t = cfg.train
    acc = make_accelerator(t, fold_trackers(cfg, run_dir), run_dir)
    seed_everything(t.seed, deterministic=t.deterministic)
    train_rows, valid_rows = np.flatnonzero(fold_of_row != fold), np.flatnonzero(fold_of_row == fold)
    model = build_model(cfg, comp.classes)
    for note in model.pretrained_notes():  # what loaded (or random init), on the console once per fold start
        acc.print(f"{cfg.model.name} fold {fold}: {note.line()}")
    if t.channels_last:  # NHWC: on a CPU, conv backward (depthwise above all) runs ~2x faster
        model = model.to(memory_format=torch.channels_last)
    with acc.main_process_first():  # one process builds the caches, the others then read them
        data = build_data(cfg, comp, model, train_rows, valid_rows, acc.device)
    loaders = fold_loaders(data, t, pin_memory=acc.device.type == "cuda")
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
    return FoldSession(cfg=cfg, fold=fold, acc=acc, model=model, net=net, opt=opt, sched=sched, ema=ema,
                       loss_fn=loss_fn, data=data, train_dl=train_dl, valid_dl=valid_dl,
                       test_dl=test_dl[0] if test_dl else None, y_valid=comp.y()[valid_rows].astype(np.float32),
                       run=run, prog=prog, show=t.progress and acc.is_local_main_process)


# --------------------------------------------------------------------------- the loop


def train_fold(cfg: Config, comp: Competition, fold_of_row: np.ndarray, fold: int, run_dir: Path) -> FoldOutput:
    """Train ``cfg.model`` on every fold but ``fold``, early-stopped on ``fold``; predict.

    Resumes from ``run_dir/last.pt`` (refusing a config that differs outside
    :data:`mmfold.config.RUN_LENGTH_KEYS`). Writes ``config.yaml``, ``last.pt`` (every epoch
    and on Ctrl-C), ``best.pt`` and ``log.jsonl``. Predictions come from ``best.pt``.

    Returns:
        OOF probabilities of the validation rows (train order), test probabilities, and info.

    Raises:
        KeyboardInterrupt: after Ctrl-C (SIGTERM in a single process, a pool's stop event) or
            ``train.stop_after_epochs``, once ``last.pt`` is saved.
    """
    t, started = cfg.train, time.perf_counter()
    with torch_threads(t.threads):  # intra-op threads spin: tiny models on a busy CPU crawl
        s = start_fold(cfg, comp, fold_of_row, fold, run_dir)
        model, net, opt, sched, ema, acc, prog = s.model, s.net, s.opt, s.sched, s.ema, s.acc, s.prog
        first_epoch = prog.epoch
        # each of train.trackers logs the epochs to the fold's run (continued when resuming)
        with tracking(acc, cfg, run_dir), StopFlag(terminate=acc.num_processes == 1) as stop:  # DDP: the launcher's SIGTERM ends ranks
            for epoch in range(prog.epoch, t.epochs):
                if t.patience and prog.bad_epochs >= t.patience:
                    break  # early stopping (also when resuming a run that had stopped)
                if t.stop_after_epochs and epoch - first_epoch >= t.stop_after_epochs:
                    raise KeyboardInterrupt(f"stopped after {t.stop_after_epochs} epoch(s) (train.stop_after_epochs)")
                bar = _epoch_batches(s, epoch)
                tick, loss_sum = time.perf_counter(), torch.tensor(prog.loss_sum, device=acc.device)
                for batch in bar:
                    with acc.accumulate(model):
                        loss = s.loss_fn(model(model_inputs(batch, s.data, channels_last=t.channels_last)), batch["y"])
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
                    if s.show and prog.step % 10 == 0:
                        bar.set_postfix(loss=f"{loss_sum.item() / prog.batch:.4f}", lr=f"{sched.get_last_lr()[-1]:.2e}")
                    if stop.any(acc):  # Ctrl-C: save this consistent optimizer step, then stop
                        _bank_epoch_time(prog, loss_sum, tick)
                        s.run.save_last(net, opt, sched, ema, prog)
                        raise KeyboardInterrupt
                _bank_epoch_time(prog, loss_sum, tick)
                _after_epoch(s, epoch)
                if stop.any(acc):
                    raise KeyboardInterrupt
        out = _predict_best(s)
    # this session's wall time: caches, training, validation, prediction (a resumed fold: the last session)
    out.info["wall_s"] = round(time.perf_counter() - started, 2)
    return out


def _epoch_batches(s: FoldSession, epoch: int) -> Any:
    """Ready the model and loaders for ``epoch`` and return its batches (with a progress bar),
    skipping those a resumed run has already trained on."""
    t, prog = s.cfg.train, s.prog
    s.net.set_backbone_trainable(epoch >= t.freeze_backbone_epochs)
    s.model.train()
    s.data.train.set_epoch(epoch)
    s.train_dl.set_epoch(epoch)
    loader = s.acc.skip_first_batches(s.train_dl, prog.batch) if prog.batch else s.train_dl
    return tqdm(loader, desc=f"{s.cfg.model.name} fold {s.fold} epoch {epoch}", disable=not s.show,
                leave=False, initial=prog.batch, total=len(s.train_dl))


def _bank_epoch_time(prog: Progress, loss_sum: torch.Tensor, tick: float) -> None:
    """Move the running loss sum and the time since ``tick`` into ``prog`` (before a save)."""
    prog.loss_sum, prog.epoch_time_s = loss_sum.item(), prog.epoch_time_s + time.perf_counter() - tick


def _after_epoch(s: FoldSession, epoch: int) -> None:
    """Score the epoch on the held-out fold; save ``best.pt`` if it is the best so far, then
    ``last.pt``; log it; run the epoch callbacks (after ``last.pt`` is safe)."""
    t = s.cfg.train
    probs = predict(s.eval_model, s.valid_dl, s.data, s.acc, tta=t.tta, channels_last=t.channels_last)
    row = _end_epoch(s.prog, epoch, s.y_valid, probs, s.opt, s.cfg.data.metric, s.cfg.train.select_threshold)
    if s.prog.best_epoch == epoch:
        s.run.save_best(s.eval_model, s.prog, s.data.tokenizer)
    s.run.save_last(s.net, s.opt, s.sched, s.ema, s.prog)
    s.run.append_log(row)
    s.acc.log(epoch_values(row, s.opt), step=epoch)  # train.trackers: the row's numbers, step = epoch
    for callback in list(EPOCH_CALLBACKS):  # e.g. Optuna pruning
        callback({**row, "fold": s.fold, "model": s.cfg.model.name})
    if s.acc.is_local_main_process:  # train.progress=false hides the bars, not these lines
        tqdm.write(f"{s.cfg.model.name} fold {s.fold} {_fmt(row)}")


def _fmt(row: dict[str, Any]) -> str:
    """``key=value`` pairs, floats to 4 significant digits, for the console."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def _end_epoch(prog: Progress, epoch: int, y: np.ndarray, probs: np.ndarray, opt: Any,
               metric: str, select: str = "half") -> dict[str, Any]:
    """Score the epoch, update best/patience and totals, reset the per-epoch counters.

    Returns:
        The epoch's ``log.jsonl`` row.
    """
    f1 = score(y, probs, metric, select)
    half = f1 if select == "half" else score(y, probs, metric, "half")
    if f1 > prog.best_score:
        prog.best_score, prog.best_epoch, prog.bad_epochs = f1, epoch, 0
    else:
        prog.bad_epochs += 1
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    row = {"epoch": epoch, "step": prog.step, "train_loss": prog.loss_sum / max(prog.batch, 1),
           "valid_loss": bce(y, probs), "valid_f1": f1, "valid_f1_half": half, "best_f1": prog.best_score,
           "lr": lrs.get("head", lrs.get("head_no_decay")),
           "lr_backbone": lrs.get("backbone", lrs.get("backbone_no_decay")),
           "time_s": round(prog.epoch_time_s, 3),
           "images_per_s": round(prog.epoch_images / max(prog.epoch_time_s, 1e-9), 1)}
    prog.train_time_s += prog.epoch_time_s
    prog.images_seen += prog.epoch_images
    prog.epoch, prog.batch, prog.loss_sum, prog.epoch_time_s, prog.epoch_images = epoch + 1, 0, 0.0, 0.0, 0
    return row


# ------------------------------------------------------------------------ prediction


@torch.no_grad()
def predict(model: nn.Module, loader: Any, data: FoldData, acc: Any, *, tta: bool,
            channels_last: bool = False) -> np.ndarray:
    """Sigmoid probabilities in dataset order, gathered from every process.

    Evaluation loaders yield canonical batches (:mod:`mmfold.canonical`), so a row's
    probability does not depend on the rows it is predicted with; their filler rows, and the
    batches a multi-process launch repeats to even out, are dropped here.
    With ``tta`` the image is also flipped horizontally and the two probabilities averaged.
    """
    model.eval()
    probs, index, filler = [], [], []
    for batch in loader:
        views = image_views(model_inputs(batch, data, channels_last=channels_last), tta=tta,
                            channels_last=channels_last)
        with acc.autocast():
            p = sum(torch.sigmoid(model(v).float()) for v in views) / len(views)
        probs.append(acc.gather(p).cpu())
        index.append(acc.gather(batch["index"]).cpu())
        filler.append(acc.gather(batch.get("filler", torch.zeros(len(p), dtype=torch.bool, device=p.device))).cpu())
    if not probs:
        return np.zeros((0, 0), np.float32)
    keep = ~torch.cat(filler).numpy()
    return _in_order(torch.cat(probs).numpy()[keep], torch.cat(index).numpy()[keep], len(loader.dataset))


def image_views(x: dict[str, torch.Tensor], *, tta: bool, channels_last: bool = False) -> list[dict[str, torch.Tensor]]:
    """The inputs a prediction averages over: the batch, and with ``tta`` its horizontal flip.

    Cached image-prefix outputs of an evaluation batch hold both views already
    (``image_feats`` ``(B, 2, ...)``); pixels are flipped here.
    """
    if "image_feats" in x:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        views = [{**x, "image_feats": x["image_feats"][:, i].contiguous(memory_format=fmt)} for i in (0, 1)]
    elif "image" in x:
        views = [x, {**x, "image": x["image"].flip(3)}]
    else:
        views = [x]
    return views if tta else views[:1]


def _in_order(probs: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """Rows sorted by dataset position; every position at least once or it is a bug (a
    position repeated by a multi-process launch has the same probabilities: its first is kept)."""
    first = np.unique(index, return_index=True)[1]
    if len(first) != n or not np.array_equal(index[first], np.arange(n)):
        raise RuntimeError(f"gathered predictions for {len(first)} of {n} rows")
    out = np.empty((n, probs.shape[1]), probs.dtype)
    out[index[first]] = probs[first]
    return out.astype(np.float32)


def score(y: np.ndarray, probs: np.ndarray, metric: str = "samples", select: str = "half") -> float:
    """Early-stopping and best-checkpoint score: the competition metric (``data.metric``) at
    threshold 0.5 or at the best single threshold (``train.select_threshold``), with at least
    one label per row."""
    return CHECKPOINT_SCORES[select](y, probs, metric)


def bce(y: np.ndarray, probs: np.ndarray) -> float:
    """Validation loss, the same for every training loss so runs compare."""
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def _predict_best(s: FoldSession) -> FoldOutput:
    """OOF and test probabilities from ``best.pt``, and the fold's info for ``done.json``."""
    acc, t, prog = s.acc, s.cfg.train, s.prog
    acc.wait_for_everyone()
    if not s.run.best.exists():
        raise UserError(f"{s.run.best} missing: the fold has no finished epoch (train.epochs={t.epochs})")
    eval_model = s.eval_model
    eval_model.load_state_dict(load_checkpoint(s.run.best)["model"])
    oof = predict(eval_model, s.valid_dl, s.data, acc, tta=t.tta, channels_last=t.channels_last)
    test = None if s.test_dl is None else predict(eval_model, s.test_dl, s.data, acc, tta=t.tta,
                                                  channels_last=t.channels_last)
    trainable, total = s.net.param_counts()
    info = {"params_trainable": trainable, "params_total": total, "train_time_s": round(prog.train_time_s, 2),
            "images_per_s": round(prog.images_seen / max(prog.train_time_s, 1e-9), 1), "epochs": prog.epoch,
            "best_score": prog.best_score, "best_epoch": prog.best_epoch, "device": str(acc.device),
            "num_processes": acc.num_processes, "mixed_precision": acc.mixed_precision,
            "weights": [n.record for n in s.net.pretrained_notes() if n.record]}
    return FoldOutput(oof=oof, test=test, info=info)
