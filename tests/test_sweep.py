"""``mmfold sweep``: grid reproduction, results table, best YAML, pruning, resume after interruption.

A fake CPU member stands in for a model: its quality is a config value, it "trains" in epochs
(``model.params.epochs``: a CPU member uses no ``train.*`` key, and a sweep refuses those),
emitting each epoch through the engine's epoch hook when one exists, counts its calls, and can
be told to raise KeyboardInterrupt mid-sweep, so resume is tested exactly. One test runs the
real TF-IDF member on the demo data through the CLI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from mmfold import paths
from mmfold.train import fold as train
from mmfold.cli import main
from mmfold.config import ConfigError, load_config
from mmfold.data.competition import load_competition, load_folds
from mmfold.errors import UserError
from mmfold.cpu.members import MEMBERS
from mmfold.metrics import binarize, samples_f1
from mmfold.ensemble.scoring import honest_cv
from mmfold.studies.sweep import (Objective, SweepOptions, check_space, grid_space, parse_space, requeue_interrupted,
                          results_table, sweep)
from tests.conftest import install_demo

CALLS: list[tuple[str, int]] = []  # (run name, epochs emitted) per fold trained
INTERRUPT: dict[str, int | None] = {"at": None}  # raise KeyboardInterrupt on this call number


class FakeMember:
    """Probabilities as good as ``model.params.quality``; epochs reported through the hook.

    A member with the real contract (``fit(inp, Y)``, ``predict_proba(inp)``), no learning:
    the first scored rows (the fold's) get noisy true labels, looked up by id."""

    def __init__(self, cfg, comp) -> None:
        self.cfg, self.comp, self.head_name, self.scored = cfg, comp, "fake", False

    def needed_encoders(self):
        return []

    def __getstate__(self):  # what member.skops keeps: the settings, not the data
        return {"quality": float(self.cfg.model.params["quality"])}

    def fit(self, inp, Y):
        CALLS.append((self.cfg.model.name, 0))
        if INTERRUPT["at"] == len(CALLS):
            raise KeyboardInterrupt
        self.head_, self.info_ = self, {"images_per_s": 1.0}
        return self

    def predict_proba(self, inp):
        q = float(self.cfg.model.params["quality"])
        row = {i: r for r, i in enumerate(self.comp.ids("train"))}
        if not all(i in row for i in inp.ids):  # the test set: no labels to be noisy about
            return np.full((len(inp.ids), len(self.comp.classes)), 0.5)
        y = self.comp.y()[[row[i] for i in inp.ids]].astype(float)
        rng = np.random.default_rng(len(inp.ids))
        prob = np.clip(q * y + (1 - q) * rng.random(y.shape), 0, 1)
        epochs = int(self.cfg.model.params.get("epochs", 1))
        for epoch in range(epochs):
            CALLS[-1] = (self.cfg.model.name, epoch + 1)
            f1 = samples_f1(y, binarize(prob, 0.5)) * (epoch + 1) / epochs
            for callback in list(getattr(train, "EPOCH_CALLBACKS", None) or []):
                callback({"epoch": epoch, "valid_f1": f1, "model": self.cfg.model.name, "fold": -1})
        return prob


def fake_member(cfg, comp):
    """The fake member's builder, as registered member kinds are."""
    return FakeMember(cfg, comp)


if "fake_sweep" not in MEMBERS:
    MEMBERS.register("fake_sweep")(fake_member)

SPACE = {"model.params.quality": {"type": "float", "low": 0.1, "high": 0.9, "grid": [0.2, 0.9]},
         "model.params.epochs": {"type": "int", "low": 1, "high": 3, "grid": [1, 2]}}


@pytest.fixture
def demo(project: Path, demo_template: Path) -> Path:
    """Isolated project with demo data, folds and the fake model's YAML."""
    install_demo(project, demo_template)
    write_fake(project, SPACE)
    CALLS.clear()
    INTERRUPT["at"] = None
    return project


def write_fake(root: Path, space: dict) -> None:
    """``configs/models/fake.yaml`` with a search space."""
    doc = {"model": {"kind": "fake_sweep", "params": {"quality": 0.5}, "search_space": space}}
    (root / "configs" / "models" / "fake.yaml").write_text(yaml.safe_dump(doc))


def opts(**kw) -> SweepOptions:
    """Grid sweep of the fake model on folds 0 and 1."""
    base = {"data": "demo", "model": "fake", "study": "fake", "folds": [0, 1], "n_trials": None,
            "sampler": "grid", "pruner": "none"}
    return SweepOptions(**{**base, **kw})


def test_grid_reproduces_every_combination(demo: Path) -> None:
    study = sweep(opts())
    df = results_table(study)
    assert len(df) == 4 and (df["state"] == "COMPLETE").all()
    combos = {(r["model.params.quality"], r["model.params.epochs"]) for _, r in df.iterrows()}
    assert combos == {(0.2, 1), (0.2, 2), (0.9, 1), (0.9, 2)}
    assert df["train_time_s"].notna().all() and df["wall_s"].notna().all()
    assert study.best_params["model.params.quality"] == 0.9
    # every trial trained its own run dir, and the table/plot/best YAML are written
    assert all((paths.run_dir("demo", run, 1) / "done.json").exists() for run in df["run"])
    md = (paths.reports_dir("demo") / "sweep_fake.md").read_text()
    assert "train time (s)" in md and "(best)" in md
    assert (paths.reports_dir("demo") / "figures" / "sweep_fake.png").stat().st_size > 8000
    tuned = load_config("demo", "fake_tuned")
    assert tuned.model.params["quality"] == 0.9
    assert tuned.model.params["epochs"] == study.best_params["model.params.epochs"]


def test_resume_after_interruption_repeats_no_finished_work(demo: Path) -> None:
    INTERRUPT["at"] = 4  # trial 0: calls 1-2; trial 1: fold 0 = call 3, fold 1 interrupted
    with pytest.raises(KeyboardInterrupt):
        sweep(opts())
    first = list(CALLS)
    assert [name for name, _ in first] == ["fake@trial0", "fake@trial0", "fake@trial1", "fake@trial1"]
    CALLS.clear()
    INTERRUPT["at"] = None
    study = sweep(opts())
    runs = [name for name, _ in CALLS]
    assert "fake@trial0" not in runs  # the finished trial is not repeated
    assert runs.count("fake@trial1") == 1  # the cut-off trial only trains its unfinished fold
    assert len(CALLS) == 5  # 1 resumed fold + 2 remaining grid points x 2 folds
    df = results_table(study)
    done = df[df["state"] == "COMPLETE"]
    assert len(done) == 4
    assert {(r["model.params.quality"], r["model.params.epochs"]) for _, r in done.iterrows()} == \
        {(0.2, 1), (0.2, 2), (0.9, 1), (0.9, 2)}
    CALLS.clear()
    sweep(opts())  # a finished study costs nothing
    assert CALLS == []


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask() stands in for a killed sweep
def test_sweep_studies_live_in_the_shared_storage(demo: Path) -> None:
    """The sweep opens its SQLite study as the blend does: write-ahead logging and heartbeats,
    and a trial left RUNNING by a killed sweep is still re-queued with its run dir."""
    import sqlite3

    from optuna.storages._heartbeat import is_heartbeat_enabled

    from mmfold.artifacts import studies
    from mmfold.studies.sweep import open_study

    studies.storage.cache_clear()
    study = open_study(opts(), parse_space(SPACE, "fake.yaml"), force=False)
    with sqlite3.connect(paths.sweeps_dir("demo") / "fake.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert is_heartbeat_enabled(study._storage)
    zombie = study.ask()
    zombie.suggest_float("model.params.quality", 0.1, 0.9)
    zombie.set_user_attr("run", "fake@trial0")
    assert requeue_interrupted(study) == [zombie.number]
    studies.storage.cache_clear()


def test_requeue_killed_trial_keeps_params_and_run() -> None:
    """A trial left RUNNING by a killed process is failed and re-queued once, same run dir."""
    study = optuna.create_study(direction="maximize")
    t = study.ask()
    t.suggest_float("x", 0, 1)
    t.set_user_attr("run", "m@trial0")
    assert requeue_interrupted(study) == [0]
    old, new = study.get_trials()
    assert old.state.name == "FAIL" and new.state.name == "WAITING"
    assert new.system_attrs["fixed_params"] == old.params and new.user_attrs["run"] == "m@trial0"
    assert requeue_interrupted(study) == []


@pytest.mark.parametrize("warmup", [0, 2])
def test_pruned_on_epoch_hook(demo: Path, monkeypatch: pytest.MonkeyPatch, warmup: int) -> None:
    """With the engine hook, a bad trial stops inside its first fold, right after the
    ``warmup`` epochs the pruner leaves alone."""
    monkeypatch.setattr(train, "EPOCH_CALLBACKS", [], raising=False)
    write_fake(demo, {"model.params.quality": [0.9, 0.1, 0.85], "model.params.epochs": [4]})
    study = sweep(opts(pruner="median", startup=1, sampler="grid", warmup=warmup))
    df = results_table(study).set_index("model.params.quality")
    assert df.loc[0.1, "number"] > 0  # the seeded grid order puts a good trial first
    assert df.loc[0.1, "state"] == "PRUNED"
    bad = [calls for name, calls in CALLS if name == df.loc[0.1, "run"]]
    assert bad == [warmup + 1]  # one fold, stopped at the first epoch it may be pruned
    assert df.loc[0.9, "state"] == "COMPLETE"


def test_pruned_between_folds_without_hook(demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(train, "EPOCH_CALLBACKS", raising=False)
    write_fake(demo, {"model.params.quality": [0.9, 0.1, 0.85], "model.params.epochs": [1]})
    study = sweep(opts(pruner="median", startup=1, folds=[0, 1, 2]))
    df = results_table(study).set_index("model.params.quality")
    assert df.loc[0.1, "number"] > 0  # the seeded grid order puts a good trial first
    assert df.loc[0.1, "state"] == "PRUNED" and df.loc[0.1, "folds_done"] == 1
    assert [n for n, _ in CALLS].count(df.loc[0.1, "run"]) == 1


def test_changed_space_is_a_new_study_or_force(demo: Path) -> None:
    sweep(opts(n_trials=1))
    write_fake(demo, {"model.params.quality": [0.3, 0.4]})
    with pytest.raises(UserError, match="another config"):
        sweep(opts(n_trials=1))
    CALLS.clear()
    study = sweep(opts(n_trials=2), force=True)
    assert len(study.trials) == 2
    # trial names are reused by the new study: the old run dirs were retrained, not reused
    assert [n for n, _ in CALLS].count("fake@trial0") == 2


def test_space_errors(demo: Path) -> None:
    with pytest.raises(ConfigError, match="unknown fields"):
        parse_space({"train.lr": {"type": "float", "low": 0.1, "high": 1, "lgo": True}}, "x")
    with pytest.raises(ConfigError, match="needs low and high"):
        parse_space({"train.lr": {"type": "float"}}, "x")
    with pytest.raises(ConfigError, match="unknown key"):
        check_space("demo", "fake", parse_space({"train.lrr": [0.1]}, "x"))
    with pytest.raises(UserError, match="grid"):
        grid_space(parse_space({"train.lr": {"type": "float", "low": 0.1, "high": 1}}, "x"))
    space = parse_space({"train.augment": [[], [{"name": "hflip"}]]}, "x")
    assert grid_space(space)["train.augment"] == ["[]", '[{"name": "hflip"}]']


def test_cli_sweep_tfidf_on_demo(demo: Path) -> None:
    """The real CPU member through ``mmfold sweep`` (what ``make sweep`` runs)."""
    doc = {"model": {"kind": "tfidf_linear", "params": {"min_df": 1, "head_params": {"C": 1.0, "solver": "liblinear"}},
                     "search_space": {"model.params.head_params.C": {"type": "float", "low": 0.1, "high": 10.0,
                                                                       "log": True}}}}
    (demo / "configs" / "models" / "tfidf.yaml").write_text(yaml.safe_dump(doc))
    assert main(["sweep", "--model", "tfidf", "--trials", "2", "--folds", "0,1"]) == 0
    df = pd.read_csv(paths.reports_dir("demo") / "sweep_tfidf.csv")
    assert len(df) == 2 and df["value"].between(0, 1).all()
    assert (demo / "configs" / "models" / "tfidf_tuned.yaml").exists()


def test_space_of_keys_the_kind_ignores_is_refused_before_training(demo: Path) -> None:
    """``train.loss`` on a CPU member would spend every trial measuring nothing."""
    doc = {"model": {"kind": "tfidf_linear", "params": {"min_df": 1},
                     "search_space": {"train.loss": ["bce", "focal"], "model.params.min_df": [1, 2]}}}
    (demo / "configs" / "models" / "tfidf.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match=r"search_space.*\['train.loss'\] do nothing.*tfidf_linear"):
        sweep(opts(model="tfidf", study="tfidf"))
    assert not (demo / "runs").exists()


def fold_oof(run: str, folds: list[int], comp, fold_of_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A run's fold OOFs in train order on the rows of ``folds``: (probs, row indices)."""
    oof = pd.concat([pd.read_parquet(paths.run_dir("demo", run, k) / "oof.parquet") for k in folds])
    rows = np.flatnonzero(np.isin(fold_of_row, folds))
    ids = comp.train["id"].astype(str).iloc[rows]
    return oof.set_index(oof["id"].astype(str)).loc[ids, comp.classes].to_numpy(np.float64), rows


@pytest.mark.parametrize("folds", [[0, 1], [2]])
def test_trial_value_is_the_honest_tuned_cv_in_the_metric(demo: Path, folds: list[int]) -> None:
    """A trial scores what the blend will see: thresholds fitted out of fold, ``data.metric``,
    ``blend.*`` post-rules (one fold: seeded halves), not F1 at 0.5."""
    over = ["data.metric=micro", "blend.decoder=thresholds", "blend.min_labels=2"]
    study = sweep(opts(folds=folds, overrides=over))
    cfg = load_config("demo", "fake", over)
    comp = load_competition(cfg.data)
    fold_of_row = load_folds(comp)
    for t in study.trials:
        probs, rows = fold_oof(t.user_attrs["run"], folds, comp, fold_of_row)
        want = honest_cv(probs, comp.y()[rows], fold_of_row[rows], cfg.blend, "micro")
        assert t.value == pytest.approx(want.mean, abs=1e-12)
        assert t.user_attrs["fold_scores"] == pytest.approx(want.per_fold, abs=1e-12)
    md = (paths.reports_dir("demo") / "sweep_fake.md").read_text()
    assert "micro-F1" in md and "at 0.5" not in md


def test_tpe_reuses_a_finished_trial_with_the_same_parameters(demo: Path) -> None:
    """Two combinations, six trials: TPE samples repeats, and only distinct ones train."""
    write_fake(demo, {"model.params.quality": [0.2, 0.9], "model.params.epochs": [1]})
    study = sweep(opts(sampler="tpe", n_trials=6))
    df = results_table(study)
    assert len(df) == 6 and (df["state"] == "COMPLETE").all()
    distinct = {(r["model.params.quality"], r["model.params.epochs"]) for _, r in df.iterrows()}
    assert len(distinct) < 6  # the sampler did repeat itself
    assert len(CALLS) == 2 * len(distinct)  # one training per distinct combination and fold
    for t in study.trials:
        twin = t.user_attrs.get("reused_from")
        if twin is not None:
            assert study.trials[twin].params == t.params and study.trials[twin].value == t.value
            assert t.user_attrs["run"] == study.trials[twin].user_attrs["run"]
    assert df["reused_from"].notna().sum() == 6 - len(distinct)


def test_twin_of_a_pruned_trial_is_pruned_without_training(demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same parameters as a pruned trial: pruned again at once, its run dir and scores reused."""
    monkeypatch.setattr(train, "EPOCH_CALLBACKS", [], raising=False)
    write_fake(demo, {"model.params.quality": [0.9, 0.1], "model.params.epochs": [3]})
    o = opts(pruner="median", startup=1, warmup=0)
    space = parse_space(load_config("demo", "fake").model.search_space, "fake.yaml")
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(1, 0))
    for q in (0.9, 0.1, 0.1):
        study.enqueue_trial({"model.params.quality": q, "model.params.epochs": 3})
    study.optimize(Objective(o, space), n_trials=3)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "PRUNED", "PRUNED"]
    assert [name for name, _ in CALLS] == ["fake@trial0", "fake@trial0", "fake@trial1"]
    twin = study.trials[2]
    assert twin.user_attrs["reused_from"] == 1 and twin.user_attrs["run"] == "fake@trial1"
    assert twin.user_attrs["train_time_s"] == 0.0 and twin.intermediate_values == {}
