"""``mmfold train``: train each model on each fold, resumably, then collect.

A fold is the unit of work. It runs under a lock (two processes never train the same fold),
is skipped when its ``done.json`` exists (unless forced: the old run dir is kept as a
backup), and leaves ``oof.parquet``, ``test.parquet`` and finally ``done.json``. The fold's
work itself is done by a *runner*: the torch engine for neural kinds, or a CPU member.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mmfold import fileio, paths
from mmfold.config import Config, ConfigError, TrainConfig, load_config, model_names, model_yaml, override_key, save_config
from mmfold.data.competition import Competition, load_competition, load_folds
from mmfold.errors import UserError
from mmfold.machine import core_ids, is_main_process, sigterm_as_interrupt
from mmfold.artifacts import predictions
from mmfold.artifacts.manifest import fingerprints
from mmfold.metrics import all_metrics, binarize, metric_label
from mmfold.train.fold import FoldOutput
from mmfold.train.needs import check_weights
from mmfold.train.seeds import check_seeds, run_seeds



Runner = Callable[[Config, Competition, np.ndarray, int, Path], FoldOutput]



def _member_runner(cfg: Config, comp: Competition, fold_of_row: np.ndarray, fold: int, run_dir: Path):
    """Fit a CPU member on the fold (its fitted model kept in ``run_dir``) as a runner."""
    from mmfold.cpu.members import fit_member_fold
    from mmfold.train.students import training_targets, upstream

    start = time.perf_counter()
    train_idx, valid_idx = np.flatnonzero(fold_of_row != fold), np.flatnonzero(fold_of_row == fold)
    made_from = upstream(cfg, fold)  # a student's teachers as they are now, before it learns from them
    targets = training_targets(cfg, comp, fold_of_row, fold)  # a student's soft targets, else None
    oof, test, info = fit_member_fold(cfg, comp, train_idx, valid_idx, run_dir, targets)
    save_config(cfg, run_dir / "config.yaml")
    info = {"train_time_s": time.perf_counter() - start, **info, **({"upstream": made_from} if made_from else {})}
    return FoldOutput(oof=np.asarray(oof, np.float32), test=None if test is None else np.asarray(test, np.float32), info=info)


def _torch_runner(cfg: Config, comp: Competition, fold_of_row: np.ndarray, fold: int, run_dir: Path):
    """The torch engine (imported lazily: CPU members need no torch import)."""
    from mmfold.train.loop import train_fold

    return train_fold(cfg, comp, fold_of_row, fold, run_dir)


def _registries() -> list[tuple[object, Runner]]:
    """(registry, runner) pairs; a kind is run by the first registry that has it."""
    from mmfold.cpu.members import MEMBERS
    from mmfold.models import MODELS

    return [(MEMBERS, _member_runner), (MODELS, _torch_runner)]


def runner_for(kind: str) -> Runner:
    """The runner that knows ``kind``, or an error listing every registered kind."""
    pairs = _registries()
    for registry, runner in pairs:
        if kind in registry:
            return runner
    known = sorted(k for registry, _ in pairs for k in registry)
    raise UserError(f"unknown model kind '{kind}'; registered kinds: {known}")


# train.* keys that only act on one side of a model: refused for kinds without that side.
IMAGE_TRAIN_KEYS = frozenset({"train.augment", "train.image_size", "train.channels_last", "train.tta"})
TEXT_TRAIN_KEYS = frozenset({"train.max_len", "train.length_buckets"})


def used_train_keys(kind: str) -> frozenset[str]:
    """The ``train.*`` keys that change what a model of ``kind`` does.

    CPU members take every option from ``model.params`` (their heads have their own epochs,
    learning rates, seeds), so only ``train.seeds`` (several seeds of the head) and
    ``train.resources`` (the CPUs a fold asks a Ray cluster for) reach them; torch kinds use the whole
    training loop, less the image (text) options when they read no images (captions).
    """
    from mmfold.models import MODELS

    runner_for(kind)  # an unknown kind fails here, listing the registered ones
    if kind not in MODELS:
        return frozenset({"train.seeds", "train.resources"})  # its head's seed; its CPUs under --ray
    builder = MODELS.get(kind)
    keys = {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)}
    if not getattr(builder, "needs_image", False):
        keys -= IMAGE_TRAIN_KEYS
    if not getattr(builder, "needs_text", False):
        keys -= TEXT_TRAIN_KEYS
    return frozenset(keys)


def check_used_keys(cfg: Config, keys: Iterable[str], where: str) -> None:
    """Refuse ``train.*`` keys that the model's kind ignores (a sweep over them, an ablation
    of them or an override of them would measure nothing).

    Args:
        cfg: The model's resolved config (its ``model.kind`` decides).
        keys: Dotted keys a user set (overrides, search-space or ablation keys).
        where: What set them, for the message (``override``, ``search_space``...).

    Raises:
        UserError: naming the kind and the ``train.*`` keys it does use.
    """
    used = used_train_keys(cfg.model.kind)
    unused = sorted({k for k in keys if k.split(".")[0] == "train" and _train_key(k) not in used})
    if unused:
        does = ", ".join(sorted(used)) if used else "none"
        if cfg.model.kind not in _torch_kinds():
            does += " (its other options are model.params.*)"
        raise UserError(f"{where}: {unused} do nothing for model '{cfg.model.name}' (kind "
                        f"{cfg.model.kind}); the train.* keys it uses: {does}")


def _torch_kinds() -> Iterable[str]:
    """The kinds the torch engine trains (the others take their options from model.params)."""
    from mmfold.models import MODELS

    return MODELS


def _train_key(key: str) -> str:
    """``train.loss_params.gamma`` -> ``train.loss_params`` (dict-valued fields nest)."""
    return ".".join(key.split(".")[:2])


def fold_lock(data: str, model: str, fold: int) -> Path:
    """Lock file beside (not inside) the run dir, so a forced backup can move the dir."""
    rd = paths.run_dir(data, model, fold)
    return rd.parent / f".{rd.name}.lock"


def run_fold(cfg: Config, comp: Competition, fold_of_row: np.ndarray, fold: int, force: bool = False) -> dict:
    """Train (or resume, or skip) one fold and write its prediction files; returns done.json.

    Under a multi-process launch every rank trains, but only the main process takes the lock
    and writes files (the engine gathers the full predictions onto every rank).
    """
    rd = paths.run_dir(cfg.data.name, cfg.model.name, fold)
    if not is_main_process():
        if not (rd / "done.json").exists() or force:
            _run(cfg, comp, fold_of_row, fold, rd)
        return {}
    lock = fold_lock(cfg.data.name, cfg.model.name, fold)
    made = _missing(lock)
    with fileio.file_lock(lock):
        done = rd / "done.json"
        if done.exists() and not force:
            print(f"{cfg.model.name} fold {fold}: done already (FORCE=1 to retrain)")
            return json.loads(done.read_text())
        backup = _backup(rd) if force and rd.exists() else None
        with _undone_if_refused(rd, backup, made):
            rd.mkdir(parents=True, exist_ok=True)
            _sweep_temps(rd)
            out = _run(cfg, comp, fold_of_row, fold, rd)
        return _write_outputs(cfg, comp, fold_of_row, fold, rd, out)


def _missing(lock: Path) -> list[Path]:
    """The lock file and the folders above it that do not exist yet (deepest first): what
    taking the fold's lock creates."""
    made = [] if lock.exists() else [lock]
    folder = lock.parent
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    return made


