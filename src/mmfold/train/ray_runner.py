"""``mmfold train --ray ADDRESS``: every (model, fold[, seed]) of a run as one Ray task.

Why Ray: a run of several backbones x folds x seeds outgrows one machine, and Ray already does
what a scheduler of our own would have to: it places each task where its resources
(``train.resources``: CPUs, GPUs) are free, on a laptop or on a cluster alike, and runs a task
again when its worker dies (``max_retries``). A task is an ordinary fold run
(:func:`mmfold.train.runner.run_fold`), so a task run again resumes from the fold's
``last.pt`` as any interrupted fold does.

The driver (the ``mmfold train`` process) decides what is still to do from each fold's
``done.json`` and submits every unit once; it writes what depends on several units itself: a
seeded fold's mean once all its seeds are in, and each model's collect once all its folds are.

Exactly once rests on one driver per data set, not on ``flock`` (which network file systems do
not honour reliably): the driver's lease ``runs/<data>/.ray-driver.json`` (host, pid,
heartbeat) is created with an exclusive link, and a second driver refuses while it is live
(``docs/ray.md`` says what is safe from two drivers and what the project directory must share).

This is the only module that imports ray, and only inside functions: ``mmfold train`` without
``--ray`` never needs it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmfold import fileio, paths
from mmfold.config import Config, ConfigError
from mmfold.data.competition import Competition, load_folds
from mmfold.errors import UserError
from mmfold.machine import core_ids, sigterm_as_interrupt
from mmfold.metrics import metric_label
from mmfold.train.seeds import check_seeds, run_seeds, seed_dir

# What `pip install 'mmfold[ray]'` installs (pyproject.toml); named in the missing-ray message.
RAY_REQUIREMENT = "ray[default]==2.60.0"
LEASE_FILE = ".ray-driver.json"
HEARTBEAT_S = 5.0  # the driver rewrites its lease this often
STALE_S = 60.0  # a lease this old belongs to a driver that is gone (clocks agree to seconds)
MAX_RETRIES = 3  # Ray runs a task again this many times when its worker or node dies
# One unit per worker process, then a fresh one (Ray's own rule for GPU tasks): a cancelled
# task's Ctrl-C may land inside an import (``torch``, ``transformers``) and leave that module
# half-made in the worker, which would fail every later unit it ran; and no fold inherits
# another's threads, affinity or allocator. Costs a process start per (model, fold).
MAX_CALLS = 1
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory")
POLL_S = 0.5
CANCEL_WAIT_S = 120.0  # after Ctrl-C: how long the running folds get to save last.pt


@dataclass(frozen=True)
class FoldCalls:
    """The fold runner's functions this path calls, handed over by :mod:`mmfold.train.runner`
    (which imports this module, so importing it back would be a cycle). Module-level functions:
    Ray sends them to the workers by name."""

    run_fold: Callable[..., dict]  # (cfg, comp, fold_of_row, fold) -> the fold's done.json
    runner_for: Callable[[str], Callable[..., Any]]  # a kind's runner (one seed's training)
    fold_lock: Callable[[str, str, int], Path]  # (data, model, fold) -> the fold's lock file
    backup: Callable[[Path], Path]  # FORCE=1: a finished run dir moved aside


@dataclass(frozen=True)
class Unit:
    """One Ray task: a fold of a model, or one seed of that fold when the model trains several
    (``train.seeds``)."""

    model: str
    fold: int
    seed: int | None = None

    def __str__(self) -> str:
        return f"{self.model} fold {self.fold}" + ("" if self.seed is None else f" seed {self.seed}")


# --------------------------------------------------------------------------- ray itself


def import_ray(local: bool = False) -> Any:
    """Ray, or a one-line error saying how to install it.

    A local instance (``--ray local``) binds to the loopback address: Ray otherwise picks the
    machine's outward address, and nothing outside this machine has any business with it.
    That choice is read when ray is first imported, hence the environment variable here.

    Raises:
        UserError: ray is not installed.
    """
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # ray: "no cluster": 127.0.0.1
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # each fold's lines as printed, not "[repeated 2x]"
    try:
        import ray
    except ImportError as e:
        raise UserError(f"--ray needs Ray: pip install '{RAY_REQUIREMENT}' (or pip install -e '.[ray]')") from e
    return ray


@contextlib.contextmanager
def ray_session(address: str) -> Iterator[Any]:
    """Connected to Ray for the block: ``local`` starts an instance on this machine (its cores,
    loopback only), ``auto`` joins the cluster this machine is part of, anything else is a
    cluster's address. A process already connected (a test, a notebook) keeps its connection,
    and only a connection made here is closed after.

    Raises:
        UserError: no cluster at that address.
    """
    ray = import_ray(local=address == "local")
    if ray.is_initialized():
        yield ray
        return
    if address == "local":
        start_local(ray, len(core_ids()))
    else:
        try:
            ray.init(address=address, namespace="mmfold", log_to_driver=True)
        except Exception as e:  # noqa: BLE001 - ConnectionError, or ray's own errors for a dead GCS
            raise UserError(f"--ray {address}: could not join a Ray cluster there ({e}); start one with `ray "
                            "start --head` on its head node, or train on this machine alone with RAY=local") from e
    try:
        yield ray
    finally:
        ray.shutdown()


def start_local(ray: Any, num_cpus: int, namespace: str = "mmfold", tries: int = 2) -> None:
    """Start a Ray instance on this machine with ``num_cpus`` CPUs (import ray through
    :func:`import_ray` with ``local=True`` first: loopback only).

    Ray gives its raylet 30 s to register; on a machine other work keeps busy that can run
    out, so a failed start is tried once more from scratch. Ray starts its workers at niceness
    15 (a cluster node's default: they yield to whatever else the machine runs); here the
    tasks are the training the user asked for, so they run at the driver's priority.
    """
    for attempt in range(1, tries + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, namespace=namespace, log_to_driver=True,
                     _system_config={"worker_niceness": 0})
            return
        except Exception as e:  # noqa: BLE001 - ray raises a bare Exception for a start that timed out
            ray.shutdown()
            if attempt == tries:
                raise UserError(f"--ray local: Ray did not start on this machine ({e})") from e
            print(f"ray: the local instance did not start ({e}); trying again", flush=True)


def task_resources(cfg: Config) -> dict[str, float]:
    """What one unit of ``cfg``'s model asks Ray for: ``train.resources``, less any GPU for a CPU
    member (its heads run on CPUs; asking for a GPU would only keep one idle).

    Raises:
        ConfigError: an unknown key or a value that is not a non-negative number.
    """
    from mmfold.cpu.members import MEMBERS

    res = dict(cfg.train.resources or {})
    unknown = sorted(set(res) - set(RESOURCE_KEYS))
    if unknown:
        raise ConfigError(f"train.resources: unknown {unknown}; known: {list(RESOURCE_KEYS)} "
                          "(e.g. train.resources: {num_gpus: 1, num_cpus: 4})")
    for key, value in res.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"train.resources.{key} must be a number >= 0, got {value!r}")
    if not res.get("num_cpus", 1):
        raise ConfigError("train.resources.num_cpus must be > 0: a fold always runs on a CPU thread")
    if cfg.model.kind in MEMBERS:
        res.pop("num_gpus", None)
    res.setdefault("num_cpus", 1)
    return res


# --------------------------------------------------------------------------- the driver's lease


class DriverBusy(fileio.LockedError):
    """Another live driver holds the data set's lease (one line, no traceback)."""


@dataclass
class Lease:
    """The lease this driver holds: its file, what it wrote there, and who took it over if
    someone did (set by the heartbeat; the driver then stops)."""

    path: Path
    record: dict[str, Any]
    lost: dict[str, Any] | None = None

    @property
    def token(self) -> str:
        return str(self.record["token"])


def lease_path(data: str) -> Path:
    """``runs/<data>/.ray-driver.json``: one lease per data set."""
    return paths.root() / "runs" / paths.data_name(data) / LEASE_FILE


@contextlib.contextmanager
def driver_lease(data: str, address: str = "", heartbeat_s: float = HEARTBEAT_S) -> Iterator[Lease]:
    """Hold the data set's driver lease for the block, renewing it every ``heartbeat_s``.

    Taken with an exclusive link (atomic on NFS too), not a ``flock``. A lease whose heartbeat
    is older than :data:`STALE_S`, or whose pid is gone on this very host, belongs to a driver
    that died: it is taken over.

    Raises:
        DriverBusy: a live driver holds it (naming its host, pid and heartbeat).
    """
    path = lease_path(data)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "heartbeat": time.time(), "address": address}
    lease = _acquire(path, record, data)
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(lease, stop, heartbeat_s), name="ray-driver-lease", daemon=True)
    beat.start()
    try:
        yield lease
    finally:
        stop.set()
        beat.join()
        _release(lease)


