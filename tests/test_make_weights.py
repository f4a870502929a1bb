"""``make weights DATA=x MODEL=a,b``: every weight the run's configs name, fetched through
huggingface_hub's own client from a stand-in hub on the loopback address into a cache in the
hub's layout; then training reads it offline, and a missing weight stops a run before any fold.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmfold import hub
from mmfold.config import load_config
from mmfold.train.needs import check_weights, missing
from tests.hubcache import folder_files
from tests.hubserver import Hub, HubServer, Repo
from tests.tiny import make_tiny_bert

MODELS = {
    "img": {"kind": "image", "params": {"backbone": "test_efficientnet", "hidden": 0}},
    "txt": {"kind": "text", "params": {"text_model": "org/tiny-bert", "pooling": "mean", "hidden": 0}},
    "emb": {"kind": "frozen_embed", "params": {"encoders": ["hf:org/tiny-bert"], "head": "logreg"}},
}


def timm_files() -> dict[str, bytes]:
    """What the hub's ``timm/test_efficientnet.r160_in1k`` holds: weights with classifier."""
    import timm
    import torch
    from safetensors.torch import save

    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in timm.create_model("test_efficientnet", pretrained=False).state_dict().items()}
    return {"model.safetensors": save(sd), "config.json": b'{"architecture": "test_efficientnet"}'}


@pytest.fixture
def run_project(tiny: Path, tmp_path: Path) -> Path:
    """The tiny competition with three models that name hub weights."""
    root = tiny.parents[1]
    for name, model in MODELS.items():
        (root / "configs" / "models" / f"{name}.yaml").write_text(yaml.safe_dump({"model": model}))
    return root


