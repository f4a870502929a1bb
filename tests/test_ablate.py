"""``mmfold ablate`` on a CI-sized demo competition with the real TF-IDF member (2 folds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mmfold import paths
from mmfold.studies.ablate import ablate, parse_ablations
from mmfold.cli import main
from mmfold.config import ConfigError, load_config
from mmfold.data.competition import load_competition, load_folds
from mmfold.errors import UserError
from mmfold.artifacts.predictions import read_oof
from mmfold.ensemble.blenders import build_blender
from mmfold.ensemble.nested import nested_cv
from mmfold.ensemble.scoring import at_half, honest_cv, threshold_params
from mmfold.ensemble.thresholds import ThresholdOptimizer
from mmfold.train.runner import train_model
from tests.conftest import install_demo

BASE = {"kind": "tfidf_linear", "params": {"min_df": 1, "head_params": {"C": 4.0, "solver": "liblinear"}}}
ABLATIONS = {
    "word_only": ["model.params.char_ngrams=null"],
    "weak_C": ["model.params.head_params.C=0.05"],
    "broken": ["model.params.no_such_param=1"],
    "thresholds_0.5": {"computed": "thresholds_0.5"},
    "blend_vs_single": {"computed": "blend_vs_single", "models": ["other"]},
    "word_model": {"computed": "model", "model": "other"},
    "missing_model": {"computed": "model", "model": "never_trained"},
}


def write_model(root: Path, name: str, model: dict) -> None:
    (root / "configs" / "models" / f"{name}.yaml").write_text(yaml.safe_dump({"model": model}, sort_keys=False))


@pytest.fixture
def demo(project: Path, demo_template: Path) -> Path:
    """Demo data + folds, the base model with its ablations, and another collected model."""
    install_demo(project, demo_template)
    write_model(project, "tfidf", {**BASE, "ablations": ABLATIONS})
    write_model(project, "other", {"kind": "tfidf_linear", "params": {"char_ngrams": None, "min_df": 1}})
    train_model(load_config("demo", "other"))
    return project


def done_mtimes(model: str, folds: list[int]) -> list[float]:
    return [(paths.run_dir("demo", model, k) / "done.json").stat().st_mtime_ns for k in folds]


def test_ablation_table(demo: Path) -> None:
    df = ablate("demo", "tfidf", folds=[0, 1], overrides=["blend.method=mean"]).set_index("variant")
    assert list(df.index) == ["base", *ABLATIONS]
    assert df.loc["base", "diff"] == 0 and df.loc["base", "what"] == "`tfidf`"  # blend.* trains nothing
    assert df.loc["weak_C", "diff"] < 0 and df.loc["weak_C", "diff_std"] >= 0
    assert df.loc["weak_C", "better_folds"].endswith("/2")
    assert df.loc["thresholds_0.5", "time_s"] == 0 and df.loc["thresholds_0.5", "diff"] != 0
    assert "`other`" in df.loc["blend_vs_single", "what"] and df.loc["blend_vs_single", "cv"] > 0
    assert pd.isna(df.loc["broken", "cv"]) and "failed" in df.loc["broken", "note"]
    # a collected model as a row: same folds, same scoring, no training
    assert df.loc["word_model", "what"] == "`other`" and df.loc["word_model", "cv"] > 0
    assert pd.isna(df.loc["missing_model", "cv"]) and "make train DATA=demo MODEL=never_trained" in df.loc["missing_model", "note"]
    # trained variants have their own run dirs; computed ones train nothing
    assert (paths.run_dir("demo", "tfidf@word_only", 1) / "done.json").exists()
    assert not paths.run_dir("demo", "tfidf@thresholds_0.5", 0).exists()
    assert not paths.run_dir("demo", "tfidf", 2).exists()  # only the chosen folds
    md = (paths.reports_dir("demo") / "ablate_tfidf.md").read_text()
    assert "Δ vs base" in md and "± fold std of Δ" in md and "word_only" in md
    assert (paths.reports_dir("demo") / "figures" / "ablate_tfidf.png").stat().st_size > 8000


def test_rerun_reuses_folds_and_retrains_changed_variants(demo: Path) -> None:
    ablate("demo", "tfidf", folds=[0, 1], only=["word_only", "weak_C"])
    before = {m: done_mtimes(m, [0, 1]) for m in ("tfidf", "tfidf@word_only", "tfidf@weak_C")}
    first = pd.read_csv(paths.reports_dir("demo") / "ablate_tfidf.csv")
    ablations = {**ABLATIONS, "weak_C": ["model.params.head_params.C=0.5"]}  # the declaration changed
    write_model(demo, "tfidf", {**BASE, "ablations": ablations})
    second = ablate("demo", "tfidf", folds=[0, 1], only=["word_only", "weak_C"])
    assert done_mtimes("tfidf", [0, 1]) == before["tfidf"]
    assert done_mtimes("tfidf@word_only", [0, 1]) == before["tfidf@word_only"]
    assert done_mtimes("tfidf@weak_C", [0, 1]) != before["tfidf@weak_C"]
    assert second.loc[0, "cv"] == pytest.approx(first.loc[0, "cv"])


def test_training_overrides_get_their_own_base(demo: Path) -> None:
    """A CLI override that changes training must not overwrite the model's real runs."""
    train_model(load_config("demo", "tfidf"), folds=[0, 1], collect=False)
    before = done_mtimes("tfidf", [0, 1])
    df = ablate("demo", "tfidf", folds=[0, 1], overrides=["model.params.head_params.C=2.0"], only=["thresholds_0.5"])
    assert df.loc[0, "what"] == "`tfidf@base`"
    assert done_mtimes("tfidf", [0, 1]) == before


