"""Experiment tracking of the torch engine (``train.trackers``), and ``mmfold tensorboard``.

Each fold is one run of Accelerate's own trackers (``Accelerator(log_with=...)``,
``init_trackers``, ``log``), named by its folder under ``runs/<data>/`` (``<model>/fold<k>``)
and grouped per model: TensorBoard files in ``runs/<data>/<model>/fold<k>/tb``, an MLflow run
nested under its model's parent run in experiment ``mmfold-<data>`` (a file store under
``mlruns/`` unless ``MLFLOW_TRACKING_URI`` names another), a W&B run in project
``mmfold-<data>``, group ``<model>``, offline unless ``WANDB_MODE`` says otherwise.

The trackers are built here as instances of Accelerate's classes rather than by name, because
``init_trackers`` gives every tracker the same ``project_name``: TensorBoard would read it as a
folder and MLflow as an experiment. A resumed fold continues its run: the step is the epoch,
the MLflow and W&B run ids are kept in the fold's ``tracking.json``, and the resolved config is
logged as hyper-parameters once per tracker (MLflow refuses a parameter that changes value, and
a resume may change ``train.patience``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmfold import fileio, hints, paths
from mmfold.config import Config, load_config
from mmfold.ensemble.blend import (check_trackers, hyperparams, mlflow_experiment, tracking_project,
                                   wandb_settings)
from mmfold.errors import UserError
from mmfold.machine import is_main_process

__all__ = ["TRACKING_FILE", "fold_trackers", "tracking", "start_tracking", "epoch_values", "finish_tracking",
           "add_arguments", "run", "launch"]

TRACKING_FILE = "tracking.json"  # in a fold's run dir: its run ids, and which trackers hold its config


def run_label(cfg: Config, run_dir: Path) -> str:
    """The run's name: its folder under ``runs/<data>/`` (``<model>/fold<k>``, a multi-seed
    member's ``<model>/fold<k>/seed<s>``)."""
    try:
        return Path(run_dir).resolve().relative_to((paths.root() / "runs" / cfg.data.name).resolve()).as_posix()
    except ValueError:
        return f"{cfg.model.name}/{Path(run_dir).name}"


def _state(run_dir: Path) -> dict[str, Any]:
    """The fold's ``tracking.json`` ({} before its first tracked session)."""
    path = Path(run_dir) / TRACKING_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def fold_trackers(cfg: Config, run_dir: Path) -> list[Any]:
    """Accelerate tracker instances for ``cfg.train.trackers`` (``[]`` for none), each set to
    continue the fold's run if it has one.

    Raises:
        UserError: an unknown tracker, or one whose package is missing (naming its pip pin).
    """
    names = check_trackers(cfg.train.trackers)
    if not names or not is_main_process():  # Accelerate logs from the main process only
        return []
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    state, label, model = _state(run_dir), run_label(cfg, run_dir), cfg.model.name
    out: list[Any] = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoardTracker("tb", str(run_dir)))  # runs/<data>/<model>/fold<k>/tb
        elif name == "mlflow":
            experiment = mlflow_experiment(cfg.data.name)
            tags = {"mmfold.kind": "fold", "mmfold.data": cfg.data.name, "mmfold.model": model,
                    "mlflow.parentRunId": _mlflow_parent(cfg.data.name, model, experiment)}
            out.append(MLflowTracker(tracking_project(cfg.data.name), run_id=_mlflow_run(state.get("mlflow")),
                                     tags=tags, run_name=label))
        else:
            out.append(WandBTracker(tracking_project(cfg.data.name), id=state.get("wandb") or secrets.token_hex(4),
                                    resume="allow", group=model, name=label, job_type="fold", dir=str(run_dir),
                                    **wandb_settings()))
    return out


def _mlflow_run(run_id: str | None) -> str | None:
    """The fold's MLflow run to continue, or None for a new one (none yet, or it was deleted
    from the store since)."""
    if not run_id:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        found = None
    if found is None or found.info.lifecycle_stage == "deleted":
        print(f"note: MLflow run {run_id} is no longer in {mlflow.get_tracking_uri()}; this fold starts a new one")
        return None
    return run_id