@contextlib.contextmanager
def _undone_if_refused(rd: Path, backup: Path | None, made: list[Path]) -> Iterator[None]:
    """A fold that fails before it has trained anything (a value only building the model,
    loss or data refuses, say) leaves no trace: the run dir this call made is removed, a
    finished run that ``FORCE=1`` moved aside is put back, and the lock file and folders the
    lock created are removed (while the lock is still held).

    A fold that trained something, or was interrupted, keeps its files: they resume.
    """
    fresh = not rd.exists()
    try:
        yield
    except Exception:
        if fresh and _nothing_trained(rd):
            shutil.rmtree(rd, ignore_errors=True)
            if backup is not None:
                shutil.move(backup, rd)
                print(f"put the previous run back from {backup}")
            for path in made:  # deepest first: the lock file, then its folders if still empty
                with contextlib.suppress(OSError):
                    path.rmdir() if path.is_dir() else path.unlink()
        raise


def _nothing_trained(rd: Path) -> bool:
    """The run dir holds at most the config it was started with (a fold refused in set-up)."""
    return all(p.is_dir() or p.name == "config.yaml" for p in rd.rglob("*"))


def _run(cfg: Config, comp: Competition, fold_of_row: np.ndarray, fold: int, rd: Path) -> Any:
    """The kind's runner, once per seed when ``train.seeds`` lists several (averaged)."""
    runner = runner_for(cfg.model.kind)
    if cfg.train.seeds:
        return run_seeds(runner, cfg, comp, fold_of_row, fold, rd)
    return runner(cfg, comp, fold_of_row, fold, rd)