def _acquire(path: Path, record: dict[str, Any], data: str) -> Lease:
    """Create the lease file, taking over a dead driver's; see :func:`driver_lease`."""
    for _ in range(5):
        try:
            fileio.write_new(path, lambda tmp: tmp.write_text(json.dumps(record)))
            return Lease(path, record)
        except FileExistsError:
            pass
        holder = read_lease(path)
        if holder is None:
            continue  # released (or being replaced) in between: try again
        if not _stale(holder):
            raise DriverBusy(_busy_message(data, path, holder))
        if _take_over(path, holder):
            print(f"ray: took over the lease of a driver that is gone ({_describe(holder)})", flush=True)
    raise fileio.LockedError(f"{path}: other drivers keep racing for this lease; start one driver at a time")


def read_lease(path: Path) -> dict[str, Any] | None:
    """The lease's record, or None when there is none (or it is half-replaced)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _stale(holder: dict[str, Any]) -> bool:
    """The holder is gone: no heartbeat for :data:`STALE_S`, or its pid is dead on this host."""
    if time.time() - float(holder.get("heartbeat", 0.0)) > STALE_S:
        return True
    return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0)))


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_over(path: Path, holder: dict[str, Any]) -> bool:
    """Move a dead driver's lease aside; False when another driver got there first.

    A rename succeeds for one taker only. The file renamed may, in a narrow race, be the fresh
    lease another taker just wrote: then it is linked back (a link never overwrites).
    """
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = read_lease(aside)
    try:
        if moved is not None and moved.get("token") != holder.get("token"):
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
            return False
        return True
    finally:
        aside.unlink(missing_ok=True)


def _beat(lease: Lease, stop: threading.Event, every: float) -> None:
    """Renew the lease until ``stop``; note it as lost if another driver took it over."""
    while not stop.wait(every):
        try:
            now = read_lease(lease.path)
            if now is None or now.get("token") != lease.token:
                lease.lost = now or {}
                return
            lease.record = {**lease.record, "heartbeat": time.time()}
            fileio.write_json(lease.path, lease.record)
        except OSError as e:  # a file-system hiccup: try again at the next beat
            print(f"ray: could not renew the driver lease {lease.path}: {e}", flush=True)


def _release(lease: Lease) -> None:
    """Remove the lease file if it is still this driver's."""
    now = read_lease(lease.path)
    if now is not None and now.get("token") == lease.token:
        lease.path.unlink(missing_ok=True)


