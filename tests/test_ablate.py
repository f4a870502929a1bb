"""``mmfold ablate`` on a CI-sized demo competition with the real TF-IDF member (2 folds)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from mmfold import paths
from mmfold.ablate import ablate, parse_ablations
from mmfold.cli import main
from mmfold.config import ConfigError, load_config
from mmfold.train import train_model
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
    assert pd.isna(df.loc["missing_model", "cv"]) and "make train MODEL=never_trained" in df.loc["missing_model", "note"]
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


def test_one_fold_scores_at_half(demo: Path) -> None:
    df = ablate("demo", "tfidf", folds=[0], only=["thresholds_0.5"]).set_index("variant")
    assert df.loc["thresholds_0.5", "diff"] == 0  # nothing to fit thresholds on: both at 0.5
    assert "base is also at 0.5" in df.loc["thresholds_0.5", "note"]


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
