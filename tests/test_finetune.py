"""Fine-tuning the pretrained encoders: length-bucketed caption batches (exact resume included)
and the ``*_ft`` configs training end to end with the real offline weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfold.config import load_config
from mmfold.data.competition import load_competition
from mmfold.errors import UserError
from mmfold.train.batches import FoldDataset, LengthBucketSampler, make_loader
from mmfold.train.loop import train_fold
from tests.conftest import write_competition
from tests.test_engine import _InterruptAt, make_cfg, same_weights

REPO = Path(__file__).resolve().parents[1]
FT_CONFIGS = ("minilm_ft", "effnet_minilm_concat_ft", "effnet_minilm_hybrid_ft")

# ------------------------------------------------------------------ the length-bucketed sampler


def lengths(n: int = 203, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 40, n)


def test_buckets_are_a_function_of_seed_and_epoch_covering_every_row() -> None:
    lens = lengths()
    a, b = LengthBucketSampler(lens, 16, 4, seed=7), LengthBucketSampler(lens, 16, 4, seed=7)
    a.set_epoch(3), b.set_epoch(3)
    assert a.batches() == b.batches()  # a fresh sampler (a resumed run) gives the same epoch
    rows = sorted(i for batch in a.batches() for i in batch)
    assert rows == list(range(len(lens))) and len(a) == len(a.batches()) == 13
    b.set_epoch(4)
    assert a.batches() != b.batches()  # a new epoch: new pools, new batch order
    assert LengthBucketSampler(lens, 16, 4, seed=8).batches() != LengthBucketSampler(lens, 16, 4, seed=7).batches()


def test_buckets_cut_padding_and_drop_a_batch_of_one() -> None:
    lens = lengths(2001)  # 2001 = 125 * 16 + 1: the last batch of one is dropped
    bucketed = LengthBucketSampler(lens, 16, 50, seed=0).batches()
    assert len(bucketed) == len(LengthBucketSampler(lens, 16, 50, seed=0)) == 125
    assert all(len(b) == 16 for b in bucketed)
    shuffled = torch.randperm(len(lens), generator=torch.Generator().manual_seed(0)).numpy()[:2000].reshape(125, 16)
    slots = {"bucketed": sum(lens[b].max() * len(b) for b in bucketed),
             "shuffled": sum(lens[b].max() * len(b) for b in shuffled)}
    assert slots["bucketed"] < 0.7 * slots["shuffled"]
    first = [b[0] for b in bucketed[:5]]
    assert len(set(lens[first])) > 1  # batch order is shuffled, not sorted by length


def test_loader_uses_buckets_only_when_asked_and_for_captions() -> None:
    tokens = {"input_ids": np.ones((40, 12), np.int32),
              "attention_mask": (np.arange(12)[None] < np.arange(40)[:, None] % 12 + 1).astype(np.int32)}
    ds = FoldDataset(np.arange(40), tokens=tokens, y=np.zeros((40, 2), np.uint8))
    assert isinstance(make_loader(ds, 8, shuffle=True, length_buckets=2).batch_sampler, LengthBucketSampler)
    assert not isinstance(make_loader(ds, 8, shuffle=True).batch_sampler, LengthBucketSampler)
    assert not isinstance(make_loader(ds, 8, shuffle=False, length_buckets=2).batch_sampler, LengthBucketSampler)
    no_text = FoldDataset(np.arange(40), images=np.zeros((40, 4, 4, 3), np.uint8), y=tokens["input_ids"][:, :2])
    assert not isinstance(make_loader(no_text, 8, shuffle=True, length_buckets=2).batch_sampler, LengthBucketSampler)
    widths = [b["input_ids"].shape[1] for b in make_loader(ds, 8, shuffle=True, length_buckets=5)]
    assert sorted(widths) == [2, 4, 7, 10, 12]  # one pool, sorted, cut: each batch as long as its longest


def test_length_buckets_is_refused_for_a_model_without_captions() -> None:
    from mmfold.train.runner import used_train_keys

    assert "train.length_buckets" in used_train_keys("text")
    assert "train.length_buckets" not in used_train_keys("image")


N_TRAIN = 48


@pytest.fixture
def comp(project: Path):
    write_competition(project, n_train=N_TRAIN, n_test=10, n_labels=4)
    return load_competition(load_config("tiny").data, use_saved=False)


def test_ctrl_c_mid_epoch_with_buckets_resumes_exactly(comp, tmp_path: Path, monkeypatch) -> None:
    """Stopped after the first optimizer step of epoch 0, resumed through accelerate's
    ``skip_first_batches``: the same weights and OOF as an uninterrupted run."""
    import mmfold.train.losses

    cfg = ("train.epochs=2", "train.accum_steps=2", "train.length_buckets=2")
    fold_of_row = np.arange(N_TRAIN) % 3
    whole = train_fold(make_cfg("cnn_lstm", *cfg), comp, fold_of_row, 0, tmp_path / "whole")
    real = mmfold.train.losses.build_loss
    monkeypatch.setattr(mmfold.train.losses, "build_loss", lambda *a: _InterruptAt(real(*a), 1))
    with pytest.raises(KeyboardInterrupt):
        train_fold(make_cfg("cnn_lstm", *cfg), comp, fold_of_row, 0, tmp_path / "split")
    progress = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["progress"]
    assert progress["epoch"] == 0 and progress["batch"] == 2
    monkeypatch.setattr(mmfold.train.losses, "build_loss", real)
    resumed = train_fold(make_cfg("cnn_lstm", *cfg), comp, fold_of_row, 0, tmp_path / "split")
    assert same_weights(tmp_path / "whole" / "last.pt", tmp_path / "split" / "last.pt")
    np.testing.assert_array_equal(whole.oof, resumed.oof)
    plain = train_fold(make_cfg("cnn_lstm", "train.epochs=2", "train.accum_steps=2"), comp, fold_of_row, 0,
                       tmp_path / "plain")
    assert not np.array_equal(plain.oof, whole.oof)  # the option does change the batches


# ------------------------------------------------------------- the *_ft configs, real weights


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root with the repo's configs, ``weights/`` made by :mod:`mmfold.models.weights`
    and a 24-row competition named ``tiny``."""
    from mmfold.models import weights

    root = tmp_path_factory.mktemp("ft_home")
    shutil.copytree(REPO / "configs", root / "configs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFOLD_HOME", str(root))
        try:
            weights.efficientnet_lite0_file()
            weights.minilm_dir()
        except UserError as e:
            pytest.skip(f"offline weight packages missing: {e}")
    write_competition(root, n_train=24, n_test=0, n_labels=4)
    return root


