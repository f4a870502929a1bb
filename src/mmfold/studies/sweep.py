"""``mmfold sweep``: an Optuna study over the search space a model declares in its YAML.

Each trial is the model's config plus the sampled values, trained through the normal fold
runner under its own name ``<model>@trial<k>`` (so trials never share a run dir and each one
resumes like any fold), and scored by the number the blend will see for it: the honest tuned
CV of :func:`mmfold.ensemble.scoring.honest_cv` on the out-of-fold predictions of the folds it trained
(thresholds fitted out of fold, ``blend.*`` post-rules, ``data.metric``). Trials are pruned by
Optuna's pruner on what they report: the validation F1 of every epoch (through the engine's
epoch hook, see :func:`epoch_hooks`) and the honest CV of the folds done after every fold.

Before anything trains, a search-space key the model's kind ignores (``train.loss`` on a CPU
member) is refused, and a sampled parameter set that equals a finished trial's (TPE repeats
itself on small discrete spaces) takes that trial's result instead of training it again.

The study lives in SQLite (``sweeps/<data>/<study>.db``, opened as the blend's studies are, by
:mod:`mmfold.artifacts.studies`: write-ahead logging, heartbeats), so a killed or interrupted sweep
resumes: finished trials are kept, and a trial that was cut off is re-queued with the same
parameters *and the same run name*, so its finished folds are not trained again. The best
trial is written out as a new model YAML, and every trial goes into a results table with its
training time (the efficiency analysis).

Search-space schema (``model.search_space`` in ``configs/models/<model>.yaml``), keyed by the
dotted config key each parameter sets::

    train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true, grid: [1.0e-3, 1.0e-2]}
    train.epochs: {type: int, low: 1, high: 3, grid: [1, 3]}
    train.batch_size: [30, 50]                 # a list is shorthand for categorical
    train.loss: {type: categorical, choices: [bce, focal]}
    train.augment: [[], [{name: hflip}]]       # non-scalar choices are fine too

``grid`` lists the values the grid sampler tries for a float/int parameter (categorical
parameters use their choices).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mmfold import fileio, paths
from mmfold.artifacts import predictions, studies
from mmfold.paths import VARIANT_SEP
from mmfold.config import (Config, ConfigError, learned_settings, load_config, merge, model_yaml,
                           override_key, stable_hash)
from mmfold.data.competition import Competition, load_competition, load_folds
from mmfold.errors import UserError
from mmfold.metrics import metric_label
from mmfold.registry import Registry
from mmfold.ensemble.scoring import HonestCV, honest_cv, threshold_params
from mmfold.train.runner import check_used_keys

STRIDE = 1000  # pruning step = fold position * STRIDE + epoch, so folds never share a step

PARAM_TYPES = Registry("search-space type")
SAMPLERS = Registry("sweep sampler")
PRUNERS = Registry("sweep pruner")


# ------------------------------------------------------------------ running one variant's folds


def nested(key: str, value: Any) -> dict[str, Any]:
    """``'train.lr', 1e-3`` -> ``{'train': {'lr': 1e-3}}`` (what :func:`config.merge` takes)."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def variant_config(data: str, model: str, name: str, overrides: Sequence[str] = (),
                   values: dict[str, Any] | None = None) -> Config:
    """The base model's config with overrides and typed values applied, renamed ``name``.

    Values are merged as Python objects, not re-parsed from strings, so ``1e-5`` stays a float.
    """
    cfg = load_config(data, model, list(overrides))
    for key, value in (values or {}).items():
        merge(cfg, nested(key, copy.deepcopy(value)), f"search space key '{key}'")
    cfg.model.name = name
    return cfg


class Competitions:
    """Competitions loaded once per distinct data config (a variant may drop the captions)."""

    def __init__(self) -> None:
        self._cache: dict[str, Competition] = {}

    def get(self, cfg: Config) -> Competition:
        key = stable_hash(cfg.to_dict()["data"])
        if key not in self._cache:
            self._cache[key] = load_competition(cfg.data)
        return self._cache[key]


