"""``mmfold report`` on a CI-sized demo competition trained with fast CPU members.

The pipeline is real (demo data, folds, two TF-IDF members trained and collected, ``mmfold
blend`` and ``mmfold lb``); only the torch engine's ``log.jsonl`` is written by hand, following
its contract, because training a torch model here costs minutes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mmfold import fileio, paths
from mmfold.cli import main
from mmfold.config import load_config
from mmfold.train.runner import train_model
from tests.conftest import install_demo

MODELS = {
    "tfidf_a": {"kind": "tfidf_linear", "params": {"min_df": 1, "head_params": {"C": 4.0, "solver": "liblinear"}}},
    "tfidf_b": {"kind": "tfidf_linear", "params": {"char_ngrams": None, "min_df": 1,
                                                   "head_params": {"C": 0.5, "solver": "liblinear"}}},
}
SECTIONS = ["## Models", "## Blends and leaderboard", "## Per-label F1", "## Training labels",
            "## Model diversity", "## Training curves", "## Thresholds", "## Sweeps and ablations"]
FIGURES = ["per_label_f1.png", "label_frequency.png", "label_cooccurrence.png", "oof_correlation.png",
           "curves_tfidf_a.png", "thresholds.png"]


def write_model_yaml(root: Path, name: str, model: dict) -> None:
    """A model config in the isolated project."""
    (root / "configs" / "models" / f"{name}.yaml").write_text(yaml.safe_dump({"model": model}))


@pytest.fixture
def demo(project: Path, demo_template: Path) -> Path:
    """The isolated project with the demo data and folds."""
    install_demo(project, demo_template)
    return project


def write_log(data: str, model: str, n_folds: int, epochs: int = 3) -> None:
    """A torch-engine-style ``log.jsonl`` per fold (the keys the engine writes)."""
    for k in range(n_folds):
        rows = [{"epoch": e, "step": 5 * (e + 1), "train_loss": 0.7 - 0.1 * e - 0.01 * k,
                 "valid_loss": 0.72 - 0.08 * e, "valid_f1": 0.4 + 0.1 * e + 0.01 * k, "lr": 1e-3,
                 "time_s": 1.0, "images_per_s": 100.0} for e in range(epochs)]
        fileio.write_text(paths.run_dir(data, model, k) / "log.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def trained_template(demo_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two collected members, engine logs for one, a real blend with a leaderboard score.

    Built once per module (training and blending are the slow part) and copied per test.
    """
    root = tmp_path_factory.mktemp("trained_template")
    shutil.copytree(demo_template / "input", root / "input")
    shutil.copytree(Path(__file__).resolve().parents[1] / "configs", root / "configs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFOLD_HOME", str(root))
        mp.chdir(root)
        assert main(["folds"]) == 0
        for name, model in MODELS.items():
            write_model_yaml(root, name, model)
            train_model(load_config("demo", name))
        write_log("demo", "tfidf_a", 5)
        assert main(["blend", "--models", "tfidf_a", "tfidf_b", "--name", "blend1", "blend.method=greedy"]) == 0
        assert main(["submit", "--name", "blend1", "--score", "0.705"]) == 0
    return root


@pytest.fixture
def trained(project: Path, trained_template: Path) -> Path:
    """The trained template copied into this test's isolated project."""
    for sub in ("input", "folds", "runs", "oof", "submissions", "reports", "configs"):
        if (trained_template / sub).exists():
            shutil.copytree(trained_template / sub, project / sub, dirs_exist_ok=True)
    return project


def test_report_has_every_section_and_figure(trained: Path) -> None:
    assert main(["report"]) == 0
    md = (paths.reports_dir("demo") / "report.md").read_text()
    for section in SECTIONS:
        assert section in md, section
    for fig in FIGURES:
        png = paths.reports_dir("demo") / "figures" / fig
        assert png.exists() and png.stat().st_size > 8000, fig  # a real plot, not an empty canvas
        assert f"(figures/{fig})" in md
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "`tfidf_a`" in md and "`tfidf_b`" in md and "blend blend1" in md
    log = pd.read_csv(paths.submissions_dir("demo") / "log.csv")
    row = md.split("| blend1 |")[1].split("\n")[0]
    for col in ("cv_mean", "cv_in_sample", "lb"):  # CV, in-sample CV and LB side by side
        assert f"{log.loc[0, col]:.4f}" in row, col
    assert "[blend_blend1](blend_blend1.md)" in md
    assert "strongest" in md and "weakest" in md
    assert "No per-epoch logs" in md and "`tfidf_b`" in md.split("No per-epoch logs")[1]


def test_report_cv_matches_collect(trained: Path) -> None:
    """The table's honest CV is the protocol of ``collect`` (``scoring.honest_cv``): same folds,
    same threshold settings, same metric."""
    from mmfold.report.report import build_context

    ctx = build_context(load_config("demo"))
    for m in ctx.models:
        meta = json.loads(paths.oof_meta_file("demo", m.name).read_text())
        assert m.fold_scores == pytest.approx(meta["cv_tuned_per_fold"], abs=1e-12)
        assert m.cv == pytest.approx(np.mean(meta["cv_tuned_per_fold"]), abs=1e-12)
        assert m.metrics == pytest.approx(meta["cv_tuned"], abs=1e-9)
        assert m.metrics_05 == pytest.approx(meta["cv"], abs=1e-9)
    assert [m.cv for m in ctx.models] == sorted((m.cv for m in ctx.models), reverse=True)
    assert ctx.blend is not None and ctx.blend.prob.shape == ctx.models[0].prob.shape