def _describe(holder: dict[str, Any]) -> str:
    """``host pid N, started T, heartbeat S s ago``."""
    age = time.time() - float(holder.get("heartbeat", 0.0))
    return (f"{holder.get('host', '?')} pid {holder.get('pid', '?')}, started {holder.get('started', '?')}, "
            f"heartbeat {age:.0f} s ago")


def _busy_message(data: str, path: Path, holder: dict[str, Any]) -> str:
    """Why a second driver refuses, and what to do."""
    return (f"data set '{paths.data_name(data)}' is being trained by another Ray driver ({_describe(holder)}; "
            f"{path}): one driver per data set. Wait for it to end or stop it with Ctrl-C; a driver that died "
            f"is taken over once its heartbeat is {STALE_S:.0f} s old (at once on its own host)")


# --------------------------------------------------------------------------- what runs on a worker


class _Events:
    """Where each task attempt says it started (a Ray actor): the driver prints one line per
    start, and a second start of the same unit is Ray retrying it."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, item: dict[str, Any]) -> None:
        self.items.append(item)

    def since(self, n: int) -> list[dict[str, Any]]:
        return self.items[n:]


def run_unit(unit: Unit, cfg: Config, comp: Competition, fold_of_row: np.ndarray, env: dict[str, str],
             events: Any, calls: FoldCalls, tally: str) -> dict[str, Any]:
    """The body of one Ray task: count and announce the attempt, then train (or resume) the
    fold or seed.

    The attempt is counted in a file of the driver's run (``tally``, on the shared file
    system) before anything else, so the next attempt knows it is a retry even when this one
    dies before its announcement reached the driver. The announcement is not waited for: a
    task blocked in ``ray.get`` lends its CPUs back to Ray, which starts another task on them.
    Runs in the project the driver runs in (``env``: its ``MMFOLD_HOME``, cache and hub
    settings). Not under the fold's ``flock`` for a seed (the fold's seeds train side by side):
    the driver's assignment is its lock.
    """
    import ray

    start = {"unit": unit, "attempt": uuid.uuid4().hex, "number": count_attempt(Path(tally), unit),
             "node": ray.util.get_node_ip_address(), "pid": os.getpid()}
    events.add.remote(start)
    began, started = time.time(), time.perf_counter()
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    with _environment(env), own_cores(max(1, cpus)):
        info = (calls.run_fold(cfg, comp, fold_of_row, unit.fold) if unit.seed is None
                else _train_seed(calls, cfg, comp, fold_of_row, unit.fold, unit.seed))
    score = (info.get("metrics") or {}).get(cfg.data.metric)
    return {**start, "wall_s": time.perf_counter() - started, "score": score, "began": began, "ended": time.time()}


def count_attempt(tally: Path, unit: Unit) -> int:
    """This attempt's number for ``unit`` in the driver's run (1 for the first), recorded.

    One attempt of a unit runs at a time (Ray starts the next only after the last died), so a
    read and a rewrite need no lock.
    """
    path = tally / f"{unit.model}.fold{unit.fold}{'' if unit.seed is None else f'.seed{unit.seed}'}.json"
    seen = json.loads(path.read_text())["attempts"] if path.exists() else 0
    fileio.write_json(path, {"attempts": seen + 1})
    return seen + 1


def _train_seed(calls: FoldCalls, cfg: Config, comp: Competition, fold_of_row: np.ndarray, fold: int,
                seed: int) -> dict[str, Any]:
    """Train (or resume, or reuse) one seed of a fold in ``fold<k>/seed<s>/``; the fold's
    mean is the driver's, once every seed is in."""
    sub = seed_dir(paths.run_dir(cfg.data.name, cfg.model.name, fold), seed)
    sub.mkdir(parents=True, exist_ok=True)
    fileio.remove_orphan_temps(sub)  # a killed attempt's temp files: this task is the seed's only writer
    one = copy.deepcopy(cfg)
    one.train.seeds = [seed]
    out = run_seeds(calls.runner_for(cfg.model.kind), one, comp, fold_of_row, fold, sub.parent)
    return out.info