def is_stale(rd: Path, cfg: Config) -> bool:
    """True when ``rd`` holds a run made from another config (an older study or variant).

    ``done.json``'s hash leaves out run-length keys such as epochs, which a sweep varies, so
    the fold's saved ``config.yaml`` is compared in full instead.
    """
    saved = rd / "config.yaml"
    if not saved.exists():
        return False
    old = yaml.safe_load(saved.read_text()) or {}
    return learned_settings(old) != learned_settings(cfg.to_dict())


def run_variant_fold(cfg: Config, comp: Competition, fold_of_row: np.ndarray, fold: int) -> dict:
    """Train (or reuse, or resume) one fold of a variant; a stale run dir is retrained.

    Returns:
        The fold's ``done.json``.
    """
    from mmfold.train.runner import run_fold

    stale = is_stale(paths.run_dir(cfg.data.name, cfg.model.name, fold), cfg)
    if stale:
        print(f"{cfg.model.name} fold {fold}: run dir was made from another config; retraining")
    return run_fold(cfg, comp, fold_of_row, fold, force=stale)


def fold_probs(cfg: Config, comp: Competition, fold_of_row: np.ndarray, folds: Sequence[int]) -> np.ndarray:
    """A variant's out-of-fold probabilities on the train rows of ``folds`` (train order), read
    from those folds' ``oof.parquet`` (each checked: its fold's ids, labels, probabilities)."""
    return predictions.read_fold_oofs(cfg.data.name, cfg.model.name, comp.ids("train"), comp.classes,
                                      fold_of_row, folds)


def honest_score(cfg: Config, comp: Competition, fold_of_row: np.ndarray, folds: Sequence[int]) -> HonestCV:
    """The honest tuned CV of a variant on the folds it trained, as the blend would score it.

    Thresholds for fold k are fitted on the other given folds (one fold: seeded halves), with
    the variant's ``blend.*`` post-rules, scored by ``data.metric``.
    """
    rows = np.flatnonzero(np.isin(fold_of_row, list(folds)))
    probs = fold_probs(cfg, comp, fold_of_row, folds)
    return honest_cv(probs, comp.y()[rows], fold_of_row[rows], cfg.blend, cfg.data.metric)


# ------------------------------------------------------------------------- epoch hook (engine)


def epoch_hooks() -> list[Callable[[dict], None]] | None:
    """The torch loop's per-epoch callback list, ``mmfold.train.fold.EPOCH_CALLBACKS``, if it exists.

    The engine calls every callback with the epoch's ``log.jsonl`` row plus ``fold`` and
    ``model``, after ``last.pt`` is saved; a callback may raise (``optuna.TrialPruned``) to stop
    the fold there. Without the hook, trials are still pruned between folds.
    """
    from mmfold.train import fold

    return getattr(fold, "EPOCH_CALLBACKS", None)


@contextlib.contextmanager
def on_epoch(callback: Callable[[dict], None]) -> Iterator[bool]:
    """Register ``callback`` for the duration of the block; yields whether a hook exists."""
    hooks = epoch_hooks()
    if hooks is None:
        yield False
        return
    hooks.append(callback)
    try:
        yield True
    finally:
        hooks.remove(callback)


# ----------------------------------------------------------------------------- search space


