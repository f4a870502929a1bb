"""The torch engine: exact resume, crash-safe checkpoints, config refusal, caches, DDP on CPU."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mmfold.train import checkpoint
from mmfold.train.batches import FoldDataset
from mmfold.train.caches import image_cache, load_image, to_rgb, token_cache
from mmfold.config import Config, load_config
from mmfold.data.competition import load_competition
from mmfold.errors import DataError, UserError
from mmfold.train.fold import FoldOutput
from mmfold.train.loop import train_fold
from tests.tiny import tiny_params
from tests.conftest import write_competition

N_TRAIN, FOLDS = 48, 3


@pytest.fixture
def comp(project: Path):
    """A 48-row competition with 16x16 images and captions, 3 folds."""
    write_competition(project, n_train=N_TRAIN, n_test=10, n_labels=4)
    return load_competition(load_config("tiny").data, use_saved=False)


def folds() -> np.ndarray:
    return np.arange(N_TRAIN) % FOLDS


def make_cfg(kind: str = "cnn_lstm", *overrides: str) -> Config:
    """A tiny model of ``kind`` (cnn_lstm = hybrid with a BiLSTM: both modalities, dropout)."""
    base = ["train.epochs=3", "train.threads=1", "train.batch_size=8", "train.image_size=32", "train.progress=false",
            "train.lr=0.003", "train.warmup_epochs=1"]
    cfg = load_config("tiny", None, base + list(overrides))
    cfg.model.kind, cfg.model.name = ("hybrid" if kind == "cnn_lstm" else kind), kind
    cfg.model.params = {**tiny_params(kind), "dropout": 0.3}
    return cfg


def train(cfg: Config, comp, run_dir: Path) -> FoldOutput:
    return train_fold(cfg, comp, folds(), 0, run_dir)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------ resume


RESUME_CFG = ("train.epochs=2", "train.ema=0.9", "train.accum_steps=2", "train.tta=true",
              "train.augment=[{name: HorizontalFlip, p: 0.5}, {name: RandomBrightnessContrast, p: 0.5}]")


def test_resume_after_epoch_equals_uninterrupted_run(comp, tmp_path: Path) -> None:
    whole = train(make_cfg("cnn_lstm", *RESUME_CFG), comp, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg("cnn_lstm", *RESUME_CFG, "train.stop_after_epochs=1"), comp, tmp_path / "split")
    ck = torch.load(tmp_path / "split" / "last.pt", weights_only=True)  # loadable without pickle code
    assert ck["progress"]["epoch"] == 1 and isinstance(ck["rng"]["torch"], torch.Tensor)
    # worker processes may differ on resume: augmentations are seeded per batch, not per worker
    resumed = train(make_cfg("cnn_lstm", *RESUME_CFG, "train.num_workers=2"), comp, tmp_path / "split")
    assert same_weights(tmp_path / "whole" / "last.pt", tmp_path / "split" / "last.pt")
    assert same_weights(tmp_path / "whole" / "best.pt", tmp_path / "split" / "best.pt")
    np.testing.assert_array_equal(whole.oof, resumed.oof)
    np.testing.assert_array_equal(whole.test, resumed.test)
    assert whole.oof.shape == ((folds() == 0).sum(), 4) and whole.oof.dtype == np.float32
    log = pd.read_json(tmp_path / "split" / "log.jsonl", lines=True)
    assert log["epoch"].tolist() == [0, 1]
    assert {"train_loss", "valid_loss", "valid_f1", "lr", "time_s", "images_per_s"} <= set(log.columns)
    info = resumed.info
    assert info["epochs"] == 2 and info["params_trainable"] <= info["params_total"] and info["images_per_s"] > 0


class _InterruptAt:
    """A loss wrapper that presses Ctrl-C (SIGINT to this process) on its n-th call."""

    def __init__(self, loss: torch.nn.Module, n: int) -> None:
        self.loss, self.n, self.calls = loss, n, 0

    def to(self, device):
        self.loss = self.loss.to(device)
        return self

    def __call__(self, logits, y):
        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), signal.SIGINT)
        return self.loss(logits, y)


def test_ctrl_c_mid_epoch_saves_and_resumes_exactly(comp, tmp_path: Path, monkeypatch) -> None:
    cfg = ("train.epochs=2", "train.accum_steps=2")
    whole = train(make_cfg("cnn_lstm", *cfg), comp, tmp_path / "whole")
    import mmfold.train.losses

    real = mmfold.train.losses.build_loss
    monkeypatch.setattr(mmfold.train.losses, "build_loss", lambda *a: _InterruptAt(real(*a), 1))
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg("cnn_lstm", *cfg), comp, tmp_path / "split")
    progress = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["progress"]
    assert progress["epoch"] == 0 and progress["batch"] == 2  # stopped at the optimizer step after batch 1
    monkeypatch.setattr(mmfold.train.losses, "build_loss", real)
    resumed = train(make_cfg("cnn_lstm", *cfg), comp, tmp_path / "split")
    assert same_weights(tmp_path / "whole" / "last.pt", tmp_path / "split" / "last.pt")
    np.testing.assert_array_equal(whole.oof, resumed.oof)


def test_config_change_is_refused_with_the_difference(comp, tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg("lstm_text", "train.stop_after_epochs=1"), comp, tmp_path)
    with pytest.raises(UserError, match=r"train\.lr: checkpoint 0\.003 -> now 0\.01"):
        train(make_cfg("lstm_text", "train.lr=0.01"), comp, tmp_path)
    # run-length settings and settings that do not affect training may change
    out = train(make_cfg("lstm_text", "train.patience=5", "blend.n_trials=3"), comp, tmp_path)
    assert out.info["epochs"] == 3


def test_changing_epochs_on_resume_is_refused(comp, tmp_path: Path) -> None:
    """The cosine schedule is laid out over train.epochs: a new count would make the LR jump."""
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg("lstm_text", "train.stop_after_epochs=1"), comp, tmp_path)
    with pytest.raises(UserError, match=r"train\.epochs: checkpoint 3 -> now 5"):
        train(make_cfg("lstm_text", "train.epochs=5"), comp, tmp_path)


def test_kill_during_checkpoint_write_keeps_previous_last_pt(comp, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg("lstm_text", "train.stop_after_epochs=1"), comp, tmp_path)
    before = (tmp_path / "last.pt").read_bytes()

    def dies_mid_write(obj, f, *a, **k):
        Path(f).write_bytes(before[: len(before) // 2])
        raise KeyboardInterrupt  # as if killed half way

    monkeypatch.setattr(checkpoint.torch, "save", dies_mid_write)  # the torch.save checkpoints go through
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg("lstm_text"), comp, tmp_path)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert torch.load(tmp_path / "last.pt", weights_only=True)["progress"]["epoch"] == 1
    assert not list(tmp_path.glob(".last.pt.*"))  # no temp file left


KILL_SCRIPT = """
import sys, torch
from pathlib import Path
from mmfold.train.checkpoint import save_checkpoint
i = 0
while True:
    i += 1
    save_checkpoint(Path(sys.argv[1]), {"i": i, "w": torch.full((2_000_000,), float(i))})
    print(i, flush=True)