def mmfold(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``python -m mmfold ...`` in ``root`` with ``env`` added."""
    return subprocess.run([sys.executable, "-m", "mmfold", *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "MMFOLD_HOME": str(root), **env}, timeout=300)


def test_make_weights_fetches_what_the_run_names_then_training_needs_no_network(
        run_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bert = Repo(folder_files(make_tiny_bert(tmp_path / "bert")))
    stand_in = Hub({"org/tiny-bert": bert, "timm/test_efficientnet.r160_in1k": Repo(timm_files())})
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cfgs = [load_config("tiny", m) for m in MODELS]
    assert set(missing(cfgs)) == set(MODELS)
    before = sorted(p for p in run_project.rglob("*") if "hf" not in p.parts)
    with HubServer(stand_in) as url:
        out = mmfold(run_project, {"HF_ENDPOINT": url, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_XET": "1"},
                     "weights", "--data", "tiny", "--model", "img,txt,emb", "--no-packages")
    assert out.returncode == 0, out.stderr
    assert "org/tiny-bert" in out.stdout and "timm/test_efficientnet.r160_in1k" in out.stdout
    assert sorted(p for p in run_project.rglob("*") if "hf" not in p.parts) == before  # wrote nothing else
    assert ("GET", "/timm/test_efficientnet.r160_in1k/resolve/main/model.safetensors") in stand_in.requests
    assert (cache / "models--org--tiny-bert" / "refs" / "main").read_text() == bert.commit
    assert missing(cfgs) == {}
    found = hub.find(hub.folder_need("org/tiny-bert"))
    assert found.revision == bert.commit and (found.path / "tokenizer.json").is_file()
    check_weights(cfgs, "tiny")  # offline from here on: nothing missing


def test_a_missing_repo_on_the_hub_is_one_clear_line(run_project: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hf" / "hub"
    with HubServer(Hub()) as url:
        out = mmfold(run_project, {"HF_ENDPOINT": url, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_XET": "1"},
                     "weights", "--data", "tiny", "--model", "txt", "--no-packages")
    assert out.returncode == 2
    assert "org/tiny-bert" in out.stderr and "Traceback" not in out.stderr


def test_a_run_with_missing_weights_stops_before_any_fold_names_them_all(run_project: Path, tmp_path: Path) -> None:
    env = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    out = mmfold(run_project, env, "folds", "--data", "tiny")
    assert out.returncode == 0, out.stderr
    out = mmfold(run_project, env, "train", "--data", "tiny", "--model", "img,txt,emb")
    assert out.returncode == 2
    err = out.stderr
    assert "timm/test_efficientnet.r160_in1k" in err and "org/tiny-bert" in err
    assert "make weights DATA=tiny MODEL=img,txt,emb" in err
    assert not (run_project / "runs").exists() or not any((run_project / "runs").rglob("*"))


@pytest.mark.slow
def test_a_bundle_carries_its_hub_weights_and_predicts_with_an_empty_cache_offline(
        tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch text model and frozen encoders named by repo id (a sentence encoder, and a timm
    model that is a hub repo): the bundle copies what they read while predicting into its own
    hub cache and predicts with HF_HUB_OFFLINE=1 and an empty user cache, the same submission
    as the project's blend."""
    import shutil

    import pandas as pd

    from mmfold import paths
    from mmfold.cli import main
    from tests.hubcache import add_snapshot, add_timm_folder

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    add_snapshot(cache, "org/tiny-bert", folder_files(make_tiny_bert(tmp_path / "bert")))
    add_timm_folder(cache, "acme/tiny-resnet")
    root = paths.root()
    txt = {"kind": "text", "params": {"text_model": "org/tiny-bert", "pooling": "mean", "hidden": 0, "dropout": 0.0}}
    (root / "configs" / "models" / "txt.yaml").write_text(yaml.safe_dump(
        {"model": txt, "train": {"epochs": 1, "batch_size": 16, "max_len": 16, "progress": False}}))
    (root / "configs" / "models" / "emb.yaml").write_text(yaml.safe_dump({"model": MODELS["emb"]}))
    timm_enc = "timm:hf-hub:acme/tiny-resnet"
    img = {"kind": "frozen_embed", "params": {"encoders": [timm_enc], "head": "logreg",
                                              "encoder_settings": {timm_enc: {"image_size": 32}}}}
    (root / "configs" / "models" / "img_emb.yaml").write_text(yaml.safe_dump({"model": img}))
    assert main(["folds", "--data", "tiny"]) == 0
    assert main(["train", "--data", "tiny", "--model", "txt,emb,img_emb"]) == 0
    assert main(["blend", "--data", "tiny", "--name", "b", "--models", "txt,emb,img_emb", "blend.n_trials=2"]) == 0
    assert main(["export", "--data", "tiny", "--name", "b", "--out", str(root / "bundle")]) == 0
    bundle = Path(shutil.move(str(root / "bundle"), tmp_path / "elsewhere" / "bundle"))
    assert (bundle / "hub" / "models--org--tiny-bert" / "refs" / "main").is_file()
    assert (bundle / "hub" / "models--acme--tiny-resnet" / "refs" / "main").is_file()
    env = {k: v for k, v in os.environ.items() if k not in ("MMFOLD_HOME", "PYTHONPATH")}
    env.update(HF_HUB_CACHE=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(bundle / "predict.py"), "--test", str(tiny / "test.csv"),
                          "--out", str(tmp_path / "sub.csv")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    ours = sorted(paths.submissions_dir("tiny").glob("b*.csv"))[0]
    assert pd.read_csv(tmp_path / "sub.csv").equals(pd.read_csv(ours))


def test_a_torch_fold_says_what_it_loaded_and_records_it(
        tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import json

    from mmfold import paths
    from mmfold.cli import main
    from tests.hubcache import add_timm_model

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit, _ = add_timm_model(cache, "test_efficientnet.r160_in1k")
    img = {"model": MODELS["img"], "train": {"epochs": 1, "batch_size": 16, "image_size": 32, "progress": False}}
    (paths.root() / "configs" / "models" / "img.yaml").write_text(yaml.safe_dump(img))
    assert main(["folds", "--data", "tiny"]) == 0
    assert main(["train", "--data", "tiny", "--model", "img"]) == 0
    out = capsys.readouterr().out
    line = (f"img fold 0: image backbone test_efficientnet: hub timm/test_efficientnet.r160_in1k@{commit[:8]} "
            "(model.safetensors), ")
    assert line in out and "tensors loaded, 0 left at init" in out
    done = json.loads((paths.run_dir("tiny", "img", 2) / "done.json").read_text())
    assert [(w["repo_id"], w["revision"], w["file"]) for w in done["weights"]] == [
        ("timm/test_efficientnet.r160_in1k", commit, "model.safetensors")]
    assert json.loads(paths.oof_meta_file("tiny", "img").read_text())["weights"] == done["weights"]