def test_report_models_follow_the_metric_and_blend_settings(trained: Path) -> None:
    """``data.metric`` and ``blend.*`` post-rules change the report's honest CV as they change collect's."""
    from mmfold.report.report import build_context
    from mmfold.ensemble.scoring import honest_cv

    cfg = load_config("demo", overrides=["data.metric=micro", "blend.decoder=thresholds", "blend.max_labels=2"])
    ctx = build_context(cfg)
    y = ctx.comp.y()
    for m in ctx.models:
        want = honest_cv(m.prob, y, ctx.folds, cfg.blend, "micro")
        assert m.fold_scores == pytest.approx(want.per_fold, abs=1e-12)
    assert main(["report", "data.metric=micro", "blend.decoder=thresholds"]) == 0
    assert "CV micro-F1" in (paths.reports_dir("demo") / "report.md").read_text()


BLENDS = {  # every method and transform, with as few trials as still mean something
    "mean": ["blend.method=mean"],
    "greedy": ["blend.method=greedy"],
    "optuna": ["blend.n_trials=4"],
    "lgbm": ["blend.method=lgbm"],
    "rank": ["blend.transform=rank", "blend.n_trials=3"],
    "power": ["blend.transform=power", "blend.n_trials=3"],
}


def test_report_shows_the_blend_that_was_submitted(trained: Path) -> None:
    """The report's blend numbers are the blend stage's own nested-CV predictions, for every
    method: re-mixing members with the logged weights is not what lgbm/rank/power submitted."""
    from mmfold.report.report import build_context

    for name, args in BLENDS.items():
        assert main(["blend", "--models", "tfidf_a", "tfidf_b", "--name", name, *args]) == 0
    log = pd.read_csv(paths.submissions_dir("demo") / "log.csv", dtype=str).set_index("name")
    for name in BLENDS:
        assert (paths.reports_dir("demo") / f"blend_{name}.oof.parquet").exists(), name
        saved = json.loads((paths.reports_dir("demo") / f"blend_{name}.json").read_text())
        b = build_context(load_config("demo"), name).blend
        assert b.cv == pytest.approx(float(log.loc[name, "cv_mean"]), abs=1e-6), name
        assert np.std(b.fold_scores) == pytest.approx(float(log.loc[name, "cv_std"]), abs=1e-6), name
        assert b.fold_scores == pytest.approx(saved["cv"]["per_fold"], abs=1e-12), name
        assert b.in_sample == pytest.approx(float(log.loc[name, "cv_in_sample"]), abs=1e-6), name
        assert main(["report", "--blend", name]) == 0
        md = (paths.reports_dir("demo") / "report.md").read_text()
        row = md.split(f"| `blend {name}` |")[1].split("\n")[0]  # the thresholds table
        assert f"{float(log.loc[name, 'cv_mean']):.4f}" in row, (name, row)
        assert f"honest CV {float(log.loc[name, 'cv_mean']):.4f}" in md, name


def test_report_skips_a_blend_saved_before_blend_oofs_existed(trained: Path, capsys: pytest.CaptureFixture) -> None:
    """An old blend has no saved predictions: say so rather than show numbers it never had."""
    (paths.reports_dir("demo") / "blend_blend1.oof.parquet").unlink()
    assert main(["report"]) == 0
    md = (paths.reports_dir("demo") / "report.md").read_text()
    assert "blend1" in md.split("## Per-label F1")[1] and "blend_blend1.oof.parquet" in md
    assert "| `blend blend1` |" not in md
    capsys.readouterr()
    assert main(["report", "--blend", "blend1"]) == 2
    err = capsys.readouterr().err
    assert "blend_blend1.oof.parquet" in err and "make blend" in err
    assert main(["report", "--blend", "nope"]) == 2
    assert "no blend named 'nope'" in capsys.readouterr().err


def test_report_before_anything_is_trained(demo: Path) -> None:
    """Every section still renders, saying what is missing instead of failing."""
    assert main(["report"]) == 0
    md = (paths.reports_dir("demo") / "report.md").read_text()
    for section in SECTIONS:
        assert section in md
    assert "No collected models" in md and "No blends logged yet" in md
    assert (paths.reports_dir("demo") / "figures" / "label_cooccurrence.png").exists()


def test_variants_are_kept_out_of_the_main_table(trained: Path) -> None:
    """Sweep trials / ablation variants (``<model>@...``) never crowd the models table."""
    from mmfold.report.report import model_names

    shutil.copy(paths.oof_meta_file("demo", "tfidf_a"), paths.oof_meta_file("demo", "tfidf_a@trial0"))
    assert model_names("demo") == ["tfidf_a", "tfidf_b"]


def test_a_collected_test_file_is_not_a_model(project: Path) -> None:
    """``<model>.test.parquet``/``.test.json`` (what predict writes) name no model of their own."""
    from mmfold.report.report import model_names

    folder = paths.oof_dir("demo")
    folder.mkdir(parents=True)
    for name in ("a.parquet", "a.json", "a.test.parquet", "a.test.json", "a@t1.parquet"):
        (folder / name).write_text("")
    assert model_names("demo") == ["a"]
