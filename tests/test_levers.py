"""``mmfold levers``: every lever is scored by the same nested CV on the same folds, its delta is
paired against the plain blend, member levers train what they need, and the table lands in
the JSON shape the docs promise (datasets merged, nothing else overwritten)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmfold.artifacts.predictions import load_oofs
from mmfold.cli import main
from mmfold.config import load_config
from mmfold.data.competition import load_competition, load_folds
from mmfold.ensemble.blenders import build_blender
from mmfold.ensemble.decoders import build_decoder
from mmfold.ensemble.nested import nested_cv
from mmfold.studies.levers import train_seconds
from tests.conftest import install_demo

MODELS = {
    "t_lr": {"model": {"kind": "tfidf_linear", "params": {"min_df": 1}}},
    "t_mlp": {"model": {"kind": "tfidf_linear", "params": {"min_df": 1, "head": "mlp",
                                                           "head_params": {"epochs": 3, "hidden": 8}}}},
    # any added member exercises the kNN lever (a kNN head needs dense embeddings, not TF-IDF)
    "t_knn": {"model": {"kind": "tfidf_linear", "params": {"min_df": 1, "head_params": {"C": 0.3}}}},
    "t_id": {"model": {"kind": "id_knn", "params": {"head_params": {"k": 3}}}},
}


@pytest.fixture
def levered(tiny: Path, project: Path) -> Path:
    """Tiny data with two trained members, a kNN and a multi-seed lever declared."""
    for name, body in MODELS.items():
        (project / "configs" / "models" / f"{name}.yaml").write_text(yaml.safe_dump(body))
    seeds = {**MODELS["t_mlp"], "train": {"seeds": [0, 1]}}
    (project / "configs" / "models" / "t_mlp_seeds.yaml").write_text(yaml.safe_dump(seeds))
    data = project / "configs" / "data" / "tiny.yaml"
    cfg = yaml.safe_load(data.read_text())
    cfg["blend"] = {"method": "logistic"}  # what the data config submits with: not the levers' baseline
    cfg["levers"] = {"knn": ["t_knn"], "seeds": {"t_mlp": "t_mlp_seeds"}, "ids": ["t_id"], "method": "logistic",
                     "n_trials": 3}
    data.write_text(yaml.safe_dump(cfg))
    assert main(["folds", "--data", "tiny"]) == 0
    assert main(["train", "--data", "tiny", "--model", "t_lr,t_mlp"]) == 0
    return project


def test_levers_table_is_paired_honest_and_merged(levered: Path) -> None:
    out = levered / "docs" / "bench" / "levers"
    out.parent.mkdir(parents=True)
    out.with_suffix(".json").write_text(json.dumps({"datasets": {"other": {"levers": {"plain": {"cv": 0.5}}}}}))
    args = ["levers", "--data", "tiny", "--models", "t_lr", "t_mlp", "--levers", "plain", "knn", "seeds",
            "stack_lgbm", "ids", "all", "--out", str(out)]
    assert main(args) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["datasets"]["other"] == {"levers": {"plain": {"cv": 0.5}}}  # another dataset's table kept
    lv = doc["datasets"]["tiny"]["levers"]
    assert set(lv) == {"plain", "expected_f1", "expected_f1_isotonic", "gfm", "knn", "seeds", "stack_lgbm", "ids",
                       "all"}
    for r in lv.values():
        assert {"cv", "cv_std", "delta", "delta_std", "extra_s", "folds_better"} <= set(r)
        plain = np.array(lv["plain"]["per_fold"])
        d = np.array(r["per_fold"]) - plain
        assert r["delta"] == pytest.approx(round(d.mean(), 4)) and r["folds_better"] == int((d > 0).sum())
        assert r["extra_s"] >= 0
    assert lv["knn"]["models"] == ["t_lr", "t_mlp", "t_knn"] and lv["seeds"]["models"] == ["t_lr", "t_mlp_seeds"]
    # the seeds row costs the two-seed model's recorded training less one seed's share (the
    # single-seed model it replaces was timed in another run, maybe on a busier machine)
    folds = load_folds(load_competition(load_config("tiny").data))
    seeded = train_seconds("tiny", "t_mlp_seeds", folds)
    assert lv["seeds"]["train_s"] == pytest.approx(seeded / 2, abs=0.051) and seeded > 0
    assert lv["ids"]["models"] == ["t_lr", "t_mlp", "t_id"] and lv["ids"]["note"].startswith("blend.method logistic;")
    assert "delta_vs_method" in lv["ids"]  # two changes at once: the member's own share is given too
    assert lv["all"]["models"] == ["t_lr", "t_mlp_seeds", "t_knn", "t_id"]
    assert lv["all"]["note"] == "decoder expected_f1, blend.method logistic"
    # the plain and expected-F1 rows are exactly the nested CV `make blend` reports for those settings
    cfg = load_config("tiny")
    cfg.blend.n_trials, cfg.blend.method = 3, "optuna"  # the plain blend is Optuna + thresholds
    comp = load_competition(cfg.data)
    oofs = load_oofs("tiny", ["t_lr", "t_mlp"], comp, load_folds(comp), with_test=False)
    for name, over in (("plain", {}), ("expected_f1", {"decoder": "expected_f1"})):
        for k, v in over.items():
            setattr(cfg.blend, k, v)
        cv = nested_cv(oofs.P, comp.y(), oofs.folds, lambda k: build_blender(cfg.blend, "samples"),
                       lambda: build_decoder(cfg.blend, "samples"))
        np.testing.assert_allclose(lv[name]["per_fold"], cv.per_fold, atol=1e-5)
    ids = load_oofs("tiny", ["t_lr", "t_mlp", "t_id"], comp, load_folds(comp), with_test=False)
    cfg = load_config("tiny")  # levers decide by thresholds (tiny's decoder) and blend by levers.method
    cfg.blend.method = "logistic"
    cv = nested_cv(ids.P, comp.y(), ids.folds, lambda k: build_blender(cfg.blend, "samples"),
                   lambda: build_decoder(cfg.blend, "samples"))
    np.testing.assert_allclose(lv["ids"]["per_fold"], cv.per_fold, atol=1e-5)
    assert "| knn |" in out.with_suffix(".md").read_text()


def test_a_lever_never_adds_a_model_the_plain_blend_has(levered: Path) -> None:
    """t_knn already in the plain blend: the knn lever has nothing to add (it would only
    duplicate a column), and says so instead of measuring the duplicate."""
    assert main(["train", "--data", "tiny", "--model", "t_knn"]) == 0
    out = levered / "lv"
    assert main(["levers", "--data", "tiny", "--models", "t_lr", "t_knn", "--levers", "plain", "knn",
                 "--out", str(out)]) == 0
    lv = json.loads(out.with_suffix(".json").read_text())["datasets"]["tiny"]["levers"]
    assert "beyond the plain blend's" in lv["knn"]["skipped"]


def test_unknown_levers_and_untrained_models_are_refused_before_anything_runs(levered: Path, capsys) -> None:
    assert main(["levers", "--data", "tiny", "--models", "t_lr", "--levers", "nope"]) != 0
    assert "unknown lever 'nope'" in capsys.readouterr().err
    assert main(["levers", "--data", "tiny", "--models", "t_lr", "t_knn", "--levers", "plain"]) != 0
    assert "not collected" in capsys.readouterr().err
    assert not (levered / "docs" / "bench" / "levers.json").exists()
    assert not (levered / "reports" / "tiny" / "levers.json").exists()


def test_a_partial_rerun_keeps_the_other_levers_of_the_same_plain_blend() -> None:
    from mmfold.studies.levers import merged

    plain = {"per_fold": [0.5, 0.6], "cv": 0.55}
    old = {"models": ["a"], "rows": 10, "folds": 2, "levers": {"plain": plain, "knn": {"cv": 0.6}}}
    new = {"models": ["a"], "rows": 10, "folds": 2, "levers": {"plain": plain, "stack_lgbm_all": {"cv": 0.5}}}
    assert list(merged(old, new)["levers"]) == ["plain", "stack_lgbm_all", "knn"]  # table order, whoever ran last
    other = {**new, "models": ["a", "b"]}  # another plain blend: the old rows are not comparable
    assert set(merged(old, other)["levers"]) == {"plain", "stack_lgbm_all"}
    moved = {**new, "levers": {"plain": {"per_fold": [0.5, 0.61]}}}
    assert set(merged(old, moved)["levers"]) == {"plain"}
    assert merged(None, new) == new


def test_levers_write_the_datasets_own_report_and_never_the_tracked_bench(levered: Path, capsys) -> None:
    """A competition of one's own used to land in the committed docs/bench/levers.{json,md}."""
    assert main(["levers", "--data", "tiny", "--models", "t_lr", "--levers", "plain"]) == 0
    doc = json.loads((levered / "reports" / "tiny" / "levers.json").read_text())
    assert list(doc["datasets"]) == ["tiny"] and "plain" in doc["datasets"]["tiny"]["levers"]
    assert "| plain |" in (levered / "reports" / "tiny" / "levers.md").read_text()
    assert not (levered / "docs").exists()
    capsys.readouterr()
    # --bench (make bench-levers) writes docs/bench: a dataset that is not shipped is refused,
    # by name or as a YAML given by path (even one keyed like a shipped dataset), before any work
    yml = levered / "elsewhere" / "demo.yaml"
    yml.parent.mkdir()
    yml.write_text((levered / "configs" / "data" / "demo.yaml").read_text())
    for data in ("tiny", str(yml)):
        assert main(["levers", "--bench", "--data", data, "--models", "t_lr", "--levers", "plain"]) == 2
        err = capsys.readouterr().err
        assert "shipped with mmfold (demo, comp5329, coco_mini, fashion)" in err, err
        assert "make levers DATA=" in err and "reports" in err
    assert not (levered / "docs").exists()
    with pytest.raises(SystemExit):  # one place or the other
        main(["levers", "--bench", "--out", "x", "--data", "tiny"])