@dataclass
class Param:
    """One searched config key, normalised from its YAML spec."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)
    grid: list[Any] | None = None

    @property
    def scalar_choices(self) -> bool:
        """Optuna stores only None/bool/int/float/str choices; others go through JSON labels."""
        return all(c is None or isinstance(c, (bool, int, float, str)) for c in self.choices)

    def encode(self, choice: Any) -> Any:
        return choice if self.scalar_choices else json.dumps(choice, sort_keys=True)

    def decode(self, label: Any) -> Any:
        return label if self.scalar_choices else json.loads(label)


def parse_space(space: dict[str, Any], where: str) -> list[Param]:
    """Normalise ``model.search_space``; bad specs are errors that name the key."""
    out = []
    for key, spec in space.items():
        spec = {"type": "categorical", "choices": spec} if isinstance(spec, list) else dict(spec or {})
        kind = spec.pop("type", "categorical" if "choices" in spec else "float")
        PARAM_TYPES.get(kind)
        unknown = set(spec) - {"low", "high", "log", "step", "choices", "grid"}
        if unknown:
            raise ConfigError(f"{where}: search_space '{key}': unknown fields {sorted(unknown)}")
        p = Param(key=key, type=kind, **spec)
        _check_bounds(p, where)
        out.append(p)
    return out


def _check_bounds(p: Param, where: str) -> None:
    """Numeric params need low/high (taken from ``grid`` when only a grid is given)."""
    if p.type == "categorical":
        if not p.choices:
            raise ConfigError(f"{where}: search_space '{p.key}': categorical needs choices")
        return
    if p.low is None or p.high is None:
        if not p.grid:
            raise ConfigError(f"{where}: search_space '{p.key}': {p.type} needs low and high (or grid)")
        p.low, p.high = min(p.grid), max(p.grid)


@PARAM_TYPES.register("float")
def _suggest_float(trial: Any, p: Param) -> float:
    return trial.suggest_float(p.key, p.low, p.high, log=p.log, step=p.step)


@PARAM_TYPES.register("int")
def _suggest_int(trial: Any, p: Param) -> int:
    return trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))


@PARAM_TYPES.register("categorical")
def _suggest_categorical(trial: Any, p: Param) -> Any:
    return p.decode(trial.suggest_categorical(p.key, [p.encode(c) for c in p.choices]))


def suggest(trial: Any, space: list[Param]) -> dict[str, Any]:
    """Sample every parameter: ``{dotted key: value}``."""
    return {p.key: PARAM_TYPES.get(p.type)(trial, p) for p in space}


def grid_space(space: list[Param]) -> dict[str, list[Any]]:
    """The GridSampler space: categorical choices, ``grid`` values for numeric params."""
    out = {}
    for p in space:
        values = [p.encode(c) for c in p.choices] if p.type == "categorical" else p.grid
        if not values:
            raise UserError(f"grid sampler: search_space '{p.key}' needs a 'grid' list of values")
        out[p.key] = list(values)
    return out


def check_space(data: str, model: str, space: list[Param]) -> None:
    """Apply one value of every parameter to the config now, so a typo fails before trial 0."""
    for p in space:
        value = p.choices[0] if p.type == "categorical" else (p.grid or [p.low])[0]
        value = int(value) if p.type == "int" else value
        variant_config(data, model, "check", values={p.key: value})


# --------------------------------------------------------------------------- samplers, pruners


@dataclass
class SweepOptions:
    """What ``mmfold sweep`` was asked to do."""

    data: str
    model: str
    study: str
    folds: list[int]
    n_trials: int | None
    sampler: str = "tpe"
    pruner: str = "median"
    startup: int = 3
    seed: int = 42
    timeout: float | None = None
    overrides: list[str] = field(default_factory=list)
    out: str | None = None
    warmup: int = 2  # epochs of a trial's first fold that are never pruned


@SAMPLERS.register("tpe")
def _tpe(space: list[Param], seed: int) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


@SAMPLERS.register("random")
def _random(space: list[Param], seed: int) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


@SAMPLERS.register("grid")
def _grid(space: list[Param], seed: int) -> Any:
    import optuna

    return optuna.samplers.GridSampler(grid_space(space), seed=seed)


@PRUNERS.register("median")
def _median(opts: SweepOptions) -> Any:
    import optuna

    # First-epoch F1 mostly ranks learning rates and batch sizes by how fast they start, not
    # where they end: the first ``warmup`` epochs of the first fold are never pruned.
    return optuna.pruners.MedianPruner(n_startup_trials=opts.startup, n_warmup_steps=opts.warmup)


@PRUNERS.register("hyperband")
def _hyperband(opts: SweepOptions) -> Any:
    import optuna

    return optuna.pruners.HyperbandPruner()


@PRUNERS.register("none")
def _nop(opts: SweepOptions) -> Any:
    import optuna

    return optuna.pruners.NopPruner()


# ------------------------------------------------------------------------------------ study


def signature(opts: SweepOptions, space: list[Param]) -> str:
    """What makes two sweeps the same study: base config, space, folds, sampler, overrides, and
    how trials are scored (the honest CV's threshold settings), so trials scored another way
    are never compared with these."""
    cfg = load_config(opts.data, opts.model, opts.overrides)
    scoring = ["honest_cv", threshold_params(cfg.blend, cfg.data.metric), cfg.blend.seed]
    if cfg.blend.decoder != "thresholds":  # appended only then: older studies keep their hash
        scoring.append([cfg.blend.decoder, cfg.blend.calibration])
    return stable_hash([learned_settings(cfg.to_dict()), [vars(p) for p in space], opts.folds, opts.sampler, scoring])


def open_study(opts: SweepOptions, space: list[Param], force: bool) -> Any:
    """Create or resume the study; refuse to resume one made from another config."""
    import optuna

    url = studies.sweep_url(opts.data, opts.study)
    storage = studies.storage(url)  # WAL and heartbeats, as the blend's studies
    if force and opts.study in optuna.get_all_study_names(storage):
        optuna.delete_study(study_name=opts.study, storage=storage)
    study = optuna.create_study(storage=storage, study_name=opts.study, direction="maximize", load_if_exists=True,
                                sampler=SAMPLERS.get(opts.sampler)(space, opts.seed),
                                pruner=PRUNERS.get(opts.pruner)(opts))
    sig, old = signature(opts, space), study.user_attrs.get("signature")
    if old is None:
        study.set_user_attr("signature", sig)
        study.set_user_attr("base_model", opts.model)
    elif old != sig:
        raise UserError(f"study '{opts.study}' in {url} was run with another config, search space, folds "
                        f"or sampler; pass --study NEW_NAME for a new study, or --force to start over")
    return study


def requeue_interrupted(study: Any) -> list[int]:
    """Re-queue trials that were cut off (killed: RUNNING; Ctrl-C: FAIL + ``interrupted``).

    The new trial gets the same parameters and the same run name, so the folds the old one
    finished are reused and its unfinished fold resumes from ``last.pt``. One sweep process
    per study is assumed (the caller holds a lock), so every RUNNING trial is a dead one.
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    covered = {t.user_attrs.get("run") for t in trials
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING)}
    requeued = []
    for t in trials:
        cut = t.state == TrialState.RUNNING or (t.state == TrialState.FAIL and t.user_attrs.get("interrupted"))
        if not cut:
            continue
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
        run = t.user_attrs.get("run")
        if run and run not in covered:
            study.enqueue_trial(t.params, user_attrs={"run": run, "retry_of": t.number})
            covered.add(run)
            requeued.append(t.number)
    return requeued