@pytest.fixture()
def at_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MMFOLD_HOME", str(home))
    monkeypatch.chdir(home)
    return home


def test_ft_configs_load_and_validate() -> None:
    from mmfold.train.runner import validate_model

    for data, model in (("comp5329", "minilm_ft"), ("fashion", "effnet_minilm_concat_ft"),
                        ("fashion", "effnet_minilm_hybrid_ft")):
        cfg = load_config(data, model)
        validate_model(cfg)
        assert cfg.train.length_buckets > 0 and cfg.train.threads == 0  # threads from the machine
        assert cfg.train.backbone_lr_mult < 1 and cfg.train.warmup_epochs > 0 and cfg.train.ema > 0
        assert cfg.train.pos_weight or cfg.train.loss == "asl"
        text = (REPO / "configs" / "models" / f"{model}.yaml").read_text()
        assert "CPU" in text and "GPU (estimate" in text and "COST_" not in text


@pytest.mark.slow
@pytest.mark.parametrize("model", FT_CONFIGS)
def test_ft_config_fine_tunes_the_pretrained_encoders(at_home: Path, model: str) -> None:
    from mmfold.models import build_model

    cfg = load_config("tiny", model, ["train.epochs=3", "train.batch_size=8", "train.max_len=16",
                                      "train.image_size=64", "train.patience=0", "train.progress=false", "train.threads=1",
                                      "train.augment=[]"] if model != "minilm_ft" else
                      ["train.epochs=3", "train.batch_size=8", "train.max_len=16", "train.patience=0", "train.threads=1",
                       "train.progress=false"])
    comp = load_competition(cfg.data, use_saved=False)
    fold_of_row = (np.arange(24) >= 4).astype(int)  # fold 0 (4 rows) validates, 20 rows train
    torch.manual_seed(0)
    start = build_model(cfg, comp.classes)
    frozen = {id(p) for prefix in start.frozen_prefixes().values() for p in prefix.parameters()}
    backbone = {id(p) for p in start.backbone_parameters()} - frozen
    pretrained = {n: p.detach().clone() for n, p in start.named_parameters() if id(p) in backbone}
    lower = {n: p.detach().clone() for n, p in start.named_parameters() if id(p) in frozen}
    train_fold(cfg, comp, fold_of_row, 0, at_home / "runs" / model)
    after = torch.load(at_home / "runs" / model / "last.pt", weights_only=True)["model"]
    moved = [n for n, p in pretrained.items() if not torch.equal(after[n], p)]
    assert len(moved) > 0.8 * len(pretrained), f"only {len(moved)}/{len(pretrained)} pretrained tensors moved"
    assert all(torch.equal(after[n], p) for n, p in lower.items())  # the cached lower part stays as loaded
    top = cfg.model.params["train_layers"]
    text_q = next(n for n in pretrained if n.endswith(f"layer.{6 - top}.attention.self.query.weight"))
    assert text_q in moved and not any(".layer.0." in n for n in pretrained)  # the top layers only
    if model != "minilm_ft":
        assert any("conv_head" in n for n in moved)  # the image backbone's top too
    log = [json.loads(line) for line in (at_home / "runs" / model / "log.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < log[0]["train_loss"], [r["train_loss"] for r in log]
