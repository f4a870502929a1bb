"""Frozen lower layers computed once and cached (``train_blocks`` / ``train_layers``), and
folds trained side by side (``mmfold train --jobs``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfold.config import Config, ConfigError, load_config
from mmfold.data.competition import load_competition
from mmfold.models import build_model
from mmfold.train.loop import train_fold
from mmfold.train.optim import seed_everything
from mmfold.train.prefix_cache import flip_probability, weights_digest
from tests.conftest import write_competition
from tests.test_engine import _InterruptAt, same_weights
from tests.tiny import make_tiny_bert, make_tiny_mpnet, tiny_params

N_TRAIN = 36
SPLIT = {"backbone": "test_efficientnet", "pretrained": False, "train_blocks": 2, "train_layers": 1}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny_bert")


@pytest.fixture
def comp(project: Path):
    write_competition(project, n_train=N_TRAIN, n_test=8, n_labels=4)
    return load_competition(load_config("tiny").data, use_saved=False)


def fusion_cfg(bert_dir: Path, *overrides: str, kind: str = "fusion", **params: object) -> Config:
    """A tiny fusion whose image and text sides both train only their top part."""
    base = ["train.epochs=2", "train.threads=1", "train.batch_size=8", "train.image_size=32",
            "train.progress=false", "train.lr=0.01", "train.backbone_lr_mult=1.0", "train.tta=true",
            "train.augment=[{name: HorizontalFlip, p: 0.5}]"]
    cfg = load_config("tiny", None, base + list(overrides))
    cfg.model.kind, cfg.model.name = kind, f"split_{kind}"
    cfg.model.params = {**tiny_params(kind, bert_dir), **SPLIT, **params}
    return cfg


def model_cfg(bert_dir: Path, kind: str = "fusion", **params: object) -> Config:
    """The same model without a competition (for tests of the model alone)."""
    cfg = Config()
    cfg.model.kind = kind
    cfg.model.params = {**tiny_params(kind, bert_dir), **SPLIT, **params}
    cfg.train.image_size = 32
    return cfg


def folds() -> np.ndarray:
    return np.arange(N_TRAIN) % 3


# ------------------------------------------------------------------ the split is exact


def test_image_prefix_then_rest_equals_the_whole_backbone(bert_dir: Path) -> None:
    model = build_model(model_cfg(bert_dir), ["a", "b"]).eval()
    enc = model.encoder("image")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.features_of({"image_feats": enc.prefix(x)}), enc.features(x))
    # the halves are views of the backbone: the state dict is the one without a cut
    plain = build_model(model_cfg(bert_dir, train_blocks=None, train_layers=None), ["a", "b"])
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_text_prefix_equals_the_models_own_hidden_state(bert_dir: Path) -> None:
    model = build_model(model_cfg(bert_dir), ["a", "b"]).eval()
    enc = model.encoder("text")
    ids = torch.randint(5, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        states = enc.prefix(ids, mask)
        hidden = enc.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        real = mask.bool()
        torch.testing.assert_close(states[real], hidden[real])
        batch = {"input_ids": ids, "attention_mask": mask, "text_states": states}
        torch.testing.assert_close(enc.tokens_of(batch)[real], enc.tokens(ids, mask)[real])


@pytest.mark.parametrize("train_layers", [0, 1, 2, 3])
def test_mpnet_prefix_and_top_layers_equal_the_whole_model(tmp_path: Path, train_layers: int) -> None:
    """MPNet hands every layer one relative position bias: the cached split must too, and
    that bias freezes with the prefix that used it."""
    from mmfold import hub
    from mmfold.models.text import HFTextEncoder

    folder = make_tiny_mpnet(tmp_path / "mpnet")
    enc = HFTextEncoder(hub.local(str(folder), folder), "mean", train_layers).eval()
    ids = torch.randint(5, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        states = enc.prefix(ids, mask)
        whole = enc.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        real = mask.bool()
        torch.testing.assert_close(states[real], whole.hidden_states[3 - train_layers][real])
        batch = {"input_ids": ids, "attention_mask": mask, "text_states": states}
        torch.testing.assert_close(enc.tokens_of(batch)[real], whole.last_hidden_state[real])
    bias = enc.model.encoder.relative_attention_bias.weight
    assert any(p is bias for p in enc.prefix.parameters())


def test_prefix_stays_frozen_when_the_backbone_thaws(bert_dir: Path) -> None:
    model = build_model(model_cfg(bert_dir), ["a", "b"])
    model.set_backbone_trainable(True)
    frozen = {id(p) for prefix in model.frozen_prefixes().values() for p in prefix.parameters()}
    assert frozen and all(not p.requires_grad for p in model.parameters() if id(p) in frozen)
    rest = [p for p in model.backbone_parameters() if id(p) not in frozen]
    assert rest and all(p.requires_grad for p in rest)
    assert model.param_counts()[0] == sum(p.numel() for p in model.parameters() if id(p) not in frozen)


@pytest.mark.parametrize("bad", [{"train_blocks": 9}, {"train_layers": 3}, {"train_blocks": -1},
                                 {"backbone": "test_resnet"}])
def test_a_split_out_of_range_or_unsupported_is_a_config_error(bert_dir: Path, bad: dict) -> None:
    with pytest.raises(ConfigError, match="train_blocks|train_layers"):
        build_model(model_cfg(bert_dir, **bad), ["a", "b"])


def test_train_layers_on_the_bilstm_is_refused() -> None:
    cfg = Config()
    cfg.model.kind = "lstm_text"
    cfg.model.params = {**tiny_params("lstm_text"), "train_layers": 1}
    with pytest.raises(ConfigError, match="BiLSTM"):
        build_model(cfg, ["a"])


def test_only_a_flip_survives_a_cached_image_prefix(comp, bert_dir: Path) -> None:
    from mmfold.train.runner import validate_model

    assert flip_probability([{"name": "HorizontalFlip", "p": 0.3}]) == 0.3
    assert flip_probability([]) == 0.0
    with pytest.raises(ConfigError, match="RandomBrightnessContrast"):
        flip_probability([{"name": "HorizontalFlip"}, {"name": "RandomBrightnessContrast"}])
    jitter = fusion_cfg(bert_dir, "train.augment=[{name: RandomBrightnessContrast, p: 0.5}]")
    with pytest.raises(ConfigError, match="train_blocks"):
        validate_model(jitter)  # refused before any fold is touched


# ------------------------------------------------------------- training on cached prefixes


def test_training_moves_only_the_top_and_builds_each_cache_once(comp, bert_dir: Path, project: Path) -> None:
    cfg = fusion_cfg(bert_dir)
    seed_everything(cfg.train.seed, deterministic=True)
    start = build_model(cfg, comp.classes)  # the engine's initial weights (same seed, same order)
    before = {n: p.detach().clone() for n, p in start.state_dict().items()}
    out = train_fold(cfg, comp, folds(), 0, project / "runs" / "f0")
    after = torch.load(project / "runs" / "f0" / "last.pt", weights_only=True)["model"]
    prefixes = start.frozen_prefixes()
    names = {id(p): n for n, p in start.named_parameters()}
    frozen_names = {names[id(p)] for prefix in prefixes.values() for p in prefix.parameters()}
    assert all(torch.equal(after[n], before[n]) for n in frozen_names)
    top = [n for n in before if n.startswith("backbone.") and n not in frozen_names and "weight" in n]
    assert sum(not torch.equal(after[n], before[n]) for n in top) > 0.8 * len(top)
    caches = sorted((project / "cache" / "tiny").glob("prefix_*.f16"))
    assert {"_".join(c.name.split("_")[1:4]) for c in caches} == {
        "image_feats_train", "image_feats_test", "text_states_train", "text_states_test"}
    stamps = {c: c.stat().st_mtime_ns for c in caches}
    train_fold(cfg, comp, folds(), 1, project / "runs" / "f1")  # another fold reads the same files
    assert {c: c.stat().st_mtime_ns for c in caches} == stamps
    assert sorted((project / "cache" / "tiny").glob("prefix_*.f16")) == caches
    assert out.oof.shape == (12, 4) and out.test.shape == (8, 4) and "wall_s" in out.info


def test_cache_is_keyed_by_the_prefix_weights(bert_dir: Path) -> None:
    model = build_model(model_cfg(bert_dir), ["a", "b"])
    prefix = model.frozen_prefixes()["image_feats"]
    digest = weights_digest(prefix)
    with torch.no_grad():
        next(prefix.parameters()).add_(1e-3)
    assert weights_digest(prefix) != digest


def test_resume_with_cached_prefixes_equals_an_uninterrupted_run(comp, bert_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import mmfold.train.losses

    cfg = ("train.ema=0.9", "train.accum_steps=2")
    whole = train_fold(fusion_cfg(bert_dir, *cfg, kind="hybrid"), comp, folds(), 0, tmp_path / "whole")
    real = mmfold.train.losses.build_loss
    monkeypatch.setattr(mmfold.train.losses, "build_loss", lambda *a: _InterruptAt(real(*a), 3))
    with pytest.raises(KeyboardInterrupt):
        train_fold(fusion_cfg(bert_dir, *cfg, kind="hybrid"), comp, folds(), 0, tmp_path / "split")
    monkeypatch.setattr(mmfold.train.losses, "build_loss", real)
    resumed = train_fold(fusion_cfg(bert_dir, *cfg, kind="hybrid"), comp, folds(), 0, tmp_path / "split")
    assert same_weights(tmp_path / "whole" / "last.pt", tmp_path / "split" / "last.pt")
    np.testing.assert_array_equal(whole.oof, resumed.oof)
    np.testing.assert_array_equal(whole.test, resumed.test)


def test_flip_views_are_both_used(comp, bert_dir: Path, tmp_path: Path) -> None:
    """Training draws the flipped view for some rows; flip TTA averages the two views."""
    from mmfold.train.batches import FoldDataset

    feats = {"image_feats": np.stack([np.zeros((10, 2, 1, 1)), np.ones((10, 2, 1, 1))], axis=1)}
    train = FoldDataset(np.arange(10), feats=feats, y=np.zeros((10, 1)), flip_p=0.5, seed=3)
    drawn = train.__getitems__(list(range(10)))["image_feats"][:, 0, 0, 0]
    assert 0 < drawn.sum() < 10  # some rows flipped, some not
    valid = FoldDataset(np.arange(10), feats=feats, y=np.zeros((10, 1)))
    assert valid.__getitems__([0, 1])["image_feats"].shape == (2, 2, 2, 1, 1)
    unflipped = FoldDataset(np.arange(10), feats=feats, y=np.zeros((10, 1)), flip_p=0.0)
    assert unflipped.__getitems__(list(range(10)))["image_feats"][:, 0, 0, 0].sum() == 0  # training, no flip: view 0
    no_flip = train_fold(fusion_cfg(bert_dir, "train.augment=[]"), comp, folds(), 0, tmp_path / "c")
    assert np.isfinite(no_flip.oof).all()
    no_tta = train_fold(fusion_cfg(bert_dir, "train.tta=false"), comp, folds(), 0, tmp_path / "a")
    tta = train_fold(fusion_cfg(bert_dir), comp, folds(), 0, tmp_path / "b")
    assert not np.array_equal(no_tta.oof, tta.oof)


# ------------------------------------------------------------------ folds side by side


def test_jobs_train_every_fold_once_and_collect(comp, bert_dir: Path, project: Path) -> None:
    from mmfold.artifacts.predictions import read_oof
    from mmfold.train.runner import core_groups, train_parallel

    from mmfold.cli import main

    assert main(["folds", "--data", "tiny"]) == 0
    cfg = fusion_cfg(bert_dir, "train.epochs=1")
    train_parallel([cfg], comp, jobs=2)
    done = [json.loads((project / "runs" / "tiny" / cfg.model.name / f"fold{k}" / "done.json").read_text())
            for k in range(3)]
    assert [d["fold"] for d in done] == [0, 1, 2]
    oof = read_oof("tiny", cfg.model.name, comp.train["id"].tolist(), comp.classes, folds=_saved_folds(comp))
    assert oof.shape == (N_TRAIN, 4)
    groups = core_groups(8)
    assert sorted(c for g in groups for c in g) == sorted({c for g in groups for c in g})  # disjoint
    assert all(groups) and len(groups) <= 8


def _saved_folds(comp) -> np.ndarray:
    from mmfold.data.competition import load_folds

    return load_folds(comp)


def test_channels_last_computes_what_nchw_does(comp, bert_dir: Path, tmp_path: Path) -> None:
    """NHWC is a speed setting: the same weights give the same outputs (to float rounding) on
    cached features in either layout, and a fold trains and predicts with it end to end."""
    import copy

    from mmfold.train.loop import image_views

    model = build_model(model_cfg(bert_dir, kind="hybrid"), ["a", "b"]).eval()
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    enc = model.encoder("image")
    ids = torch.randint(5, 50, (3, 6))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        both = torch.stack([enc.prefix(torch.randn(3, 3, 32, 32)) for _ in range(2)], dim=1)
        x["text_states"] = model.encoder("text").prefix(ids, x["attention_mask"])
        a = [model(v) for v in image_views({**x, "image_feats": both}, tta=True)]
        b = [nhwc(v) for v in image_views({**x, "image_feats": both}, tta=True, channels_last=True)]
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)
    out = train_fold(fusion_cfg(bert_dir, "train.channels_last=true", kind="hybrid"), comp, folds(), 0, tmp_path / "nhwc")
    assert np.isfinite(out.oof).all() and np.isfinite(out.test).all()