def _sweep_temps(folder: Path) -> None:
    """Remove temp files a killed earlier run left behind (safe: we hold the fold's lock)."""
    removed = fileio.remove_orphan_temps(folder)
    if removed:
        print(f"removed {len(removed)} temp file(s) left by an interrupted run in {folder}")


def _backup(rd: Path) -> Path:
    """Move a run dir aside instead of deleting a user's checkpoints; where it went."""
    dest = rd.with_name(f"{rd.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(rd, dest)
    print(f"kept the previous run as {dest}")
    return dest


def _write_outputs(cfg: Config, comp: Competition, fold_of_row: np.ndarray, fold: int, rd: Path, out) -> dict:
    """oof.parquet, test.parquet, then done.json last: its presence means the fold is complete."""
    valid = np.flatnonzero(fold_of_row == fold)
    what = f"{cfg.model.name} fold {fold}"
    predictions.write_fold_oof(rd, comp.train["id"].iloc[valid], out.oof, comp.classes, fold, f"{what} OOF")
    if out.test is not None:
        predictions.write_fold_test(rd, comp.test["id"], out.test, comp.classes, f"{what} test")
    y = comp.y()[valid]
    info = {
        "fold": fold,
        "model": cfg.model.name,
        "kind": cfg.model.kind,
        "metrics": all_metrics(y, binarize(out.oof, 0.5)),
        "hashes": fingerprints(cfg, comp),
        **out.info,
    }
    fileio.write_json(rd / "done.json", info)
    metric = cfg.data.metric
    print(f"{cfg.model.name} fold {fold}: {metric_label(metric)} at 0.5 {info['metrics'][metric]:.4f}")
    return info


def train_model(cfg: Config, comp: Competition | None = None, folds: Sequence[int] | None = None,
                force: bool = False, collect: bool = True) -> list[dict]:
    """Train one model on the given folds (default all), then collect if every fold is done.

    Everything that can be wrong with the request (a fold the folds file does not have, an
    unknown kind, a misspelt ``model.params`` key, a ``train.*`` key the kind ignores) is
    refused before any fold is touched, so ``FORCE=1`` never moves a finished fold aside for
    a run that then fails.
    """
    from mmfold.train.collect import collect_model, missing_folds

    comp = comp or load_competition(cfg.data)
    fold_of_row = load_folds(comp)
    todo = check_folds(folds, fold_of_row, comp.cfg.name)
    validate_model(cfg)
    check_seeds(cfg, comp)
    infos = [run_fold(cfg, comp, fold_of_row, int(k), force) for k in todo]
    if collect and is_main_process():
        missing = missing_folds(cfg.data.name, cfg.model.name, fold_of_row)
        if missing:
            print(f"{cfg.model.name}: folds {missing} not trained yet; collect waits for them")
        else:
            collect_model(cfg, comp, fold_of_row)
    return infos


def train_parallel(cfgs: Sequence[Config], comp: Competition, folds: Sequence[int] | None = None,
                   force: bool = False, jobs: int = 2, collect: bool = True) -> None:
    """Train every (model, fold) pair in ``jobs`` processes, each pinned to its own share of the
    cores, then collect each model whose folds are all done.

    Small models use threads poorly (a step of a tiny backbone is many small kernels), so two
    folds side by side on one core each finish sooner than one after the other on two. The
    pairs of all models share one queue, so no core idles while a model's last fold runs. Each
    fold keeps its lock, resume and ``done.json``, exactly as in :func:`run_fold`.

    Ctrl-C (SIGINT to the process group) or SIGTERM to this process stops the pool as a
    single process stops: no queued pair starts, the running folds stop at their next
    optimizer step with ``last.pt`` saved, and nothing is collected.

    Raises:
        KeyboardInterrupt: after Ctrl-C or SIGTERM, once every running fold has stopped.
        The first error a fold raised, after the other folds finished.
    """
    from mmfold.train.collect import collect_model, missing_folds

    fold_of_row = load_folds(comp)
    todo = check_folds(folds, fold_of_row, comp.cfg.name)
    for cfg in cfgs:
        validate_model(cfg)
        check_seeds(cfg, comp)
    tasks = [(cfg, int(k)) for cfg in cfgs for k in todo]
    errors = _run_pool(tasks, comp, fold_of_row, force, core_groups(jobs))
    for cfg in cfgs:
        if collect and not missing_folds(cfg.data.name, cfg.model.name, fold_of_row):
            collect_model(cfg, comp, fold_of_row)
    if errors:
        raise errors[0]


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _run_pool(tasks: Sequence[tuple[Config, int]], comp: Competition, fold_of_row: np.ndarray,
              force: bool, groups: list[list[int]]) -> list[BaseException]:
    """Run :func:`run_fold` on every (config, fold) in a process per core group; the errors
    the folds raised.

    The workers start with SIGINT and SIGTERM blocked (a Ctrl-C while one still imports torch
    would kill it and break the pool) and unblock them once their handlers are in place. A
    stop (a signal here, or a fold that a signal interrupted) sets the pool's event: queued
    pairs are cancelled (the few a worker already took end before touching their fold), the
    running folds see the event at their next optimizer step.

    Raises:
        KeyboardInterrupt: after a stop, once every running fold has ended.
    """
    ctx = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state in the workers
    pin, stop, pids = ctx.Queue(), ctx.Event(), ctx.Queue()
    for g in groups:
        pin.put(g)
    with _signals_noted() as signalled:
        with _signals_blocked():
            pool = ProcessPoolExecutor(len(groups), mp_context=ctx, initializer=_pin_worker,
                                       initargs=(pin, stop, pids))
            futures = [pool.submit(_pool_fold, cfg, comp, fold_of_row, k, force) for cfg, k in tasks]
        try:
            _wait_or_stop(futures, stop, signalled, _Workers(pids))
        except BaseException:
            stop.set()  # the running folds stop at their next step instead of running on
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    if stop.is_set():
        raise KeyboardInterrupt
    return [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]


def _wait_or_stop(futures: list[Future], stop: Any, signalled: list[int], workers: _Workers) -> None:
    """Wait for every future; once a stop is asked for, set ``stop`` and cancel the queued ones.

    The signal handler only appends to ``signalled``: setting a multiprocessing event from a
    handler could deadlock on the lock its ``is_set`` holds in this very thread. A SIGTERM
    came to this process alone (``kill <pid>``): it is passed on to the workers, whose running
    folds stop as they would on Ctrl-C (a CPU member's fit looks at no event).
    """
    while True:
        done, pending = wait(futures, timeout=0.2)
        if signalled or any(_was_interrupted(f) for f in done):
            stop.set()
            for f in pending:
                f.cancel()
        if signal.SIGTERM in signalled:
            workers.signal(signal.SIGTERM)
        if not pending:
            return


class _Workers:
    """The pool's worker processes, as they report themselves (``pids``, filled by
    :func:`_pin_worker`); each is signalled once."""

    def __init__(self, pids: Any) -> None:
        self.pids = pids
        self.signalled: set[int] = set()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every worker not signalled yet (one that has exited is skipped)."""
        import queue

        while True:
            try:
                pid = self.pids.get_nowait()
            except queue.Empty:
                break
            if pid not in self.signalled:
                self.signalled.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)


def _was_interrupted(future: Future) -> bool:
    """The fold ended by Ctrl-C (or ``train.stop_after_epochs``) in its worker: the whole run
    stops, as a single process does (a crashed worker is an error, not an interruption)."""
    return not future.cancelled() and isinstance(future.exception(), KeyboardInterrupt)


@contextlib.contextmanager
def _signals_noted() -> Iterator[list[int]]:
    """SIGINT and SIGTERM only noted (in the yielded list) while the block runs, not raised."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return
    old = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in STOP_SIGNALS}
    try:
        yield noted
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM held back from this thread, and from the processes and threads it
    starts, until the block ends (then a held signal is delivered)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def core_groups(jobs: int) -> list[list[int]]:
    """This process's cores dealt round-robin into at most ``jobs`` non-empty groups."""
    cores = core_ids()
    n = max(1, min(jobs, len(cores)))
    return [cores[i::n] for i in range(n)]