"""


def test_sigkill_while_saving_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one complete save, then kill during later ones
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ck = torch.load(target, weights_only=True)
    assert ck["i"] >= 1 and torch.equal(ck["w"], torch.full((2_000_000,), float(ck["i"])))


# ---------------------------------------------------------------------- training options


def test_frozen_backbone_ema_accum_pos_weight_smoke(comp, tmp_path: Path) -> None:
    cfg = make_cfg("image", "train.freeze_backbone_epochs=1", "train.ema=0.5", "train.accum_steps=3",
                   "train.pos_weight=true", "train.tta=true", "train.stop_after_epochs=1")
    torch.manual_seed(cfg.train.seed)
    from mmfold.models import build_model

    model = build_model(cfg, comp.classes)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {id(p) for p in model.backbone_parameters()}
    backbone = [k for k, p in model.named_parameters() if id(p) in ids]
    head = [k for k, p in model.named_parameters() if id(p) not in ids]
    with pytest.raises(KeyboardInterrupt):
        train(cfg, comp, tmp_path)
    after = weights(tmp_path / "last.pt")
    assert backbone and all(torch.equal(initial[k], after[k]) for k in backbone)  # frozen: untouched
    assert any(not torch.equal(initial[k], after[k]) for k in head)
    cfg.train.stop_after_epochs = 0
    out = train(cfg, comp, tmp_path)
    assert any(not torch.equal(initial[k], weights(tmp_path / "last.pt")[k]) for k in backbone)  # thawed
    assert np.isfinite(out.oof).all() and out.test.shape == (10, 4)
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "best.pt").exists()


def test_early_stopping_and_finished_fold_not_retrained(comp, tmp_path: Path) -> None:
    cfg = make_cfg("lstm_text", "train.epochs=8", "train.patience=1", "train.lr=0")  # lr 0: no improvement
    out = train(cfg, comp, tmp_path)
    assert out.info["epochs"] == 2 and out.info["best_epoch"] == 0
    again = train(cfg, comp, tmp_path)  # resumes at the stopping point: no more epochs
    assert again.info["epochs"] == 2
    np.testing.assert_array_equal(out.oof, again.oof)


def test_unknown_augmentation_is_a_config_error(comp, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="NoSuchFlip"):
        train(make_cfg("image", "train.augment=[{name: NoSuchFlip}]"), comp, tmp_path)


# ------------------------------------------------------------------------------ caches


def test_image_cache_holds_the_decoded_pixels_and_is_reused(comp) -> None:
    mm = image_cache(comp, "train", 24, progress=False)
    assert mm.shape == (N_TRAIN, 24, 24, 3) and mm.dtype == np.uint8
    for i in (0, 17, N_TRAIN - 1):
        np.testing.assert_array_equal(mm[i], load_image(comp.image_path(comp.ids("train")[i]), (24, 24)))
    stamp = Path(mm.filename).stat().st_mtime_ns
    again = image_cache(comp, "train", 24, progress=False)
    assert again.filename == mm.filename and Path(mm.filename).stat().st_mtime_ns == stamp
    assert image_cache(comp, "train", (20, 28), progress=False).shape == (N_TRAIN, 20, 28, 3)
    ds = FoldDataset(np.arange(N_TRAIN), images=mm)
    assert len(pickle.dumps(ds)) < 10_000  # workers reopen the memmap, not a copy of the pixels
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ds)).__getitems__([3, 1])["image"].numpy(), mm[[3, 1]])
    Image.new("RGB", (16, 16), (255, 0, 0)).save(comp.image_path(comp.ids("train")[0]))  # a changed image
    fresh = image_cache(comp, "train", 24, progress=False)
    assert fresh.filename != mm.filename
    assert (np.abs(fresh[0].astype(int) - [255, 0, 0]) <= 3).all(axis=-1).mean() > 0.9  # jpeg: near red


def test_any_image_mode_becomes_rgb(tmp_path: Path) -> None:
    grey16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    cases = {"L": Image.new("L", (4, 4), 128), "CMYK": Image.new("CMYK", (4, 4), (0, 0, 0, 0)),
             "I16": grey16, "RGBA": rgba}
    expected = {"L": 128, "CMYK": 255, "I16": 255, "RGBA": 255}
    for name, im in cases.items():
        out = to_rgb(im)
        assert out.mode == "RGB" and (np.asarray(out) == expected[name]).all(), name
    grey16.save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png", (8, 8)).shape == (8, 8, 3)


def test_undecodable_image_is_named(comp) -> None:
    bad = comp.image_path(comp.ids("test")[3])
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=bad.name):
        image_cache(comp, "test", 16, progress=False)
    assert not list(bad.parents[2].glob("cache/**/*.u8"))


def test_token_cache_matches_the_tokenizer(comp) -> None:
    from mmfold.models import WordTokenizer

    tok = WordTokenizer.fit(comp.train["caption"].tolist())
    cached = token_cache(comp, "test", tok, 12)
    direct = tok(comp.test["caption"].tolist(), 12)
    for k in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(cached[k], direct[k])
    small = WordTokenizer.fit(comp.train["caption"].tolist()[:5])
    assert not np.array_equal(token_cache(comp, "test", small, 12)["input_ids"], cached["input_ids"])
    assert len(list(Path("cache/tiny").glob("tokens_test_*.npz"))) == 2


# ------------------------------------------------------------------------ 2 processes


DDP_SCRIPT = """
import sys
import numpy as np
import pandas as pd
from pathlib import Path
from accelerate import PartialState
from mmfold.config import load_config
from mmfold.data.competition import load_competition
from mmfold.train.loop import train_fold
from tests.tiny import tiny_params