def test_levers_under_another_metric_skip_what_does_not_apply_and_run_the_rest(
        project: Path, demo_template: Path) -> None:
    """demo submits with expected-F1 decoding; with data.metric=micro `make levers` stopped at
    the samples-only decoders. Now those rows are skipped with the reason, every other lever
    runs, and `all` decides by per-label thresholds, saying why. ``--bench`` on a shipped
    dataset writes the tracked docs/bench table (and nothing under reports/)."""
    install_demo(project, demo_template)
    for name in ("t_lr", "t_knn"):
        (project / "configs" / "models" / f"{name}.yaml").write_text(yaml.safe_dump(MODELS[name]))
    micro = ["data.metric=micro", "blend.decoder=thresholds"]  # what training under micro takes on demo
    assert main(["train", *micro, "--model", "t_lr"]) == 0
    args = ["levers", "data.metric=micro", "levers.knn=[t_knn]", "levers.n_trials=3", "--bench",
            "--models", "t_lr", "--levers", "plain", "knn", "all"]
    assert main(args) == 0
    out = project / "docs" / "bench" / "levers"
    d = json.loads(out.with_suffix(".json").read_text())["datasets"]["demo"]
    lv = d["levers"]
    assert d["metric"] == "micro"
    for name in ("expected_f1", "expected_f1_isotonic", "gfm"):
        assert lv[name] == {"skipped": "maximises samples-F1, the metric is micro-F1: not run"}
    for name in ("plain", "knn", "all"):
        assert {"cv", "delta", "per_fold"} <= set(lv[name]), name
    assert lv["knn"]["models"] == ["t_lr", "t_knn"] and lv["all"]["models"] == ["t_lr", "t_knn"]
    assert lv["all"]["note"].startswith("decoder thresholds (levers.decoder expected_f1 maximises samples-F1")
    # the plain row is the micro-F1 nested CV of Optuna + per-label thresholds
    cfg = load_config("demo", None, micro + ["blend.n_trials=3"])
    comp = load_competition(cfg.data)
    oofs = load_oofs("demo", ["t_lr"], comp, load_folds(comp), with_test=False)
    cv = nested_cv(oofs.P, comp.y(), oofs.folds, lambda k: build_blender(cfg.blend, "micro"),
                   lambda: build_decoder(cfg.blend, "micro"), "micro")
    np.testing.assert_allclose(lv["plain"]["per_fold"], cv.per_fold, atol=1e-5)
    md = out.with_suffix(".md").read_text()
    assert "| gfm | skipped | | | | | maximises samples-F1, the metric is micro-F1: not run |" in md
    assert "micro-F1; plain blend of t_lr" in md
    assert not (project / "reports" / "demo" / "levers.json").exists()