# A pool worker's stop event (set by the parent) and whether it is running a fold now.
_WORKER: dict[str, Any] = {"stop": None, "busy": False, "signalled": False}


def _pin_worker(pin: Any, stop: Any, pids: Any) -> None:
    """Worker start: die with the parent, take a core group, pin to it, size torch's threads
    to it (the engine's ``train.threads: 0`` and CPU members' thread pools then use exactly
    this share), then take Ctrl-C and SIGTERM as :func:`_worker_signal` does."""
    import torch

    from mmfold.train.checkpoint import stop_when

    die_with_parent()
    group = pin.get()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, group)
    torch.set_num_threads(len(group))
    _WORKER["stop"] = stop
    stop_when(stop)  # a running fold's training loop polls the pool's event
    for s in STOP_SIGNALS:
        signal.signal(s, _worker_signal)
    pids.put(os.getpid())  # the parent passes a SIGTERM on from here: the handlers are in place
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent until now


def _worker_signal(signum: int, frame: Any) -> None:
    """A worker's SIGINT/SIGTERM outside a training loop (which takes them itself, see
    :class:`mmfold.train.checkpoint.StopFlag`): noted, so the worker starts no further fold;
    inside a fold, the fold stops at once, as Ctrl-C stops a single process. (Only noted
    here: setting the pool's event from a handler could deadlock on its lock.)"""
    _WORKER["signalled"] = True
    if _WORKER["busy"]:
        # raised again each second until the fold has ended: a KeyboardInterrupt raised in a
        # handler can land where Python swallows it (a callback inside an import: "Exception
        # ignored"), and the fold would run on (seen: 1 run in 10 of a CPU member's fit)
        signal.signal(signal.SIGALRM, _interrupt_again)
        signal.setitimer(signal.ITIMER_REAL, 1.0, 1.0)
        raise KeyboardInterrupt