@contextlib.contextmanager
def own_cores(n: int, folder: Path | None = None) -> Iterator[list[int]]:
    """Pin this worker to ``n`` cores that no other task on this node holds, for the block.

    Ray counts CPUs but pins nothing, and mmfold sizes its thread pools from the cores the
    process may run on (:mod:`mmfold.machine`: a CPU member's label fits, its torch head): left
    alone, every one-CPU task would use all the node's cores at once. So each task takes ``n``
    cores through one lock file per core in the node's own temp folder (``flock``: local, so
    reliable) and runs on those, as each ``JOBS=N`` process runs on its own share. Where fewer
    than ``n`` are free (Ray was told of more CPUs than the node has) it runs unpinned.

    Yields:
        The cores this block runs on.
    """
    cores = core_ids()
    if not hasattr(os, "sched_setaffinity") or n >= len(cores):
        yield cores
        return
    folder = folder or Path(tempfile.gettempdir()) / "mmfold-ray-cores"
    with contextlib.ExitStack() as held:
        mine: list[int] = []
        for core in cores:
            if len(mine) == n:
                break
            try:
                held.enter_context(fileio.file_lock(folder / f"core{core}.lock"))
                mine.append(core)
            except fileio.LockedError:
                continue
        if len(mine) < n:
            yield cores
            return
        os.sched_setaffinity(0, mine)
        threads = _torch_threads(n)
        try:
            yield mine
        finally:
            os.sched_setaffinity(0, cores)
            _torch_threads(threads)