def finished(study: Any) -> int:
    """Trials that count towards ``--trials``: complete or pruned."""
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


# -------------------------------------------------------------------------------- objective


class Objective:
    """``objective(trial)``: closed over the competition and folds, loaded once."""

    def __init__(self, opts: SweepOptions, space: list[Param]) -> None:
        self.opts, self.space, self.comps = opts, space, Competitions()
        self.fold_of_row = load_folds(self.comps.get(load_config(opts.data, opts.model, opts.overrides)))

    def run_name(self, trial: Any) -> str:
        """A re-queued trial keeps its run name; a new one is named by its trial number."""
        prefix = "" if self.opts.study == self.opts.model else f"{self.opts.study}-"
        return trial.user_attrs.get("run") or f"{self.opts.model}{VARIANT_SEP}{prefix}trial{trial.number}"

    def __call__(self, trial: Any) -> float:
        values = suggest(trial, self.space)
        twin = finished_twin(trial)
        if twin is not None:
            return reuse_twin(trial, twin)
        name = self.run_name(trial)
        trial.set_user_attr("run", name)
        cfg = variant_config(self.opts.data, self.opts.model, name, self.opts.overrides, values)
        try:
            return self._train(trial, cfg)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)  # Optuna marks it FAIL; resume re-queues it
            raise

    def _train(self, trial: Any, cfg: Config) -> float:
        """Train the chosen folds one by one, reporting for pruning after epochs and folds.

        After each fold the honest CV of the folds done so far is reported (and kept as the
        trial's ``fold_scores``), so the last report is the trial's value.
        """
        import optuna

        comp, spent, cv = self.comps.get(cfg), 0.0, None
        state = {"pos": 0}
        with on_epoch(lambda rec: self._epoch(trial, cfg, state, rec)):
            for pos, k in enumerate(self.opts.folds):
                state["pos"] = pos
                spent += float(run_variant_fold(cfg, comp, self.fold_of_row, k).get("train_time_s") or 0.0)
                cv = honest_score(cfg, comp, self.fold_of_row, self.opts.folds[: pos + 1])
                trial.set_user_attr("fold_scores", cv.per_fold)
                trial.set_user_attr("train_time_s", spent)
                trial.report(cv.mean, pos * STRIDE + STRIDE - 1)
                if pos + 1 < len(self.opts.folds) and trial.should_prune():
                    raise optuna.TrialPruned(f"honest CV of {pos + 1} fold(s) {cv.mean:.4f}")
        return cv.mean

    @staticmethod
    def _epoch(trial: Any, cfg: Config, state: dict[str, int], rec: dict) -> None:
        """Engine epoch hook: report the epoch's validation F1 and maybe prune."""
        import optuna

        if rec.get("model") != cfg.model.name or rec.get("valid_f1") is None:
            return
        trial.report(float(rec["valid_f1"]), state["pos"] * STRIDE + int(rec["epoch"]))
        if trial.should_prune():
            raise optuna.TrialPruned(f"fold {rec.get('fold')} epoch {rec['epoch']}: valid F1 {rec['valid_f1']:.4f}")


