"""Multi-seed members (``train.seeds``): a fold is the mean of its seeds, each seed resumes on
its own, a new test set is predicted from every seed's saved model, and a head with nothing
to seed is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmfold import paths
from mmfold.config import load_config
from mmfold.data.competition import load_competition, load_folds
from mmfold.errors import UserError
from mmfold.train import seeds as seeds_mod
from mmfold.train.predict import predict_model, trained_config
from mmfold.train.runner import train_model

@pytest.fixture(autouse=True)
def folded(tiny: Path) -> Path:
    """The tiny competition with its folds written."""
    from mmfold.cli import main

    assert main(["folds", "--data", "tiny"]) == 0
    return tiny


MLP = {"min_df": 1, "head": "mlp", "head_params": {"epochs": 2, "hidden": 8}}


def _cfg(params: dict, name: str, seeds: list[int] | None = None, seed_in_head: int | None = None):
    cfg = load_config("tiny")
    cfg.model.name, cfg.model.kind = name, "tfidf_linear"
    cfg.model.params = {**params, "head_params": {**params.get("head_params", {}),
                                                  **({} if seed_in_head is None else {"seed": seed_in_head})}}
    cfg.train.seeds = list(seeds or [])
    return cfg


def _oof(name: str) -> np.ndarray:
    df = pd.read_parquet(paths.oof_file("tiny", name))
    return df.drop(columns=[c for c in df.columns if c in ("id", "fold")]).to_numpy(np.float64)


def test_a_seeded_fold_is_the_mean_of_its_seeds_trained_alone(tiny: Path) -> None:
    comp = load_competition(load_config("tiny").data)
    train_model(_cfg(MLP, "multi", [3, 7]), comp)
    train_model(_cfg(MLP, "s3", seed_in_head=3), comp)
    train_model(_cfg(MLP, "s7", seed_in_head=7), comp)
    mean = (_oof("s3").astype(np.float32).astype(np.float64) + _oof("s7").astype(np.float32)) / 2
    np.testing.assert_allclose(_oof("multi"), mean, atol=1e-6)
    assert not np.allclose(_oof("s3"), _oof("s7"))  # the seeds really differ
    assert (paths.run_dir("tiny", "multi", 0) / "seed7" / seeds_mod.SEED_DONE).exists()


def test_a_killed_seeded_fold_resumes_at_its_unfinished_seed(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    comp = load_competition(load_config("tiny").data)
    cfg = _cfg(MLP, "multi", [1, 2])
    real = seeds_mod.run_seeds.__globals__["_save"]
    calls: list[int] = []

    def dies_after_first(sub: Path, seed: int, key: str, out) -> None:
        real(sub, seed, key, out)
        calls.append(seed)
        if seed == 2 and len(calls) == 2:
            raise SystemExit(137)  # killed after seed 2 of fold 0 finished, before done.json

    monkeypatch.setitem(seeds_mod.run_seeds.__globals__, "_save", dies_after_first)
    with pytest.raises(SystemExit):
        train_model(cfg, comp, folds=[0])
    assert not (paths.run_dir("tiny", "multi", 0) / "done.json").exists()
    calls.clear()
    train_model(cfg, comp, folds=[0])
    assert calls == []  # both seeds reloaded, none retrained
    monkeypatch.setitem(seeds_mod.run_seeds.__globals__, "_save", real)
    uninterrupted = _cfg(MLP, "again", [1, 2])
    train_model(uninterrupted, comp, folds=[0])
    a = pd.read_parquet(paths.run_dir("tiny", "multi", 0) / "oof.parquet")
    b = pd.read_parquet(paths.run_dir("tiny", "again", 0) / "oof.parquet")
    pd.testing.assert_frame_equal(a, b)


def test_a_seeded_member_predicts_a_new_test_set_as_in_training(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    comp = load_competition(load_config("tiny").data)
    train_model(_cfg(MLP, "multi", [0, 1]), comp)
    trained = pd.read_parquet(paths.oof_dir("tiny") / "multi.test.parquet")
    test = pd.read_csv(tiny / "test.csv")
    test.iloc[::-1].to_csv(tiny / "new_test.csv", index=False)
    cfg = load_config("tiny", None, [f"data.test_csv={tiny / 'new_test.csv'}"])
    comp2 = load_competition(cfg.data)
    from mmfold.cpu import members

    monkeypatch.setattr(members.MemberModel, "fit", lambda *a: pytest.fail("a stored member was refitted"))
    monkeypatch.setattr("mmfold.train.predict.load_config", lambda *a, **k: _cfg(MLP, "multi", [0, 1]))
    model_cfg, infos = trained_config(cfg, comp2, "multi", len(np.unique(load_folds(comp2))))
    predict_model(model_cfg, comp2, infos)
    new = pd.read_parquet(paths.oof_dir("tiny") / "multi.test.parquet")
    cols = [c for c in trained.columns if c != "id"]
    np.testing.assert_array_equal(new.set_index("id").loc[trained["id"], cols].to_numpy(), trained[cols].to_numpy())


def test_seeds_of_a_deterministic_head_or_a_repeated_seed_are_refused(tiny: Path) -> None:
    comp = load_competition(load_config("tiny").data)
    with pytest.raises(UserError, match="head without a seed"):
        train_model(_cfg({"min_df": 1}, "lr", [0, 1]), comp)
    with pytest.raises(UserError, match="lists a seed twice"):
        train_model(_cfg(MLP, "mlp", [0, 0]), comp)
    assert not paths.run_dir("tiny", "lr", 0).exists()


def test_a_finished_seed_trained_otherwise_is_trained_again(tiny: Path, capsys) -> None:
    """Resume reuses a seed only if settings, train side and test set still match."""
    comp = load_competition(load_config("tiny").data)
    folds = load_folds(comp)
    calls: list[int] = []

    def runner(cfg, c, f, k, rd):
        calls.append(cfg.train.seed)
        from mmfold.train.fold import FoldOutput

        n_va, L = int((f == k).sum()), len(c.classes)
        return FoldOutput(np.full((n_va, L), 0.5, np.float32), np.full((len(c.test), L), 0.5, np.float32),
                          {"train_time_s": 1.0})

    rd = paths.run_dir("tiny", "multi", 0)
    seeds_mod.run_seeds(runner, _cfg(MLP, "multi", [1, 2]), comp, folds, 0, rd)
    seeds_mod.run_seeds(runner, _cfg(MLP, "multi", [1, 2]), comp, folds, 0, rd)
    assert calls == [1, 2]  # the second run reused both
    other = _cfg({**MLP, "head_params": {"epochs": 3, "hidden": 8}}, "multi", [1, 2])
    seeds_mod.run_seeds(runner, other, comp, folds, 0, rd)
    assert calls == [1, 2, 1, 2] and "training this seed again" in capsys.readouterr().out


def test_a_student_with_seeds_is_refused_before_any_fold_moves(tiny: Path, project: Path) -> None:
    import yaml

    (project / "configs" / "models" / "b.yaml").write_text(yaml.safe_dump({"model": {"kind": "tfidf_linear", "params": MLP}}))
    cfg = load_config("tiny")
    cfg.model.name, cfg.model.kind = "s", "student"
    cfg.model.params = {"base": "b", "teachers": ["b"]}
    cfg.train.seeds = [0, 1]
    with pytest.raises(UserError, match="is a student"):
        train_model(cfg, load_competition(cfg.data), force=True)


def test_a_blend_with_a_seeded_member_exports_and_its_bundle_predicts_the_same_submission(
        tiny: Path, project: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every seed's fitted state travels in the bundle, which averages the seeds as training
    did: the member's probabilities are exactly the collected ones (one seed alone would not
    be), and on the blend's own test set the submission is byte-identical to the blend's."""
    import json
    import shutil

    import yaml

    from mmfold import bundle as bundle_mod
    from mmfold.cli import main
    from mmfold.data.competition import load_test_set
    from tests.test_predict import _run_bundle

    body = {"model": {"kind": "tfidf_linear", "params": MLP}, "train": {"seeds": [0, 1]}}
    (project / "configs" / "models" / "t_seeded.yaml").write_text(yaml.safe_dump(body))
    (project / "configs" / "models" / "t_lr.yaml").write_text(
        yaml.safe_dump({"model": {"kind": "tfidf_linear", "params": {"min_df": 1}}}))
    assert main(["train", "--data", "tiny", "--model", "t_seeded,t_lr"]) == 0
    assert main(["blend", "--data", "tiny", "--name", "b", "--models", "t_seeded", "t_lr", "blend.n_trials=3"]) == 0
    assert main(["export", "--data", "tiny", "--name", "b", "--out", str(project / "bundle")]) == 0
    fresh = tmp_path_factory.mktemp("elsewhere")
    bundle = Path(shutil.move(str(project / "bundle"), fresh / "bundle"))
    assert (bundle / "runs" / "tiny" / "t_seeded" / "fold0" / "seed1" / "member.skops").exists()
    _run_bundle(bundle, tiny / "test.csv", fresh / "sub.csv")
    assert (fresh / "sub.csv").read_bytes() == (paths.submissions_dir("tiny") / "b.csv").read_bytes()
    collected = pd.read_parquet(paths.oof_dir("tiny") / "t_seeded.test.parquet").set_index("id")
    monkeypatch.setenv("MMFOLD_HOME", str(bundle))
    monkeypatch.setenv("MMFOLD_CACHE", str(fresh / "cache"))
    cfg = load_config("tiny", None, bundle_mod.data_overrides(tiny / "test.csv", None, None))
    classes = json.loads(paths.labels_file("tiny").read_text())["classes"]
    comp = load_test_set(cfg.data, classes)
    probs = bundle_mod.member_probs("t_seeded", cfg.data, comp, "tiny")
    np.testing.assert_array_equal(probs, collected.loc[comp.ids("test"), [str(c) for c in classes]].to_numpy(np.float64))