def _interrupt_again(signum: int, frame: Any) -> None:
    """:func:`_worker_signal`'s repeat, while the stopped fold has not ended."""
    if _WORKER["busy"]:
        raise KeyboardInterrupt


def _fold_ended() -> None:
    """The worker runs no fold now: no interrupt is repeated."""
    _WORKER["busy"] = False
    signal.setitimer(signal.ITIMER_REAL, 0)


def _pool_fold(cfg: Config, comp: Competition, fold_of_row: np.ndarray, fold: int, force: bool) -> dict:
    """:func:`run_fold` in a pool worker. A fold that a signal stopped sets the pool's event at
    once, so that the other worker starts no queued fold in the moment before the parent
    cancels the queue; a fold that comes up after a stop ends before touching its files
    (lock included).

    Raises:
        KeyboardInterrupt: the pool is stopping, or this fold was stopped.
    """
    stop = _WORKER["stop"]
    if _WORKER["signalled"] or (stop is not None and stop.is_set()):
        raise KeyboardInterrupt(f"{cfg.model.name} fold {fold}: not started (interrupted)")
    _WORKER["busy"] = True
    try:
        return run_fold(cfg, comp, fold_of_row, fold, force)
    except KeyboardInterrupt:
        _fold_ended()
        if stop is not None:
            stop.set()
        raise
    finally:
        _fold_ended()