def finished_twin(trial: Any) -> Any | None:
    """An earlier complete or pruned trial of the study with exactly this trial's parameters.

    Optuna's samplers may propose a point they already tried (TPE does, often, on a small
    discrete space); training it again would reproduce the same folds at full cost.
    """
    from optuna.trial import TrialState

    done = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return next((t for t in done if t.number != trial.number and t.params == trial.params), None)


def reuse_twin(trial: Any, twin: Any) -> float:
    """Take ``twin``'s result: its value (or its pruning), its run dir and fold scores.

    A pruned twin prunes this trial too: training the same config again would report the same
    values at the same steps. Nothing is trained, so the trial's training time is 0; nothing is
    reported either, so the pruner does not count one curve twice.
    """
    import optuna
    from optuna.trial import TrialState

    trial.set_user_attr("reused_from", twin.number)
    trial.set_user_attr("run", twin.user_attrs.get("run", ""))
    trial.set_user_attr("fold_scores", twin.user_attrs.get("fold_scores") or [])
    trial.set_user_attr("train_time_s", 0.0)
    if twin.state == TrialState.PRUNED:  # no reports: the pruner already has this curve once
        raise optuna.TrialPruned(f"same parameters as pruned trial {twin.number}")
    return float(twin.value)


# ---------------------------------------------------------------------------------- results