cfg = load_config("tiny", None, ["train.epochs=2", "train.batch_size=5", "train.image_size=32",
                                 "train.progress=false", "train.device=cpu", "train.threads=1"])
cfg.model.kind, cfg.model.name, cfg.model.params = "fusion", "fusion", tiny_params("cnn_lstm")
comp = load_competition(cfg.data, use_saved=False)
fold_of_row = np.arange(len(comp.train)) % 3
out = train_fold(cfg, comp, fold_of_row, 0, Path("runs/ddp"))
if PartialState().is_main_process:
    ids = comp.train["id"].to_numpy()[fold_of_row == 0]
    df = pd.DataFrame(out.oof, columns=comp.classes)
    df.insert(0, "id", ids)
    df.to_parquet(sys.argv[1])
    print("world", PartialState().num_processes, out.info["num_processes"])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_write_each_oof_row_once(comp, project: Path) -> None:
    script = project / "ddp_fold.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), str(project / "oof.parquet")]
    res = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "world 2 2" in res.stdout
    oof = pd.read_parquet(project / "oof.parquet")
    n_valid = (folds() == 0).sum()
    assert oof.shape == (n_valid, 1 + 4) and oof["id"].is_unique
    assert len(list((project / "runs" / "ddp").glob("log.jsonl"))) == 1