def die_with_parent(poll_s: float = 1.0) -> None:
    """End this process (SIGKILL to itself) once its parent is gone.

    A pool worker whose parent was killed (``kill -9 <pid>`` of ``mmfold train --jobs N``)
    would otherwise run on, finishing folds nobody collects and holding their locks, so the
    next ``make train`` refuses with "locked". SIGKILL, not SIGTERM: a worker's training
    loop takes SIGTERM as a request to stop at its next step. A killed fold resumes from its
    last checkpoint (its temp files are swept by the next run).
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def check_folds(folds: Sequence[int] | None, fold_of_row: np.ndarray, data: str) -> list[int]:
    """The requested folds (default all), each one the folds file has.

    Raises:
        UserError: naming the folds that do not exist and the ones that do.
    """
    n = int(fold_of_row.max()) + 1
    todo = list(range(n)) if folds is None else [int(k) for k in folds]
    bad = [k for k in todo if not 0 <= k < n]
    if bad:
        raise UserError(f"fold {bad[0] if len(bad) == 1 else bad} does not exist: "
                        f"{paths.folds_file(data)} has folds 0-{n - 1} (FOLD=0..{n - 1})")
    return todo


def validate_model(cfg: Config) -> None:
    """Check a model's config completely without training anything.

    Raises:
        UserError: an unknown kind, an unknown (possibly nested) ``model.params`` key,
            ``train.*`` keys in the model's YAML that its kind ignores, augmentations a
            cached image prefix cannot apply, or a ``train.*`` value the engine refuses
            (:func:`check_train_values`).
    """
    runner_for(cfg.model.kind)
    from mmfold.cpu.members import MEMBERS, validate_params

    if cfg.model.kind in MEMBERS:
        validate_params(cfg)
    else:
        from mmfold.models import parse_params
        from mmfold.train.prefix_cache import flip_probability

        check_train_values(cfg)
        if parse_params(cfg).train_blocks is not None:
            flip_probability(cfg.train.augment)  # only a flip survives a cached image prefix
    yml = model_yaml(cfg.model.name, cfg.source)
    if yml.exists():
        own = (yaml.safe_load(yml.read_text(encoding="utf-8")) or {}).get("train") or {}
        check_used_keys(cfg, [f"train.{k}" for k in own], str(yml))


# train.* counts the torch engine needs at least this large (a batch of 0 divides by zero).
TRAIN_MINIMUMS = {"epochs": 1, "batch_size": 1, "accum_steps": 1, "max_len": 1, "length_buckets": 0,
                  "num_workers": 0, "threads": 0, "patience": 0, "stop_after_epochs": 0,
                  "freeze_backbone_epochs": 0}


def check_train_values(cfg: Config) -> None:
    """Refuse ``train.*`` values of a torch kind that its fold would refuse (or crash on) only
    once set up, so a refusal comes before any fold is touched: counts below their minimum,
    an unknown loss or loss parameter, ``pos_weight`` with a loss that ignores it, an unknown
    AMP mode, an EMA decay outside [0, 1), an unknown augmentation.

    Raises:
        UserError: naming the key, its value and what it may be.
    """
    import torch

    from mmfold.train.batches import build_augment
    from mmfold.train.losses import build_loss
    from mmfold.train.optim import resolve_amp

    t = cfg.train
    for key, least in TRAIN_MINIMUMS.items():
        if getattr(t, key) < least:
            raise ConfigError(f"train.{key} must be >= {least}, got {getattr(t, key)}")
    if t.image_size is not None and t.image_size < 1:
        raise ConfigError(f"train.image_size must be >= 1 (or null: the backbone's own), got {t.image_size}")
    if not 0.0 <= t.ema < 1.0:
        raise ConfigError(f"train.ema must be in [0, 1) (0 = off), got {t.ema}")
    build_loss(t, torch.ones(1) if t.pos_weight else None)
    resolve_amp(t.amp, cpu=True)
    if "train.augment" in used_train_keys(cfg.model.kind):
        build_augment(t.augment)


def overrides_for(cfg: Config, overrides: Sequence[str], models: Sequence[Config]) -> list[str]:
    """The overrides that apply to ``cfg``'s model: ``train.*`` keys its kind ignores are left
    out (with a note) when another model of the run uses them, refused when none does."""
    keep = []
    for item in overrides:
        key = override_key(item)
        if key.split(".")[0] != "train" or _train_key(key) in used_train_keys(cfg.model.kind):
            keep.append(item)
            continue
        if not any(_train_key(key) in used_train_keys(m.model.kind) for m in models):
            check_used_keys(cfg, [key], "override")
        print(f"note: {key} does nothing for {cfg.model.name} ({cfg.model.kind}); not applied to it")
    return keep


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmfold train`` options."""
    p.add_argument("--model", help="model config name(s), comma-separated (default: data.models)")
    p.add_argument("--fold", type=int, action="append", help="fold to train (repeatable; default all)")
    p.add_argument("--no-collect", action="store_true", help="do not collect after training")
    p.add_argument("--jobs", type=int, default=1,
                   help="train this many folds at once, each process on its own share of the cores")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="every (model, fold, seed) as a Ray task asking for train.resources: a cluster's "
                        "address, auto (the cluster this machine is in) or local (this machine); docs/ray.md")