def results_table(study: Any) -> pd.DataFrame:
    """One row per trial: state, run, parameters, CV, fold spread, training and wall time, and
    the trial whose result it reused (same parameters: nothing trained)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        scores = t.user_attrs.get("fold_scores") or []
        wall = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        value = t.value if t.value is not None else (float(np.mean(scores)) if scores else None)
        rows.append({"number": t.number, "state": t.state.name, "run": t.user_attrs.get("run", ""),
                     **{k: v for k, v in t.params.items()}, "value": value,
                     "fold_std": float(np.std(scores)) if len(scores) > 1 else None, "folds_done": len(scores),
                     "train_time_s": t.user_attrs.get("train_time_s"), "wall_s": wall,
                     "reused_from": t.user_attrs.get("reused_from")})
    return pd.DataFrame(rows)


def table_markdown(df: pd.DataFrame, best: int | None, metric: str) -> str:
    """The results table as markdown, best trial in bold, the score named by ``metric``."""
    from mmfold.report.report import md_table

    shown = df.copy()
    shown["number"] = [f"**{n}** (best)" if n == best else str(n) for n in shown["number"]]
    for col in ("train_time_s", "wall_s"):
        shown[col] = [("–" if t is None or pd.isna(t) else f"{t:.1f}") for t in shown[col]]
    shown["reused_from"] = ["" if pd.isna(n) else f"trial {int(n)}" for n in shown["reused_from"]]
    shown = shown.rename(columns={"number": "trial", "value": f"CV {metric_label(metric)}", "fold_std": "± fold std",
                                  "train_time_s": "train time (s)", "wall_s": "wall time (s)",
                                  "reused_from": "result of"})
    return md_table(shown)


def best_yaml(opts: SweepOptions, params: dict[str, Any], value: float, space: list[Param],
              metric: str = "samples") -> str:
    """The base model YAML with the CLI overrides and the best values written in."""
    doc = yaml.safe_load(model_yaml(opts.model, opts.data).read_text()) or {}
    for item in opts.overrides:
        key, raw = item.split("=", 1)
        doc = deep_merge(doc, nested(key, yaml.safe_load(raw)))
    by_key = {p.key: p for p in space}
    for key, label in params.items():
        doc = deep_merge(doc, nested(key, by_key[key].decode(label) if key in by_key else label))
    head = (f"# Written by `mmfold sweep` from {opts.model} (study '{opts.study}', data {opts.data}):\n"
            f"# best trial honest CV {metric_label(metric)} = {value:.4f} on folds {opts.folds}.\n")
    return head + yaml.safe_dump(doc, sort_keys=False)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged into a copy of ``base``, recursing into dicts (YAML documents)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def write_results(study: Any, opts: SweepOptions, space: list[Param]) -> dict[str, Path]:
    """Results table (csv + md + png) under ``reports/<data>/`` and the best model YAML."""
    from mmfold.report import plots

    df, metric = results_table(study), sweep_metric(opts)
    out = paths.reports_dir(opts.data)
    written = {"csv": fileio.write_csv(df, out / f"sweep_{opts.study}.csv")}
    complete = df[df["state"] == "COMPLETE"]
    best = None if complete.empty else int(study.best_trial.number)
    if len(complete):
        written["png"] = plots.sweep_history(df, out / "figures" / f"sweep_{opts.study}.png", opts.study)
    md = [f"# Sweep `{opts.study}` of `{opts.model}` on `{opts.data}`\n",
          f"Sampler `{opts.sampler}`, pruner `{opts.pruner}`, folds {opts.folds}; score = the honest CV "
          f"{metric_label(metric)} the blend sees: per-label thresholds fitted on the other folds "
          "(one fold: on the other half of it) with the `blend.*` rules, mean over those folds. "
          "Train time is summed over the trial's folds (reused folds count their original time; "
          "a trial with the parameters of an earlier one takes its result, `result of`, and trains "
          "nothing); wall time includes data loading and reused folds.\n"]
    if "png" in written:
        md.append(f"![sweep](figures/sweep_{opts.study}.png)\n")
    md.append(table_markdown(df, best, metric) + "\n")
    if best is not None:
        name = opts.out or f"{opts.model}_tuned"
        text = best_yaml(opts, study.best_trial.params, study.best_value, space, metric)
        written["yaml"] = fileio.write_text(model_yaml(name), text)
        md.append(f"\nBest trial {best}: CV {study.best_value:.4f}; written as `configs/models/{name}.yaml`.\n")
    written["md"] = fileio.write_text(out / f"sweep_{opts.study}.md", "\n".join(md))
    return written


# -------------------------------------------------------------------------------------- run


def sweep_metric(opts: SweepOptions) -> str:
    """The competition metric the sweep's trials are scored by (``data.metric``)."""
    return load_config(opts.data, opts.model, opts.overrides).data.metric