def test_cli_train_under_a_two_process_launcher(project: Path) -> None:
    """``mmfold train`` under torchrun (the Makefile's accelerate line is run by
    tests/test_launch.py): every fold trains with both ranks, rank 0 alone writes, OOF has
    each id once."""
    import yaml

    from tests.test_faults import TINY_FUSION

    write_competition(project)
    (project / "configs" / "models" / "tf.yaml").write_text(yaml.safe_dump(TINY_FUSION))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMFOLD_HOME": str(project)}
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], cwd=project, env=env,  # noqa: E731
                                      capture_output=True, text=True, timeout=300)
    assert run("-m", "mmfold", "folds", "--data", "tiny").returncode == 0
    res = run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
              "-m", "mmfold", "train", "--data", "tiny", "--model", "tf", "train.threads=1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    oof = pd.read_parquet(project / "oof" / "tiny" / "tf.parquet")
    train = pd.read_csv(project / "input" / "tiny" / "train.csv")
    assert oof["id"].is_unique and set(oof["id"]) == set(train["ImageID"])
    for k in range(3):
        done = json.loads((project / "runs" / "tiny" / "tf" / f"fold{k}" / "done.json").read_text())
        assert done["num_processes"] == 2
    assert res.stdout.count("tf: CV samples-F1") == 1  # one rank reports and collects