def _torch_threads(n: int) -> int:
    """Set torch's thread count if this worker has imported torch (else it reads Ray's
    ``OMP_NUM_THREADS`` when imported); the count before."""
    torch = sys.modules.get("torch")
    if torch is None:
        return n
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """The driver's project settings in this worker for the block (then put back): a worker
    may be on another node, or started before them."""
    old = {k: os.environ.get(k) for k in env}
    try:
        cwd: str | None = os.getcwd()
    except FileNotFoundError:  # the folder this worker started in is gone: stay in the project
        cwd = None
    os.environ.update(env)
    os.chdir(env["MMFOLD_HOME"])
    try:
        yield
    finally:
        if cwd is not None:
            os.chdir(cwd)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_environment() -> dict[str, str]:
    """What a task needs of the driver's environment: the project root (absolute: the same
    path on every node, the shared file system), the cache, the Hugging Face hub settings and
    the ``--data`` argument hints repeat."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("MMFOLD_", "HF_"))}
    env["MMFOLD_HOME"] = str(paths.root().resolve())
    if env.get("MMFOLD_CACHE"):
        env["MMFOLD_CACHE"] = str(Path(env["MMFOLD_CACHE"]).resolve())
    return env


# --------------------------------------------------------------------------- the driver


@dataclass
class RunStats:
    """What a Ray run did, for its last line and the benchmark (``docs/bench/ray.md``)."""

    connect_s: float = 0.0
    wall_s: float = 0.0
    done: int = 0
    failed: int = 0
    retries: int = 0
    # per finished task: str(unit), and seconds since the driver started: submitted, started (its
    # last attempt), result seen; ``wall_s``: its own time in the worker (set-up, training, files);
    # began, ended: the worker's clock (epoch seconds)
    tasks: list[dict[str, Any]] = field(default_factory=list)

    def most_at_once(self) -> int:
        """The most tasks that ran at the same moment (by the workers' clocks)."""
        edges = sorted([(t["began"], 1) for t in self.tasks] + [(t["ended"], -1) for t in self.tasks])
        running = most = 0
        for _, step in edges:  # an end sorts before a start at the same instant
            running += step
            most = max(most, running)
        return most


def train_ray(cfgs: Sequence[Config], comp: Competition, calls: FoldCalls, folds: Sequence[int] | None = None,
              force: bool = False, address: str = "local", collect: bool = True) -> RunStats:
    """Train every (model, fold[, seed]) not done yet as a Ray task, then collect each model
    whose folds are all done.

    The caller has validated the models and folds (:func:`mmfold.train.runner.run` does);
    whatever else can be refused (seeds, ``train.resources``, a second driver) is refused
    before a task is submitted.

    Raises:
        DriverBusy: another driver is training this data set.
        KeyboardInterrupt: Ctrl-C or SIGTERM (or a task that was stopped): every task was
            cancelled, the running folds saved ``last.pt``; nothing more is collected.
        The first error a task raised, once the others have finished.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--ray with GPUS=N: Ray runs each fold as one process; ask for its GPUs with "
                        "train.resources.num_gpus instead of a multi-process launch")
    fold_of_row = load_folds(comp)
    todo = list(range(int(fold_of_row.max()) + 1)) if folds is None else [int(k) for k in folds]
    for cfg in cfgs:
        check_seeds(cfg, comp)
        task_resources(cfg)
    started = time.perf_counter()
    with driver_lease(comp.cfg.name, address) as lease:
        units = plan_units(calls, cfgs, todo, force)
        driver = _Driver(calls, cfgs, comp, fold_of_row, lease, collect, started)
        for cfg in cfgs:
            if not any(c.model.name == cfg.model.name for c, _ in units):
                driver.collect_if_complete(cfg)
        if units:
            with ray_session(address) as ray, sigterm_as_interrupt(under_launcher=True):
                driver.stats.connect_s = time.perf_counter() - started
                driver.run(ray, units, local=address == "local")
    driver.stats.wall_s = time.perf_counter() - started
    return driver.finish()


def plan_units(calls: FoldCalls, cfgs: Sequence[Config], todo: Sequence[int],
               force: bool) -> list[tuple[Config, Unit]]:
    """Every unit still to train: a fold without ``done.json`` (all of them with ``force``, the
    finished ones moved aside first, as ``FORCE=1`` does), one unit per seed of a seeded model."""
    units = []
    for cfg in cfgs:
        for k in todo:
            rd = paths.run_dir(cfg.data.name, cfg.model.name, k)
            if (rd / "done.json").exists() and not force:
                print(f"{cfg.model.name} fold {k}: done already (FORCE=1 to retrain)", flush=True)
                continue
            if force and rd.exists():
                with fileio.file_lock(calls.fold_lock(cfg.data.name, cfg.model.name, k)):
                    calls.backup(rd)  # before any task: a task run again must resume, not start over
            units += [(cfg, Unit(cfg.model.name, k, s)) for s in (cfg.train.seeds or [None])]
    return units


class _Driver:
    """Submits the units, prints one line per task start, finish and retry, merges seeded folds
    and collects each model once its folds are done."""

    def __init__(self, calls: FoldCalls, cfgs: Sequence[Config], comp: Competition, fold_of_row: np.ndarray,
                 lease: Lease, collect: bool, t0: float) -> None:
        self.calls, self.cfgs = calls, {c.model.name: c for c in cfgs}
        self.comp, self.fold_of_row, self.lease, self.collect, self.t0 = comp, fold_of_row, lease, collect, t0
        self.pending: dict[Any, Unit] = {}
        self.submitted: dict[Unit, float] = {}
        self.started: dict[Unit, float] = {}
        self.starts: Counter[Unit] = Counter()  # each unit's highest attempt number seen
        self.attempts: set[str] = set()  # the attempts whose start was printed
        self.left: Counter[tuple[str, int]] = Counter()  # (model, fold) -> its units not finished yet
        self.broken: set[str] = set()  # models a unit of which failed: not collected
        self.errors: list[BaseException] = []
        self.stopped = False  # a task ended by a stop this driver did not ask for
        self.seen = 0
        self.stats = RunStats()

    def run(self, ray: Any, units: list[tuple[Config, Unit]], local: bool) -> None:
        """Submit every unit and wait for them; on any exit but success, cancel what is left.
        The run's attempt counts live beside the lease while it runs."""
        self.ray = ray
        check_feasible(ray, {cfg.model.name: task_resources(cfg) for cfg, _ in units}, local)
        # absolute: a worker starts in whatever folder its node's `ray start` ran in
        tally = self.lease.path.with_name(f".ray-attempts-{self.lease.token}").absolute()
        tally.mkdir(parents=True, exist_ok=True)
        try:
            self._run(ray, units, tally)
        finally:
            shutil.rmtree(tally, ignore_errors=True)

    def _run(self, ray: Any, units: list[tuple[Config, Unit]], tally: Path) -> None:
        """:meth:`run`'s submitting and waiting."""
        self.events = ray.remote(num_cpus=0)(_Events).remote()
        comp_ref, rows_ref, env = ray.put(self.comp), ray.put(self.fold_of_row), task_environment()
        task = ray.remote(max_calls=MAX_CALLS)(run_unit)
        for cfg, unit in units:
            self.left[(unit.model, unit.fold)] += 1
            options = {"name": str(unit), "max_retries": MAX_RETRIES, "retry_exceptions": False,
                       **task_resources(cfg)}
            ref = task.options(**options).remote(unit, cfg, comp_ref, rows_ref, env, self.events, self.calls,
                                                 str(tally))
            self.pending[ref] = unit
            self.submitted[unit] = time.perf_counter() - self.t0
        print(f"ray: submitted {len(units)} task(s) of {len(self.cfgs)} model(s) to {_cluster(ray)}", flush=True)
        try:
            while self.pending:
                ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=POLL_S)
                self._print_starts()
                for ref in ready:
                    self._finished(ref)
                if self.lease.lost is not None:
                    raise UserError(f"lost the driver lease {self.lease.path} to another driver "
                                    f"({_describe(self.lease.lost)}); stopped here, every fold resumable")
                if self.stopped:
                    raise KeyboardInterrupt
        except BaseException:
            self._cancel()
            raise

    def _print_starts(self) -> None:
        """One line per task attempt that started since the last call."""
        for event in self.ray.get(self.events.since.remote(self.seen)):
            self.seen += 1
            self._started(event)

    def _started(self, event: dict[str, Any]) -> None:
        """A task attempt's start line, once per attempt; a unit's second attempt is a retry."""
        if event["attempt"] in self.attempts:
            return
        self.attempts.add(event["attempt"])
        unit, n = event["unit"], event["number"]
        self.stats.retries += max(0, n - max(1, self.starts[unit]))  # attempts whose start was lost count too
        self.starts[unit] = max(n, self.starts[unit])
        self.started[unit] = time.perf_counter() - self.t0
        where = f"on {event['node']} (pid {event['pid']})"
        if n == 1:
            print(f"ray: start {unit} {where}", flush=True)
            return
        resume = ("resuming from its last.pt" if _checkpoint(self.cfgs[unit.model].data.name, unit).exists()
                  else "starting over: it had saved no last.pt")
        print(f"ray: retry {unit} (attempt {n} of {MAX_RETRIES + 1}) {where}: its worker died; {resume}", flush=True)

    def _finished(self, ref: Any) -> None:
        """A task ended: print it, then merge its fold's seeds or collect its model when due."""
        from ray.exceptions import RayError, RayTaskError, TaskCancelledError

        unit = self.pending.pop(ref)
        cfg = self.cfgs[unit.model]
        try:
            result = self.ray.get(ref)
        except TaskCancelledError:
            print(f"ray: stopped {unit} (interrupted; it resumes on the next run)", flush=True)
            self.stopped = True
            self.broken.add(unit.model)
            return
        except RayTaskError as e:
            cause = e.cause if isinstance(e.cause, BaseException) else e
            self._failed(unit.model, str(unit), cause, str(e.cause))
            return
        except RayError as e:
            why = (f"its worker died {MAX_RETRIES + 1} times ({type(e).__name__}); "
                   f"it resumes from its last.pt on the next run")
            self._failed(unit.model, str(unit), UserError(f"{unit}: {why}"), why)
            return
        self._started(result)  # its start line, if the start was slower to arrive than the result
        self.stats.done += 1
        self.stats.tasks.append({"unit": str(unit), "submitted": self.submitted[unit],
                                 "started": self.started.get(unit), "finished": time.perf_counter() - self.t0,
                                 "wall_s": result["wall_s"], "began": result["began"], "ended": result["ended"]})
        score = "" if result["score"] is None else f", {metric_label(cfg.data.metric)} at 0.5 {result['score']:.4f}"
        print(f"ray: done {unit} in {result['wall_s']:.1f} s on {result['node']}{score}", flush=True)
        self.left[(unit.model, unit.fold)] -= 1
        if unit.seed is not None and not self.left[(unit.model, unit.fold)] and unit.model not in self.broken:
            self._merge(cfg, unit.fold)
        if not any(n for (m, _), n in self.left.items() if m == unit.model):
            self.collect_if_complete(cfg)

    def _failed(self, model: str, what: str, error: BaseException, why: str) -> None:
        """Note a failure (a unit, a seeded fold's mean, a collect): the model is not collected;
        the run goes on for the others."""
        print(f"ray: failed {what}: {why.strip().splitlines()[-1] if why.strip() else type(error).__name__}",
              flush=True)
        self.stats.failed += 1
        self.broken.add(model)
        self.errors.append(error)

    def _merge(self, cfg: Config, fold: int) -> None:
        """A seeded fold's files from its seeds (all in: each is reloaded, nothing trains)."""
        try:
            self.calls.run_fold(cfg, self.comp, self.fold_of_row, fold)
        except UserError as e:
            self._failed(cfg.model.name, f"{cfg.model.name} fold {fold} (the mean of its seeds)", e, str(e))

    def collect_if_complete(self, cfg: Config) -> None:
        """Collect ``cfg``'s model when every one of its folds is done and none failed here."""
        from mmfold.train.collect import collect_model, missing_folds

        if not self.collect or cfg.model.name in self.broken:
            return
        missing = missing_folds(cfg.data.name, cfg.model.name, self.fold_of_row)
        if missing:
            print(f"{cfg.model.name}: folds {missing} not trained yet; collect waits for them", flush=True)
            return
        try:
            collect_model(cfg, self.comp, self.fold_of_row)
        except UserError as e:
            self._failed(cfg.model.name, f"collect {cfg.model.name}", e, str(e))

    def _cancel(self) -> None:
        """Cancel every task left: a queued one never starts, a running one gets Ctrl-C (a torch
        fold saves ``last.pt`` at its next optimizer step). Waits for them to end; a second
        Ctrl-C ends them at once (the next run resumes from their last saved ``last.pt``)."""
        from ray.exceptions import RayError

        if not self.pending:
            return
        print(f"ray: stopping: cancelling {len(self.pending)} task(s); running folds save where they stand",
              flush=True)
        for ref in self.pending:
            self.ray.cancel(ref)
        deadline = time.monotonic() + CANCEL_WAIT_S
        try:
            while self.pending and time.monotonic() < deadline:
                ready, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=POLL_S)
                for ref in ready:
                    unit = self.pending.pop(ref)
                    with contextlib.suppress(RayError):
                        self.ray.get(ref)
                        print(f"ray: done {unit} (finished before it could be stopped)", flush=True)
                        continue
                    state = "stopped, resumable" if self.starts[unit] else "cancelled before it started"
                    print(f"ray: {state}: {unit}", flush=True)
        except KeyboardInterrupt:
            pass
        for ref in self.pending:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)

    def finish(self) -> RunStats:
        """The run's last line; the first error a unit raised, if any."""
        s = self.stats
        if s.done or s.failed:
            print(f"ray: {s.done} task(s) done, {s.failed} failed, {s.retries} retried, in {s.wall_s:.1f} s "
                  f"({s.connect_s:.1f} s of it to connect; at most {s.most_at_once()} running at once)", flush=True)
        if self.errors:
            raise self.errors[0]
        return s