def sweep(opts: SweepOptions, force: bool = False) -> Any:
    """Run (or resume) the study to ``n_trials`` finished trials; write the results."""
    import optuna

    cfg = load_config(opts.data, opts.model, opts.overrides)
    space = parse_space(cfg.model.search_space, str(model_yaml(opts.model, opts.data)))
    if not space:
        raise UserError(f"model '{opts.model}' declares no model.search_space in {model_yaml(opts.model, opts.data)}")
    check_space(opts.data, opts.model, space)  # unknown keys first, then keys this kind ignores
    check_used_keys(cfg, [p.key for p in space], f"search_space of {model_yaml(opts.model, opts.data)}")
    check_used_keys(cfg, [override_key(o) for o in opts.overrides], "override")
    n_trials = opts.n_trials or (math.prod(len(v) for v in grid_space(space).values()) if opts.sampler == "grid" else 20)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with fileio.file_lock(paths.sweeps_dir(opts.data) / f".{opts.study}.lock"):
        study = open_study(opts, space, force)
        requeued = requeue_interrupted(study)
        if requeued:
            print(f"re-queued interrupted trial(s) {requeued} with their run dirs")
        todo = max(0, n_trials - finished(study))
        print(f"study '{opts.study}': {finished(study)} finished trial(s), running {todo} more")
        try:
            if todo:
                study.optimize(Objective(opts, space), n_trials=todo, timeout=opts.timeout, catch=(RuntimeError,),
                               callbacks=[_print_trial])
        finally:
            written = write_results(study, opts, space)
    print(f"wrote {written['md']}" + (f" and {written['yaml']}" if "yaml" in written else ""))
    return study


def _print_trial(study: Any, trial: Any) -> None:
    """One line per finished trial (Optuna's own logging is turned down)."""
    value = "–" if trial.value is None else f"{trial.value:.4f}"
    print(f"trial {trial.number} {trial.state.name}: {value} {trial.params}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmfold sweep`` options."""
    p.add_argument("--model", required=True, help="model config whose model.search_space is searched")
    p.add_argument("--trials", type=int, help="finished trials to reach (default: grid size, or 20)")
    p.add_argument("--folds", help="folds each trial is scored on, comma-separated (default: all)")
    p.add_argument("--sampler", default="tpe", help=f"one of {list(SAMPLERS)}")
    p.add_argument("--pruner", default="median", help=f"one of {list(PRUNERS)}")
    p.add_argument("--startup", type=int, default=3, help="trials before the median pruner may prune")
    p.add_argument("--warmup", type=int, default=2, help="epochs of the first fold the median pruner never prunes")
    p.add_argument("--study", help="study name (default: the model name); one SQLite file per study")
    p.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    p.add_argument("--seed", type=int, default=42, help="sampler seed")
    p.add_argument("--out", help="name of the best-config model YAML (default: <model>_tuned)")


def run(args: argparse.Namespace) -> int:
    """Parse options and sweep."""
    cfg = load_config(args.data, args.model, args.overrides)
    n_folds = int(load_folds(load_competition(cfg.data)).max()) + 1
    folds = [int(k) for k in args.folds.split(",")] if args.folds else list(range(n_folds))
    model = cfg.model.name  # a YAML path's name (config.model_key)
    opts = SweepOptions(args.data, model, args.study or model, folds, args.trials, args.sampler,
                        args.pruner, args.startup, args.seed, args.timeout, list(args.overrides), args.out,
                        args.warmup)
    sweep(opts, args.force)
    return 0