def _mlflow_parent(data: str, model: str, experiment: str) -> str:
    """The id of the model's parent run (its folds nest under it in the MLflow UI), made once."""
    import mlflow

    client = mlflow.MlflowClient()
    with fileio.file_lock(paths.root() / "runs" / data / ".tracking.lock", wait=True):  # parallel folds
        query = f"tags.`mmfold.kind` = 'model' and tags.`mmfold.model` = '{model}'"
        found = client.search_runs([experiment], filter_string=query, max_results=1)
        if found:
            return found[0].info.run_id
        run = client.create_run(experiment, run_name=model,
                                tags={"mmfold.kind": "model", "mmfold.data": data, "mmfold.model": model})
        client.set_terminated(run.info.run_id)
        return run.info.run_id


@contextlib.contextmanager
def tracking(acc: Any, cfg: Config, run_dir: Path) -> Iterator[None]:
    """The fold's run open in each tracker for the block's epochs, closed however it ends."""
    start_tracking(acc, cfg, run_dir)
    try:
        yield
    finally:
        finish_tracking(acc)


def start_tracking(acc: Any, cfg: Config, run_dir: Path) -> None:
    """Start (or continue) the fold's run in each tracker and log the resolved config as its
    hyper-parameters, once per tracker; record the run ids in ``tracking.json``."""
    if not acc.log_with or not acc.is_main_process:
        return
    acc.init_trackers(tracking_project(cfg.data.name))
    state = _state(run_dir)
    logged = list(state.get("config_logged", []))
    params = hyperparams(cfg.to_dict())
    for tracker in acc.trackers:
        if tracker.name not in logged:
            tracker.store_init_configuration(params)
            logged.append(tracker.name)
        if tracker.name == "mlflow":
            state["mlflow"] = tracker.active_run.info.run_id
        elif tracker.name == "wandb":
            state["wandb"] = tracker.run.id
    fileio.write_json(Path(run_dir) / TRACKING_FILE, {**state, "config_logged": logged})


def epoch_values(row: dict[str, Any], opt: Any) -> dict[str, float]:
    """What each epoch logs, from its ``log.jsonl`` row: the training loss, the validation loss
    and metric at 0.5 and at the selection threshold (``train.select_threshold``), the best so
    far, each parameter group's learning rate, the epoch's time and speed."""
    values = {"train/loss": row["train_loss"], "valid/loss": row["valid_loss"],
              "valid/f1_at_0.5": row["valid_f1_half"], "valid/f1_selected": row["valid_f1"],
              "valid/f1_best": row["best_f1"], "time/epoch_s": row["time_s"],
              "time/images_per_s": row["images_per_s"]}
    values |= {f"lr/{g['name']}": g["lr"] for g in opt.param_groups}
    return {k: float(v) for k, v in values.items()}


def finish_tracking(acc: Any) -> None:
    """Close each tracker's run (files flushed, the MLflow run ended).

    Not ``accelerator.end_training()``: that also destroys the process group, which a
    multi-process launch still needs for its next fold or model.
    """
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers.clear()


# ------------------------------------------------------------------------ mmfold tensorboard


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--port``."""
    p.add_argument("--port", type=int, default=6006, help="port to serve on (0: any free one)")


def run(args: argparse.Namespace) -> int:
    """Serve ``runs/<data>/`` (every model's folds and the blends) until Ctrl-C."""
    check_trackers(["tensorboard"])
    cfg = load_config(args.data, None, args.overrides)
    logdir = paths.root() / "runs" / cfg.data.name
    if not any(logdir.rglob("events.out.tfevents.*")):
        raise UserError(f"no TensorBoard runs under {logdir}: train with the tracker on, e.g. "
                        f"{hints.make('train', cfg.data.name, ARGS='train.trackers=[tensorboard]')}")
    url = launch(logdir, args.port)
    print(f"TensorBoard at {url} serving {logdir} (Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def launch(logdir: Path, port: int = 6006) -> str:
    """Start TensorBoard on ``logdir`` in this process (a server thread); returns its URL."""
    from tensorboard import program

    tb = program.TensorBoard()
    tb.configure(argv=[None, "--logdir", str(logdir), "--port", str(port), "--load_fast=false"])
    return tb.launch()