def _checkpoint(data: str, unit: Unit) -> Path:
    """Where a unit's torch run saves ``last.pt`` (CPU members save none: they start over)."""
    rd = paths.run_dir(data, unit.model, unit.fold)
    return (rd if unit.seed is None else seed_dir(rd, unit.seed)) / "last.pt"


def check_feasible(ray: Any, requests: dict[str, dict[str, float]], local: bool) -> None:
    """Say when a model's request fits no node: Ray would keep its tasks waiting for one.

    A cluster may yet grow (an autoscaler adds nodes), so there it is a warning; a local
    instance never grows, so there it is an error before anything is submitted.

    Raises:
        UserError: on a local instance, naming the model, its request and what the machine has.
    """
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for model, res in requests.items():
        need = {"CPU": res.get("num_cpus", 1), "GPU": res.get("num_gpus", 0), "memory": res.get("memory", 0)}
        if any(all(node.get(k, 0) >= v for k, v in need.items() if v) for node in nodes):
            continue
        have = "; ".join(f"CPU {n.get('CPU', 0):g}, GPU {n.get('GPU', 0):g}" for n in nodes) or "no node"
        msg = f"model '{model}': train.resources {res} fits no node of the Ray cluster ({have})"
        if local:
            raise UserError(f"{msg}: lower it, e.g. ARGS='train.resources.num_gpus=0'")
        print(f"ray: warning: {msg}; its tasks wait until such a node joins", flush=True)


def _cluster(ray: Any) -> str:
    """``N CPU, M GPU on K node(s)`` of the connected cluster."""
    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    gpus = f", {res['GPU']:g} GPU" if res.get("GPU") else ""
    return f"Ray ({res.get('CPU', 0):g} CPU{gpus} on {nodes} node(s))"