def base_oof(run: str, folds: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The base run's fold OOFs in train order on the rows of ``folds``: probs, y, fold per row."""
    comp = load_competition(load_config("demo", "tfidf").data)
    fold_of_row = load_folds(comp)
    rows = np.flatnonzero(np.isin(fold_of_row, folds))
    oof = pd.concat([pd.read_parquet(paths.run_dir("demo", run, k) / "oof.parquet") for k in folds])
    ids = comp.train["id"].astype(str).iloc[rows]
    probs = oof.set_index(oof["id"].astype(str)).loc[ids, comp.classes].to_numpy(np.float64)
    return probs, comp.y()[rows], fold_of_row[rows]


@pytest.mark.parametrize("folds", [[0, 1], [0]])
def test_scores_are_the_honest_cv_in_the_metric_with_blend_rules(demo: Path, folds: list[int]) -> None:
    """Every row is scored like the blend scores a model: ``scoring.honest_cv`` with
    ``data.metric`` and the ``blend.*`` post-rules (one fold: seeded halves), and the 0.5 row
    by ``scoring.at_half``."""
    over = ["data.metric=micro", "blend.decoder=thresholds", "blend.min_labels=2"]
    df = ablate("demo", "tfidf", folds=folds, overrides=over, only=["thresholds_0.5"]).set_index("variant")
    cfg = load_config("demo", "tfidf", over)
    probs, y, fold = base_oof("tfidf@base", folds)  # data.metric changes training: its own base
    tuned = honest_cv(probs, y, fold, cfg.blend, "micro")
    half = at_half(probs, y, fold, cfg.blend, "micro")
    assert df.loc["base", "cv"] == pytest.approx(tuned.mean, abs=1e-12)
    assert df.loc["thresholds_0.5", "cv"] == pytest.approx(half.mean, abs=1e-12)
    assert df.loc["thresholds_0.5", "diff"] == pytest.approx(half.mean - tuned.mean, abs=1e-12)
    md = (paths.reports_dir("demo") / "ablate_tfidf.md").read_text()
    assert "CV micro-F1" in md


def test_blend_row_is_scored_in_the_metric(demo: Path) -> None:
    """``blend_vs_single`` is the blend's nested CV in ``data.metric``, not samples-F1; one
    fold has nothing to fit a blend on and says so."""
    over = ["data.metric=micro", "blend.decoder=thresholds", "blend.method=mean"]
    df = ablate("demo", "tfidf", folds=[0, 1], overrides=over, only=["blend_vs_single"]).set_index("variant")
    cfg = load_config("demo", "tfidf", over)
    probs, y, fold = base_oof("tfidf@base", [0, 1])
    comp = load_competition(cfg.data)
    fold_of_row = load_folds(comp)
    other = read_oof("demo", "other", comp.ids("train"), comp.classes, fold_of_row)
    P = np.stack([probs, other[np.isin(fold_of_row, [0, 1])]])
    want = nested_cv(P, y, fold, lambda k: build_blender(cfg.blend, "micro"),
                     lambda: ThresholdOptimizer(**threshold_params(cfg.blend, "micro")), metric="micro")
    assert df.loc["blend_vs_single", "cv"] == pytest.approx(float(np.mean(want.per_fold)), abs=1e-12)
    one = ablate("demo", "tfidf", folds=[0], overrides=over, only=["blend_vs_single"]).set_index("variant")
    assert pd.isna(one.loc["blend_vs_single", "cv"]) and "2 or more folds" in one.loc["blend_vs_single", "note"]


def test_variant_of_keys_the_kind_ignores_is_refused_before_training(demo: Path) -> None:
    """``train.loss=focal`` on a CPU member would print +0.0000: refused, nothing trained."""
    write_model(demo, "tfidf", {**BASE, "ablations": {**ABLATIONS, "focal": ["train.loss=focal"]}})
    with pytest.raises(UserError, match=r"ablation 'focal'.*\['train.loss'\] do nothing.*tfidf_linear"):
        ablate("demo", "tfidf", folds=[0, 1])
    assert not paths.run_dir("demo", "tfidf", 0).exists()
    assert not paths.run_dir("demo", "tfidf@word_only", 0).exists()


def test_declaration_errors() -> None:
    with pytest.raises(ConfigError, match="list of 'key=value'"):
        parse_ablations({"x": "train.ema=0"}, "m.yaml")
    with pytest.raises(ConfigError, match="may only use"):
        parse_ablations({"a/b": ["train.ema=0"]}, "m.yaml")
    with pytest.raises(Exception, match="computed ablation"):
        parse_ablations({"x": {"computed": "nope"}}, "m.yaml")
    with pytest.raises(ConfigError, match="needs 'model: <collected model>'"):
        parse_ablations({"x": {"computed": "model"}}, "m.yaml")


def test_cli(demo: Path) -> None:
    assert main(["ablate", "--model", "tfidf", "--folds", "0,1", "--only", "word_only"]) == 0
    assert main(["ablate", "--model", "tfidf", "--only", "nope"]) == 2