def run(args: argparse.Namespace) -> int:
    """Validate every requested model and fold first, then train each, then collect."""
    base = load_config(args.data, None, args.overrides)
    comp = load_competition(base.data)
    check_folds(args.fold, load_folds(comp), comp.cfg.name)
    names = model_names(base, args.model)
    plain = [load_config(args.data, name, args.overrides) for name in names]
    cfgs = [load_config(args.data, c.model.name, overrides_for(c, args.overrides, plain)) for c in plain]
    for cfg in cfgs:
        validate_model(cfg)
    check_weights(cfgs, comp.cfg.name)  # every missing pretrained weight, before any fold moves
    if args.ray:
        if args.jobs > 1:
            raise UserError("--jobs and --ray do not mix: under Ray each fold asks for its cores (train.resources)")
        from mmfold.train.ray_runner import FoldCalls, train_ray

        calls = FoldCalls(run_fold=run_fold, runner_for=runner_for, fold_lock=fold_lock, backup=_backup)
        train_ray(cfgs, comp, calls, args.fold, args.force, args.ray, collect=not args.no_collect)
        return 0
    if args.jobs > 1:
        train_parallel(cfgs, comp, args.fold, args.force, args.jobs, collect=not args.no_collect)
        return 0
    with sigterm_as_interrupt():
        for cfg in cfgs:
            train_model(cfg, comp, args.fold, args.force, collect=not args.no_collect)
    leave_together()
    return 0


def leave_together() -> None:
    """Under a multi-process launch, every rank waits for rank 0's collect, then the process
    group is torn down explicitly. A rank that exits while another still holds the group
    open can abort in the backend's teardown ("terminate called without an active
    exception"), failing the launch after every fold was written."""
    import sys

    if "torch.distributed" not in sys.modules:  # CPU members only: torch never started a group
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
